import FaultlineCore
import FaultlineLinux

/// Tries, on a throwaway default VM, what a guest_memfd-only VM needs (GuestMemfdOnlyFeatures):
/// each answer comes from doing the operation, each failure names the operation and its errno.
/// Nothing here reads a page that could block or fault: a page is read back only after the
/// operation that makes it present has succeeded.
public enum GuestMemfdOnlyProbe {
    static let page: UInt64 = 4096
    /// Pages of the probe's guest_memfd: 0 a store, 1 UFFDIO_COPY, 2 UFFDIO_CONTINUE,
    /// 3 the KVM_MEM_USERFAULT memslot, 4 the dirty-logged memslot.
    static let pages: UInt64 = 5

    public static func collect() -> GuestMemfdOnlyFeatures {
        var f = GuestMemfdOnlyFeatures()
        let vm: VirtualMachine
        do { vm = try KVM().createVM() } catch {
            f.mmap = .missing("\(error)")
            return notTried(f)
        }
        f.vmFlags = vm.check(.guestMemfdFlags)
        let region: GuestMemoryRegion
        do {
            region = try GuestMemoryRegion(backing: .guestMemfd, size: pages * page, vm: vm, label: "gmem-probe")
        } catch {
            f.mmap = .missing("\(error)")
            return notTried(f)
        }
        region.base.storeBytes(of: 0x5A, as: UInt8.self)
        let back = region.base.load(as: UInt8.self)
        f.mmap = back == 0x5A ? .works("KVM_CREATE_GUEST_MEMFD MMAP|INIT_SHARED, mmap MAP_SHARED, a store read back")
            : .missing("a store of 0x5a through the mapping read back as 0x\(String(back, radix: 16))")
        guard f.mmap.works else { return notTried(f) }
        f.uffdMissing = tryMissing(region)
        f.uffdMinor = tryMinor(region)
        f.uffdWriteProtect = tryWriteProtect(region)
        f.write = tryWrite(vm)
        f.kvmUserfault = trySlot(vm, region, slot: 0, page: 3, flags: .userfault)
        f.dirtyLog = trySlot(vm, region, slot: 1, page: 4, flags: .logDirtyPages)
        return f
    }

    /// Every step after a failed mapping: not tried, naming why.
    static func notTried(_ f: GuestMemfdOnlyFeatures) -> GuestMemfdOnlyFeatures {
        var f = f
        let why = ProbeOutcome.missing("not tried: guest_memfd mmap failed")
        f.uffdMissing = why
        f.uffdMinor = why
        f.uffdWriteProtect = why
        f.write = why
        f.kvmUserfault = why
        f.dirtyLog = why
        return f
    }

    /// A userfaultfd with those of `wanted` the kernel offers (user-mode faults are all the probe
    /// makes; a kernel-mode fd where user-mode-only ones cannot be opened).
    static func userfaultfd(_ wanted: UffdFeatures) throws(SystemError) -> Userfaultfd {
        let offered = (try? Userfaultfd.availableFeatures()) ?? []
        let features = wanted.intersection(offered)
        do {
            return try Userfaultfd(required: features, flags: [.nonBlocking, .userModeOnly], label: "gmem-probe uffd")
        } catch {
            return try Userfaultfd(required: features, flags: [.nonBlocking], label: "gmem-probe uffd")
        }
    }

    static func address(_ region: GuestMemoryRegion, page index: UInt64) -> HostAddress {
        HostAddress(region.base + Int(index * page))
    }

    /// MODE_MISSING on page 1, then UFFDIO_COPY of a page of 0xa5 into it.
    static func tryMissing(_ region: GuestMemoryRegion) -> ProbeOutcome {
        let source = [UInt8](repeating: 0xA5, count: Int(page))
        return tryInstall(region, page: 1, features: [.missingShmem], mode: .missing, byte: 0xA5, how: "UFFDIO_COPY") { u, at in
            _ = try source.withUnsafeBytes { bytes in try u.copy(to: at, from: bytes.baseAddress!, length: page) }
        }
    }

    /// Page 2 stored through the mapping, its mapping dropped (MADV_DONTNEED keeps the page
    /// cache), MODE_MINOR, then UFFDIO_CONTINUE maps the cached page again.
    static func tryMinor(_ region: GuestMemoryRegion) -> ProbeOutcome {
        do {
            region.base.storeBytes(of: 0x3C, toByteOffset: Int(2 * page), as: UInt8.self)
            try region.discard(offset: 2 * page, length: page)
        } catch {
            return .missing("\(error)")
        }
        return tryInstall(region, page: 2, features: [.minorShmem], mode: .minor, byte: 0x3C, how: "UFFDIO_CONTINUE of a cached page") { u, at in
            _ = try u.continue(at: at, length: page)
        }
    }

