import CFaultlineShim
import FaultlineCore
#if canImport(Glibc)
import Glibc
#endif

extension Vcpu {
    /// The result of KVM_PRE_FAULT_MEMORY over a range: how far it got, and the error that
    /// stopped it (if any). Partial progress is normal; the error is reported, not hidden.
    public struct PreFaultOutcome: Sendable {
        public var bytesMapped: UInt64
        public var error: SystemError?
        /// The loop's account: calls, retries after EINTR/EAGAIN, why it stopped.
        public var progress: PreFaultProgress
    }

    /// KVM_PRE_FAULT_MEMORY over `range`, re-issued on what is left until all of it is mapped
    /// (``PreFaultLoop``: EINTR and EAGAIN retried, ENOENT and other errors reported with the
    /// address). EOPNOTSUPP where KVM shadows page tables (no TDP), as on nested hosts.
    public func preFault(_ range: GuestMemoryRange, shouldStop: () -> Bool = { false }) -> PreFaultOutcome {
        var lastErrno: Int32 = 0
        let progress = PreFaultLoop.run(gpa: range.start.rawValue, size: range.size, shouldStop: shouldStop) { gpa, size in
            var arg = fl_kvm_pre_fault_memory()
            arg.gpa = gpa
            arg.size = size
            let rc = fd.ioctl(FL_KVM_PRE_FAULT_MEMORY, &arg)
            gpa = arg.gpa  // the kernel copies the remaining range back, also on errors
            size = arg.size
            guard rc < 0 else { return .progressed }
            lastErrno = fl_errno()
            switch lastErrno {
            case EINTR: return .interrupted
            case EAGAIN: return .raced
            case ENOENT: return .noMemslot
            default: return .failed(errno: lastErrno)
            }
        }
        var error: SystemError?
        switch progress.stop {
        case nil:
            break
        case .noMemslot(let gpa):
            error = SystemError("KVM_PRE_FAULT_MEMORY vcpu \(id) gpa 0x\(String(gpa, radix: 16)) (no memslot there)", errno: ENOENT)
        case .failed(let code, let gpa):
            error = SystemError("KVM_PRE_FAULT_MEMORY vcpu \(id) gpa 0x\(String(gpa, radix: 16)) size \(range.size - progress.bytesMapped)",
                                errno: code)
        case .noProgress(let gpa, _, let attempts):
            error = SystemError("KVM_PRE_FAULT_MEMORY vcpu \(id) gpa 0x\(String(gpa, radix: 16)): no progress in \(attempts) calls",
                                errno: lastErrno == 0 ? EAGAIN : lastErrno)
        case .stopped(let gpa):
            error = SystemError("KVM_PRE_FAULT_MEMORY vcpu \(id) gpa 0x\(String(gpa, radix: 16)): stopped by the caller", errno: EINTR)
        case .inconsistent(let gpa, let size):
            error = SystemError("KVM_PRE_FAULT_MEMORY vcpu \(id): the kernel returned gpa 0x\(String(gpa, radix: 16)) size \(size), "
                                + "out of step with the request", errno: EIO)
        }
        return PreFaultOutcome(bytesMapped: progress.bytesMapped, error: error, progress: progress)
    }
}
