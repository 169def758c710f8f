import CFaultlineShim
import FaultlineCore
#if canImport(Glibc)
import Glibc
#endif

/// A VM with private memory: type KVM_X86_SW_PROTECTED_VM, and one private-capable region
/// backed twice - a guest_memfd (private; on Linux 6.12 it cannot be mmapped, read or
/// written by userspace) and an ordinary mapping (shared; the VMM reads and writes it).
/// KVM_SET_MEMORY_ATTRIBUTES picks, per page, which of the two the guest sees.
///
/// Owns the VM, the guest_memfd and the shared mapping; the VM keeps the memslot's memory
/// alive. Creating it refuses up front, naming the missing kernel feature, where the kernel
/// has no private memory (``PrivateMemoryVM/obstacle(_:)``).
public final class PrivateMemoryVM: @unchecked Sendable {
    /// KVM_MEMORY_ATTRIBUTE_PRIVATE
    public static let attributePrivate: UInt64 = 1 << 3
    /// The bit of KVM_CAP_EXIT_HYPERCALL's mask for KVM_HC_MAP_GPA_RANGE.
    public static let exitMapGPARange: UInt64 = 1 << 12

    public let kvm: KVM
    public let vm: VirtualMachine
    public let guestMemfd: GuestMemfd
    /// The shared backing of the region (userspace_addr of the memslot).
    public let shared: GuestMemoryRegion
    /// The private-capable region in guest physical memory.
    public let region: GuestMemoryRange
    public let slot: UInt32

    /// Why this kernel cannot run private memory, or nil when it can: the VM type, the
    /// PRIVATE memory attribute, guest_memfd, memslots v2.
    public static func obstacle(_ kvm: KVM) -> String? {
        let types = kvm.check(.vmTypes)
        let attributes = kvm.check(.memoryAttributes)
        var missing: [String] = []
        if types & (1 << Int32(VMType.swProtected.rawValue)) == 0 {
            let offered = VMType.allCases.filter { types & (1 << Int32($0.rawValue)) != 0 }.map { "\($0)" }
            missing.append("KVM_X86_SW_PROTECTED_VM (KVM_CAP_VM_TYPES offers: \(offered.isEmpty ? "default only" : offered.joined(separator: ", ")))")
        }
        if UInt64(attributes) & attributePrivate == 0 {
            missing.append("KVM_CAP_MEMORY_ATTRIBUTES with KVM_MEMORY_ATTRIBUTE_PRIVATE (here: \(attributes))")
        }
        if kvm.check(.guestMemfd) == 0 { missing.append("KVM_CAP_GUEST_MEMFD") }
        if kvm.check(.userMemory2) == 0 { missing.append("KVM_CAP_USER_MEMORY2") }
        guard !missing.isEmpty else { return nil }
        return "private memory needs " + missing.joined(separator: " and ")
            + " (Linux 6.8+ with CONFIG_KVM_SW_PROTECTED_VM and TDP; run inside the rig)"
    }

    /// The refusal thrown when ``obstacle(_:)`` is not nil.
    public struct Unavailable: Error, CustomStringConvertible {
        public let description: String
        public init(description: String) { self.description = description }
    }

    /// Creates the VM and the region: `size` bytes at `gpa`, in memslot `slot`, all pages
    /// `initiallyPrivate` or shared. `sharedBacking` is `.anonymous` (discarded with
    /// MADV_DONTNEED) or `.memfd` (MADV_REMOVE, which frees the shmem pages).
    /// `userfaultBitmap` (KVM Userfault kernels): the memslot is created with KVM_MEM_USERFAULT
    /// and this bitmap (never toggled later: on a guest_memfd memslot that is unsafe).
    public init(kvm: KVM, gpa: GuestPhysicalAddress, size: UInt64, slot: UInt32 = 1,
                sharedBacking: MemoryBacking = .anonymous, initiallyPrivate: Bool = false,
                userfaultBitmap: UnsafeRawPointer? = nil) throws {
        if let why = Self.obstacle(kvm) { throw Unavailable(description: why) }
        guard sharedBacking == .anonymous || sharedBacking == .memfd else {
            throw Unavailable(description: "private memory: shared backing \(sharedBacking) is not supported (anonymous or memfd)")
        }
        guard let region = GuestMemoryRange(start: gpa, size: size), gpa.isAligned(to: 4096), size % 4096 == 0 else {
            throw SharingMapSetupError(gpa: gpa.rawValue, size: size)
        }
        self.kvm = kvm
        self.region = region
        self.slot = slot
        vm = try kvm.createVM(type: .swProtected)
        let vmAttributes = UInt64(vm.check(.memoryAttributes))
        guard vmAttributes & Self.attributePrivate != 0 else {
            throw Unavailable(description: "private memory: KVM_CAP_MEMORY_ATTRIBUTES on the SW-protected VM is \(vmAttributes), without PRIVATE")
        }
        guestMemfd = try vm.createGuestMemfd(size: size, flags: [])
        shared = try GuestMemoryRegion(backing: sharedBacking, size: size, label: "private-region-shared")
        try vm.setMemoryRegion(slot: slot, flags: userfaultBitmap == nil ? .guestMemfd : [.guestMemfd, .userfault],
                               guestPhysicalAddress: gpa, memory: shared, guestMemfd: guestMemfd, userfaultBitmap: userfaultBitmap)
        if initiallyPrivate { try setAttributes(region, private: true) }
    }

