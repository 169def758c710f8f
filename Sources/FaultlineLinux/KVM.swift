import CFaultlineShim
import FaultlineCore
#if canImport(Glibc)
import Glibc
#endif

/// KVM capability numbers Faultline asks about (include/uapi/linux/kvm.h).
public enum KVMCapability: Int32, CaseIterable, Sendable, CustomStringConvertible {
    case maxVcpus = 66
    case userMemory = 3
    case readonlyMem = 81
    case manualDirtyLogProtect2 = 168
    case dirtyLogRing = 192
    case userMemory2 = 231
    case memoryFaultInfo = 232
    case memoryAttributes = 233
    case guestMemfd = 234
    case vmTypes = 235
    case preFaultMemory = 236
    case guestMemfdFlags = 244
    case exitHypercall = 201
    case nrVcpus = 9

    public var description: String {
        switch self {
        case .maxVcpus: return "KVM_CAP_MAX_VCPUS"
        case .userMemory: return "KVM_CAP_USER_MEMORY"
        case .readonlyMem: return "KVM_CAP_READONLY_MEM"
        case .manualDirtyLogProtect2: return "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"
        case .dirtyLogRing: return "KVM_CAP_DIRTY_LOG_RING"
        case .userMemory2: return "KVM_CAP_USER_MEMORY2"
        case .memoryFaultInfo: return "KVM_CAP_MEMORY_FAULT_INFO"
        case .memoryAttributes: return "KVM_CAP_MEMORY_ATTRIBUTES"
        case .guestMemfd: return "KVM_CAP_GUEST_MEMFD"
        case .vmTypes: return "KVM_CAP_VM_TYPES"
        case .preFaultMemory: return "KVM_CAP_PRE_FAULT_MEMORY"
        case .guestMemfdFlags: return "KVM_CAP_GUEST_MEMFD_FLAGS"
        case .exitHypercall: return "KVM_CAP_EXIT_HYPERCALL"
        case .nrVcpus: return "KVM_CAP_NR_VCPUS"
        }
    }
}

/// VM types for KVM_CREATE_VM.
public enum VMType: UInt, CaseIterable, Sendable {
    case `default` = 0, swProtected = 1, sev = 2, sevES = 3, snp = 4, tdx = 5
}

/// Memslot flags for KVM_SET_USER_MEMORY_REGION2.
public struct MemslotFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// KVM_MEM_LOG_DIRTY_PAGES
    public static let logDirtyPages = MemslotFlags(rawValue: 1 << 0)
    /// KVM_MEM_READONLY
    public static let readOnly = MemslotFlags(rawValue: 1 << 1)
    /// KVM_MEM_GUEST_MEMFD
    public static let guestMemfd = MemslotFlags(rawValue: 1 << 2)
    /// KVM_MEM_USERFAULT (proposed in the KVM Userfault series, never merged).
    public static let userfault = MemslotFlags(rawValue: 1 << 3)
}

/// Flags for KVM_CREATE_GUEST_MEMFD.
public struct GuestMemfdFlags: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// GUEST_MEMFD_FLAG_MMAP: the memory may be mmapped by userspace.
    public static let mmap = GuestMemfdFlags(rawValue: 1 << 0)
    /// GUEST_MEMFD_FLAG_INIT_SHARED: pages start shared.
    public static let initShared = GuestMemfdFlags(rawValue: 1 << 1)
    /// GUEST_MEMFD_FLAG_WRITE: write()/pwrite() populate the guest_memfd (Firecracker's
    /// guest_memfd write series; bit 3, bit 2 being NO_DIRECT_MAP's on kernels that have it).
    public static let write = GuestMemfdFlags(rawValue: 1 << 3)
}

/// The KVM system fd (/dev/kvm).
public final class KVM: @unchecked Sendable {
    public let fd: FileDescriptor
    public let vcpuMmapSize: Int

    public init(path: String = "/dev/kvm") throws(SystemError) {
        let kvmFD = try FileDescriptor.open(path, flags: O_RDWR)
        let version = try systemCall("KVM_GET_API_VERSION") { kvmFD.ioctl(FL_KVM_GET_API_VERSION, value: 0) }
        guard version == 12 else { throw SystemError("KVM_GET_API_VERSION returned \(version), expected 12", errno: EINVAL) }
        vcpuMmapSize = Int(try systemCall("KVM_GET_VCPU_MMAP_SIZE") { kvmFD.ioctl(FL_KVM_GET_VCPU_MMAP_SIZE, value: 0) })
        fd = kvmFD
    }

    /// KVM_CHECK_EXTENSION on /dev/kvm: 0 when absent, else a capability-specific value.
    public func check(_ capability: KVMCapability) -> Int32 {
        max(0, fd.ioctl(FL_KVM_CHECK_EXTENSION, value: UInt(capability.rawValue)))
    }

