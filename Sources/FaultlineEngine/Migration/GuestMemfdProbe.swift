import FaultlineCore
import FaultlineLinux

/// Asks the kernel what it allows a guest_memfd VM's memory (the facts in docs/design.md,
/// "Migrating a guest_memfd VM"), by trying each thing on a throwaway SW-protected VM.
public enum GuestMemfdProbe {
    /// The answers, and what the kernel said to each try (for the report and the docs).
    public struct Result: Sendable {
        public var features = GuestMemfdKernelFeatures()
        public var notes: [(name: String, answer: String)] = []
    }

    public static func collect() -> Result {
        var r = Result()
        guard let kvm = try? KVM() else {
            r.notes.append(("/dev/kvm", "absent"))
            return r
        }
        let types = kvm.check(.vmTypes)
        r.features.swProtectedVM = types & (1 << Int32(VMType.swProtected.rawValue)) != 0
        r.notes.append(("KVM_CAP_VM_TYPES", "0x\(String(types, radix: 16))"))
        guard r.features.swProtectedVM else { return r }
        let vm: VirtualMachine
        do { vm = try kvm.createVM(type: .swProtected) } catch {
            r.features.swProtectedVM = false
            r.notes.append(("KVM_CREATE_VM KVM_X86_SW_PROTECTED_VM", "\(error)"))
            return r
        }
        let attributes = vm.check(.memoryAttributes)
        r.features.privateAttribute = attributes & (1 << 3) != 0
        r.notes.append(("KVM_CAP_MEMORY_ATTRIBUTES (VM)", "0x\(String(attributes, radix: 16))"))
        // Such a VM's guest_memfd cannot start shared (x86 refuses INIT_SHARED where memory can
        // be private): mapped with MMAP alone, it is registered for userfaultfd but never touched.
        do {
            let mapped = try GuestMemoryRegion(backing: .guestMemfd, size: 1 << 16, vm: vm, label: "gmem-probe mmap",
                                               guestMemfdFlags: .mmap)
            r.features.guestMemfdMmap = true
            r.notes.append(("KVM_CREATE_GUEST_MEMFD GUEST_MEMFD_FLAG_MMAP, mmap", "accepted"))
            do {
                let u = try GuestMemfdOnlyProbe.userfaultfd([.missingShmem])
                try u.register(start: mapped.hostAddress, length: mapped.size, mode: .missing)
                r.features.userfaultfdOnGuestMemfd = true
                r.notes.append(("UFFDIO_REGISTER MODE_MISSING on that mapping", "accepted"))
            } catch {
                r.notes.append(("UFFDIO_REGISTER MODE_MISSING on that mapping", error.errnoName))
            }
        } catch {
            r.notes.append(("KVM_CREATE_GUEST_MEMFD GUEST_MEMFD_FLAG_MMAP, mmap", (error as? SystemError)?.errnoName ?? "\(error)"))
        }
        guard let shared = try? GuestMemoryRegion(backing: .anonymous, size: 1 << 16, label: "gmem-probe"),
              let gmem = try? vm.createGuestMemfd(size: 3 << 16, flags: []) else {
            r.notes.append(("KVM_CREATE_GUEST_MEMFD", "failed"))
            return r
        }
        func trySlot(_ slot: UInt32, _ flags: MemslotFlags, bitmap: UnsafeRawPointer? = nil) -> String? {
            do {
                // Each slot binds its own part of the guest_memfd (bindings may not overlap).
                try vm.setMemoryRegion(slot: slot, flags: flags.union(.guestMemfd),
                                       guestPhysicalAddress: GuestPhysicalAddress(UInt64(slot) << 20), size: shared.size,
                                       hostAddress: shared.hostAddress, guestMemfd: gmem, guestMemfdOffset: UInt64(slot) << 16,
                                       userfaultBitmap: bitmap)
                return nil
            } catch { return error.errnoName }
        }
        let plain = trySlot(0, [])
        r.notes.append(("KVM_MEM_GUEST_MEMFD memslot", plain ?? "accepted"))
        let dirty = trySlot(1, .logDirtyPages)
        r.features.dirtyLogOnGuestMemfdSlot = dirty == nil
        r.notes.append(("KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES memslot", dirty ?? "accepted"))
        let bitmap = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 8)
        bitmap.initializeMemory(as: UInt8.self, repeating: 0, count: 64)
        let userfault = trySlot(2, .userfault, bitmap: bitmap)
        r.features.kvmUserfault = userfault == nil
        r.notes.append(("KVM_MEM_GUEST_MEMFD | KVM_MEM_USERFAULT memslot", userfault ?? "accepted"))
        for slot: UInt32 in 0...2 { try? vm.deleteMemoryRegion(slot: slot) }
        bitmap.deallocate()
        withExtendedLifetime(shared) {}
        let uffdFeatures = try? Userfaultfd.availableFeatures()
        r.features.userfaultfdWriteProtect = uffdFeatures?.contains(.wpUnpopulated) ?? false
        r.notes.append(("userfaultfd UFFD_FEATURE_WP_UNPOPULATED", uffdFeatures.map { $0.contains(.wpUnpopulated) ? "yes" : "no" } ?? "no userfaultfd"))
        return r
    }
}
