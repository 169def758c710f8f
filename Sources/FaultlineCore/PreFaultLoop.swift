/// What one KVM_PRE_FAULT_MEMORY call answered, as the loop needs it (the Linux layer maps
/// errno values onto these; tests fake them).
public enum PreFaultCallResult: Equatable, Sendable {
    /// Returned 0: at least one page was processed; `gpa`/`size` point at what is left.
    case progressed
    /// EINTR: an unmasked signal is pending and no page was processed.
    case interrupted
    /// EAGAIN: a memslot update raced with the call before any page was processed.
    case raced
    /// ENOENT: `gpa` is outside the defined memslots (or in a range KVM emulates).
    case noMemslot
    /// Any other error (EOPNOTSUPP without TDP, EINVAL, EFAULT, EHWPOISON, EIO), by errno.
    case failed(errno: Int32)
}

/// Why a pre-fault loop stopped before the end of its range.
public enum PreFaultStop: Equatable, Sendable {
    /// ENOENT at `gpa`: no memslot there. Nothing after it is attempted.
    case noMemslot(gpa: UInt64)
    /// Another error at `gpa` (errno as given).
    case failed(errno: Int32, gpa: UInt64)
    /// EINTR/EAGAIN (or a 0 return without progress) `attempts` times in a row at `gpa`.
    case noProgress(gpa: UInt64, last: PreFaultCallResult, attempts: Int)
    /// The caller asked to stop (e.g. the vCPU is wanted back).
    case stopped(gpa: UInt64)
    /// The kernel moved `gpa`/`size` in a way the API does not allow (grew, or out of step).
    case inconsistent(gpa: UInt64, size: UInt64)
}

/// The result of pre-faulting one range.
public struct PreFaultProgress: Equatable, Sendable {
    public var bytesMapped: UInt64 = 0
    /// ioctl calls made, and how many of them were retried after EINTR or EAGAIN.
    public var calls = 0
    public var retries = 0
    /// nil: the whole range is mapped.
    public var stop: PreFaultStop?

    public init() {}
    public var complete: Bool { stop == nil }
}

/// The KVM_PRE_FAULT_MEMORY loop (Documentation/virt/kvm/api.rst, 6.12), pure so that a fake
/// kernel can drive it. The ioctl maps part of `[gpa, gpa+size)`, copies the remaining range
/// back into its argument, and returns 0 when at least one page was processed; the caller
/// re-issues it on what is left. EINTR (a signal pending, nothing processed) and EAGAIN (a
/// memslot update raced, nothing processed; in later api.rst tables, not 6.12's) are retried;
/// ENOENT (no memslot at `gpa`) and every other error end the loop and are reported with the
/// address. A run of `maxAttemptsWithoutProgress` calls that map nothing ends it too, so a
/// signal that stays pending (a kick) cannot spin it forever.
public enum PreFaultLoop {
    public static let maxAttemptsWithoutProgress = 64

    /// Pre-faults `[gpa, gpa+size)`. `call` is one ioctl: it updates `gpa` and `size` in place
    /// as the kernel does. `shouldStop` is asked before each call.
    public static func run(gpa start: UInt64, size: UInt64, shouldStop: () -> Bool = { false },
                           call: (_ gpa: inout UInt64, _ size: inout UInt64) -> PreFaultCallResult) -> PreFaultProgress {
        var progress = PreFaultProgress()
        var gpa = start, remaining = size
        var idle = 0
        while remaining > 0 {
            if shouldStop() {
                progress.stop = .stopped(gpa: gpa)
                return progress
            }
            let (gpaBefore, sizeBefore) = (gpa, remaining)
            let result = call(&gpa, &remaining)
            progress.calls += 1
            // The kernel advances gpa by exactly what it takes off size, never more than asked.
            guard remaining <= sizeBefore, gpa >= gpaBefore, gpa - gpaBefore == sizeBefore - remaining else {
                progress.stop = .inconsistent(gpa: gpa, size: remaining)
                return progress
            }
            let advanced = sizeBefore - remaining
            progress.bytesMapped += advanced
            idle = advanced > 0 ? 0 : idle + 1
            switch result {
            case .progressed:
                break
            case .interrupted, .raced:
                progress.retries += 1
            case .noMemslot:
                progress.stop = .noMemslot(gpa: gpa)
                return progress
            case .failed(let errno):
                progress.stop = .failed(errno: errno, gpa: gpa)
                return progress
            }
            if idle >= maxAttemptsWithoutProgress && remaining > 0 {
                progress.stop = .noProgress(gpa: gpa, last: result, attempts: idle)
                return progress
            }
        }
        return progress
    }
}