    public func createVM(type: VMType = .default) throws(SystemError) -> VirtualMachine {
        let raw = try systemCall("KVM_CREATE_VM type \(type.rawValue)") { fd.ioctl(FL_KVM_CREATE_VM, value: type.rawValue) }
        return VirtualMachine(fd: FileDescriptor(adopting: raw, label: "kvm-vm"), kvm: self)
    }
}

/// A guest_memfd: guest memory that is not mapped by default, owned by the VM.
public final class GuestMemfd: @unchecked Sendable {
    public let fd: FileDescriptor
    public let size: UInt64
    public let flags: GuestMemfdFlags
    init(fd: FileDescriptor, size: UInt64, flags: GuestMemfdFlags) {
        self.fd = fd
        self.size = size
        self.flags = flags
    }
}

/// A KVM virtual machine.
public final class VirtualMachine: @unchecked Sendable {
    public let fd: FileDescriptor
    public let kvm: KVM
    /// The memory behind each memslot registered with `setMemoryRegion(slot:memory:)`:
    /// held here so it cannot be unmapped while the slot exists.
    private let slotMemory = Locked<[UInt32: GuestMemoryRegion]>([:])
    /// The flags each existing memslot was declared with (see `refuseUserfaultToggle`).
    private let slotFlags = Locked<[UInt32: MemslotFlags]>([:])

    init(fd: FileDescriptor, kvm: KVM) {
        self.fd = fd
        self.kvm = kvm
    }

    /// KVM_CHECK_EXTENSION on the VM (some answers depend on the VM type).
    public func check(_ capability: KVMCapability) -> Int32 {
        max(0, fd.ioctl(FL_KVM_CHECK_EXTENSION, value: UInt(capability.rawValue)))
    }

    /// KVM_SET_USER_MEMORY_REGION2 over the whole of `memory`, which the VM then keeps alive
    /// until the slot is deleted or redeclared (and vCPUs keep the VM alive). `guestMemfd`,
    /// `userfaultBitmap`: as in the raw-address form below.
    public func setMemoryRegion(
        slot: UInt32, flags: MemslotFlags = [], guestPhysicalAddress: GuestPhysicalAddress, memory: GuestMemoryRegion,
        guestMemfd: GuestMemfd? = nil, userfaultBitmap: UnsafeRawPointer? = nil
    ) throws(SystemError) {
        try setMemoryRegion(slot: slot, flags: flags, guestPhysicalAddress: guestPhysicalAddress, size: memory.size,
                            hostAddress: memory.hostAddress, guestMemfd: guestMemfd, userfaultBitmap: userfaultBitmap)
        slotMemory.withLock { $0[slot] = memory }
    }

    /// Deletes memslot `slot` (size 0) and lets go of its memory.
    public func deleteMemoryRegion(slot: UInt32) throws(SystemError) {
        try setMemoryRegion(slot: slot, guestPhysicalAddress: GuestPhysicalAddress(0), size: 0, hostAddress: HostAddress(rawValue: 0))
    }

    /// KVM_SET_USER_MEMORY_REGION2 over a raw host range. Unsafe in the sense of rust-vmm's
    /// API: the caller keeps the range mapped for as long as the slot exists (the
    /// `memory:` form above does that for you). A size of 0 deletes the slot. `userfaultBitmap` (with
    /// `.userfault`, KVM Userfault kernels only): one bit per page, bit 0 = the slot's first
    /// page; it must stay valid as long as the slot has the flag.
    public func setMemoryRegion(
        slot: UInt32, flags: MemslotFlags = [], guestPhysicalAddress: GuestPhysicalAddress, size: UInt64,
        hostAddress: HostAddress, guestMemfd: GuestMemfd? = nil, guestMemfdOffset: UInt64 = 0,
        userfaultBitmap: UnsafeRawPointer? = nil
    ) throws(SystemError) {
        var region = fl_kvm_userspace_memory_region2()
        region.slot = slot
        region.flags = flags.rawValue
        region.guest_phys_addr = guestPhysicalAddress.rawValue
        region.memory_size = size
        region.userspace_addr = hostAddress.rawValue
        region.guest_memfd_offset = guestMemfdOffset
        region.guest_memfd = UInt32(bitPattern: guestMemfd?.fd.rawValue ?? 0)
        region.pad2.0 = UInt64(UInt(bitPattern: userfaultBitmap))  // userfault_bitmap in the KVM Userfault proposal
        try refuseUserfaultToggle(slot: slot, flags: flags, deleting: size == 0)
        try systemCall("KVM_SET_USER_MEMORY_REGION2 slot \(slot)") { fd.ioctl(FL_KVM_SET_USER_MEMORY_REGION2, &region) }
        slotFlags.withLock { $0[slot] = size == 0 ? nil : flags }
        if size == 0 { slotMemory.withLock { _ = $0.removeValue(forKey: slot) } }
    }