    /// Registers page `index` with `mode`, runs `install` on it, and reads `byte` back at its
    /// start: only after `install` succeeded, so the read cannot wait on the userfaultfd.
    static func tryInstall(_ region: GuestMemoryRegion, page index: UInt64, features: UffdFeatures, mode: UffdRegisterMode,
                           byte: UInt8, how: String, install: (Userfaultfd, HostAddress) throws -> Void) -> ProbeOutcome {
        let at = address(region, page: index)
        do {
            let u = try userfaultfd(features)
            let ioctls = try u.register(start: at, length: page, mode: mode)
            try install(u, at)
            let seen = region.base.load(fromByteOffset: Int(index * page), as: UInt8.self)
            try u.unregister(start: at, length: page)
            guard seen == byte else {
                return .missing("\(how) read back 0x\(String(seen, radix: 16)), expected 0x\(String(byte, radix: 16))")
            }
            return .works("UFFDIO_REGISTER MODE_\(mode == .minor ? "MINOR" : "MISSING") ioctls 0x\(String(ioctls, radix: 16)), \(how) read back")
        } catch {
            return .missing("\(error)")
        }
    }

    /// MODE_WP on page 0 (present), protected and unprotected again (nothing writes it meanwhile).
    static func tryWriteProtect(_ region: GuestMemoryRegion) -> ProbeOutcome {
        let at = address(region, page: 0)
        do {
            let u = try userfaultfd([.pagefaultFlagWP, .wpHugetlbfsShmem])
            try u.register(start: at, length: page, mode: .writeProtect)
            try u.writeProtect(start: at, length: page, protect: true)
            try u.writeProtect(start: at, length: page, protect: false)
            try u.unregister(start: at, length: page)
            return .works("UFFDIO_REGISTER MODE_WP, UFFDIO_WRITEPROTECT on and off")
        } catch {
            return .missing("\(error)")
        }
    }

    /// A guest_memfd with MMAP|INIT_SHARED|WRITE, pwrite() of a page of 0x69, read back.
    static func tryWrite(_ vm: VirtualMachine) -> ProbeOutcome {
        do {
            let region = try GuestMemoryRegion(backing: .guestMemfd, size: page, vm: vm, label: "gmem-probe write",
                                               guestMemfdFlags: [.mmap, .initShared, .write])
            let source = [UInt8](repeating: 0x69, count: Int(page))
            try source.withUnsafeBytes { bytes in
                try region.writeFile(at: 0, from: bytes.baseAddress!, length: Int(page))
            }
            let seen = region.base.load(fromByteOffset: 4000, as: UInt8.self)
            guard seen == 0x69 else { return .missing("pwrite of 0x69 read back through the mapping as 0x\(String(seen, radix: 16))") }
            return .works("KVM_CREATE_GUEST_MEMFD MMAP|INIT_SHARED|WRITE, pwrite of a page read back through the mapping")
        } catch {
            return .missing("\(error)")
        }
    }

    /// A KVM_MEM_GUEST_MEMFD memslot over one page with `flags` too, set at creation (a
    /// KVM_MEM_USERFAULT toggled later leaves a guest_memfd slot dead on 7.3), then deleted.
    static func trySlot(_ vm: VirtualMachine, _ region: GuestMemoryRegion, slot: UInt32, page index: UInt64,
                        flags: MemslotFlags) -> ProbeOutcome {
        let bitmap = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)
        bitmap.storeBytes(of: 0, as: UInt64.self)
        defer { bitmap.deallocate() }
        do {
            try vm.setMemoryRegion(slot: slot, flags: flags.union(.guestMemfd), guestPhysicalAddress: GuestPhysicalAddress(UInt64(slot) << 20),
                                   size: page, hostAddress: address(region, page: index), guestMemfd: region.guestMemfd,
                                   guestMemfdOffset: index * page, userfaultBitmap: flags.contains(.userfault) ? UnsafeRawPointer(bitmap) : nil)
        } catch {
            return .missing("\(error)")
        }
        try? vm.deleteMemoryRegion(slot: slot)
        return .works("KVM_SET_USER_MEMORY_REGION2 accepted it at creation")
    }
}
