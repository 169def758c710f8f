/// KVM_HC_MAP_GPA_RANGE (hypercall 12): a guest asks to make a range of its memory private
/// ("encrypted") or shared ("decrypted"). With KVM_CAP_EXIT_HYPERCALL enabled for it, KVM
/// exits to userspace with KVM_EXIT_HYPERCALL (arch/x86/kvm/x86.c, Linux 6.12):
///
/// - guest registers: rax = 12, rbx = gpa, rcx = number of 4 KiB pages, rdx = attributes;
///   in 32-bit mode each is truncated to 32 bits;
/// - KVM itself answers -KVM_EINVAL (no exit) for an unaligned gpa, zero pages or a wrapping
///   range, and -KVM_ENOSYS when the exit is not enabled, or at CPL > 0 -KVM_EPERM;
/// - the exit carries nr, args[0..2] = gpa, npages, attributes, flags bit 0 = long mode;
/// - userspace writes the result into kvm_run.hypercall.ret; on the next KVM_RUN, KVM puts
///   it in the guest's rax (truncated to 32 bits outside 64-bit mode) and skips the
///   hypercall instruction.
public enum MapGPARange {
    /// KVM_HC_MAP_GPA_RANGE
    public static let number: UInt64 = 12
    /// KVM_MAP_GPA_RANGE_ENCRYPTED: the range becomes private.
    public static let encrypted: UInt64 = 1 << 4
    /// KVM_MAP_GPA_RANGE_PAGE_SZ_4K / 2M / 1G live in the low bits (a hint; npages is in 4 KiB units).
    public static let pageSizeMask: UInt64 = 0xF
    /// Errors the guest sees (include/uapi/linux/kvm_para.h): negated, in rax.
    public static let eInval: Int64 = 22
    public static let eNoSys: Int64 = 1000
    public static let eFault: Int64 = 14
    /// KVM_EXIT_HYPERCALL_LONG_MODE in kvm_run.hypercall.flags.
    public static let longModeFlag: UInt64 = 1

    /// What the guest asked for.
    public struct Request: Equatable, Sendable {
        public var gpa: UInt64
        public var size: UInt64
        public var target: MemorySharing
    }

    /// Decodes the exit's arguments, or the error to hand back to the guest.
    public static func decode(gpa: UInt64, pages: UInt64, attributes: UInt64) -> Result<Request, ConversionError> {
        let known = pageSizeMask | encrypted
        if attributes & ~known != 0 || attributes & pageSizeMask > 2 {
            return .failure(.unknownAttributes(attributes))
        }
        guard pages > 0 else { return .failure(.empty(gpa: gpa)) }
        let (size, overflow) = pages.multipliedReportingOverflow(by: SharingMap.pageSize)
        guard !overflow else { return .failure(.overflow(gpa: gpa, size: pages)) }
        return .success(Request(gpa: gpa, size: size, target: attributes & encrypted != 0 ? .private : .shared))
    }

    /// The value for kvm_run.hypercall.ret: 0, or -errno as the guest expects it.
    public static func returnValue(_ error: ConversionError?) -> UInt64 {
        error == nil ? 0 : UInt64(bitPattern: -eInval)
    }
}