    /// The KVM Userfault series (v2, as on the rig's kernel) accepts KVM_MEM_USERFAULT toggled
    /// on an existing guest_memfd memslot, but leaves the new memslot unbound from its
    /// guest_memfd (private faults then fail, and the guest_memfd keeps a pointer to the freed
    /// old memslot). Faultline sets the flag only when such a slot is created.
    private func refuseUserfaultToggle(slot: UInt32, flags: MemslotFlags, deleting: Bool) throws(SystemError) {
        guard !deleting, let old = slotFlags.withLock({ $0[slot] }), old.contains(.guestMemfd),
              old.contains(.userfault) != flags.contains(.userfault) else { return }
        throw SystemError("KVM_SET_USER_MEMORY_REGION2 slot \(slot): refusing to toggle KVM_MEM_USERFAULT on an existing "
                          + "guest_memfd memslot (the KVM Userfault series leaves it unbound); set it when the slot is created",
                          errno: EINVAL)
    }

    public func createGuestMemfd(size: UInt64, flags: GuestMemfdFlags) throws(SystemError) -> GuestMemfd {
        var arg = fl_kvm_create_guest_memfd()
        arg.size = size
        arg.flags = flags.rawValue
        let raw = try systemCall("KVM_CREATE_GUEST_MEMFD size \(size) flags 0x\(String(flags.rawValue, radix: 16))") {
            fd.ioctl(FL_KVM_CREATE_GUEST_MEMFD, &arg)
        }
        return GuestMemfd(fd: FileDescriptor(adopting: raw, label: "guest_memfd"), size: size, flags: flags)
    }

    /// KVM_SET_MEMORY_ATTRIBUTES (private = 1 << 3).
    public func setMemoryAttributes(_ range: GuestMemoryRange, attributes: UInt64) throws(SystemError) {
        var arg = fl_kvm_memory_attributes(address: range.start.rawValue, size: range.size, attributes: attributes, flags: 0)
        try systemCall("KVM_SET_MEMORY_ATTRIBUTES \(range)") { fd.ioctl(FL_KVM_SET_MEMORY_ATTRIBUTES, &arg) }
    }

    /// KVM_GET_DIRTY_LOG: fills `bitmap` (one bit per page of the slot, 64-bit words) and
    /// resets the log (unless manual protect is enabled).
    public func getDirtyLog(slot: UInt32, into bitmap: UnsafeMutableRawPointer) throws(SystemError) {
        var arg = fl_kvm_dirty_log()
        arg.slot = slot
        arg.dirty_bitmap = UInt64(UInt(bitPattern: bitmap))
        try systemCall("KVM_GET_DIRTY_LOG slot \(slot)") { fd.ioctl(FL_KVM_GET_DIRTY_LOG, &arg) }
    }

    /// KVM_CLEAR_DIRTY_LOG: re-protects the pages set in `bitmap` (needs MANUAL_DIRTY_LOG_PROTECT2).
    public func clearDirtyLog(slot: UInt32, firstPage: UInt64, pageCount: UInt32, bitmap: UnsafeMutableRawPointer) throws(SystemError) {
        var arg = fl_kvm_clear_dirty_log(slot: slot, num_pages: pageCount, first_page: firstPage,
                                         dirty_bitmap: UInt64(UInt(bitPattern: bitmap)))
        try systemCall("KVM_CLEAR_DIRTY_LOG slot \(slot) pages \(firstPage)+\(pageCount)") {
            fd.ioctl(FL_KVM_CLEAR_DIRTY_LOG, &arg)
        }
    }

    /// KVM_ENABLE_CAP on the VM.
    public func enable(_ capability: KVMCapability, args: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)) throws(SystemError) {
        var arg = fl_kvm_enable_cap()
        arg.cap = UInt32(capability.rawValue)
        arg.args = args
        try systemCall("KVM_ENABLE_CAP \(capability)") { fd.ioctl(FL_KVM_ENABLE_CAP, &arg) }
    }

    public func createVcpu(id: Int) throws(SystemError) -> Vcpu {
        let raw = try systemCall("KVM_CREATE_VCPU \(id)") { fd.ioctl(FL_KVM_CREATE_VCPU, value: UInt(id)) }
        let vcpuFD = FileDescriptor(adopting: raw, label: "kvm-vcpu \(id)")
        let size = kvm.vcpuMmapSize
        guard let run = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, raw, 0), run != MAP_FAILED else {
            throw SystemError("mmap kvm_run vcpu \(id)", errno: fl_errno())
        }
        return Vcpu(id: id, fd: vcpuFD, run: run, runSize: size, machine: self)
    }
}