    /// KVM_SET_MEMORY_ATTRIBUTES over `range`: private, or shared (attributes 0).
    public func setAttributes(_ range: GuestMemoryRange, private: Bool) throws(SystemError) {
        try vm.setMemoryAttributes(range, attributes: `private` ? Self.attributePrivate : 0)
    }

    /// Makes KVM_HC_MAP_GPA_RANGE exit to userspace (KVM_CAP_EXIT_HYPERCALL); refuses,
    /// naming the capability, when the kernel does not offer that exit.
    public func enableMapGPARangeExits() throws {
        let mask = UInt64(vm.check(.exitHypercall))
        guard mask & Self.exitMapGPARange != 0 else {
            throw Unavailable(description: "KVM_CAP_EXIT_HYPERCALL does not offer KVM_HC_MAP_GPA_RANGE here (mask 0x\(String(mask, radix: 16)))")
        }
        try vm.enable(.exitHypercall, args: (Self.exitMapGPARange, 0, 0, 0))
    }

    /// Gives back the private backing of `length` bytes at region offset `offset`:
    /// fallocate(PUNCH_HOLE | KEEP_SIZE) on the guest_memfd. KVM unmaps the pages; a later
    /// private access gets a fresh zeroed page.
    public func discardPrivate(offset: UInt64, length: UInt64) throws(SystemError) {
        try guestMemfd.punchHole(offset: offset, length: length)
    }

    /// Gives back the shared backing of `length` bytes at region offset `offset`:
    /// MADV_DONTNEED (anonymous) or MADV_REMOVE (memfd). A later shared access reads zeros.
    public func discardShared(offset: UInt64, length: UInt64) throws(SystemError) {
        guard offset <= shared.size, length <= shared.size - offset else {
            throw SystemError("discard shared +0x\(String(offset, radix: 16)) 0x\(String(length, radix: 16)): outside the region", errno: EINVAL)
        }
        let advice = shared.backing == .memfd ? MADV_REMOVE : MADV_DONTNEED
        let name = shared.backing == .memfd ? "MADV_REMOVE" : "MADV_DONTNEED"
        try systemCall("madvise \(name) shared backing +0x\(String(offset, radix: 16)) 0x\(String(length, radix: 16))") {
            madvise(shared.base + Int(offset), Int(length), advice)
        }
    }
}

/// A private-capable region that is not page aligned or wraps.
public struct SharingMapSetupError: Error, CustomStringConvertible {
    public let gpa: UInt64
    public let size: UInt64
    public var description: String {
        "private memory region at gpa 0x\(String(gpa, radix: 16)) size 0x\(String(size, radix: 16)): must be page aligned and non-empty"
    }
}

extension GuestMemfd {
    /// fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): frees the pages of the range
    /// (page aligned; guest_memfd refuses anything else with EINVAL).
    public func punchHole(offset: UInt64, length: UInt64) throws(SystemError) {
        try systemCall("fallocate PUNCH_HOLE guest_memfd +0x\(String(offset, radix: 16)) 0x\(String(length, radix: 16))") {
            fl_fallocate(fd.rawValue, 0x02 | 0x01, Int64(offset), Int64(length))
        }
    }
}
