import FaultlineCore
import FaultlineLinux

/// What pre-faulting guest RAM did (KVM_PRE_FAULT_MEMORY).
public struct PreFaultSummary: Sendable, Equatable {
    public var bytesMapped: UInt64 = 0
    public var calls = 0
    public var retries = 0
    public var milliseconds = 0.0
    /// The first error (e.g. EOPNOTSUPP without TDP); ranges after it are not attempted.
    public var error: String?

    public init() {}
}

extension MigratableVM {
    /// KVM_PRE_FAULT_MEMORY over RAM pages `ranges` (RAM page indices) through `vcpu`, which
    /// must not be in KVM_RUN (a vCPU ioctl waits for the vCPU's mutex). TDP page tables are
    /// shared by the vCPUs, so one vCPU maps them for all. Pages must be present in host
    /// memory: a missing page would fault to userfaultfd (or, on KVM Userfault, stop the
    /// loop with EFAULT).
    public func preFaultRAM(_ ranges: [Range<Int>], through vcpu: Vcpu) -> PreFaultSummary {
        var summary = PreFaultSummary()
        let t0 = MonotonicClock.nanoseconds()
        for r in ranges where !r.isEmpty {
            let range = GuestMemoryRange(start: GuestPhysicalAddress(layout.ramBase + UInt64(r.lowerBound) * 4096),
                                         size: UInt64(r.count) * 4096)!
            let outcome = vcpu.preFault(range)
            summary.bytesMapped += outcome.bytesMapped
            summary.calls += outcome.progress.calls
            summary.retries += outcome.progress.retries
            if let error = outcome.error {
                summary.error = "\(error)"
                break
            }
        }
        summary.milliseconds = Double(MonotonicClock.nanoseconds() - t0) / 1e6
        return summary
    }

    /// A vCPU that never runs guest code, in the guest's mode, for pre-faulting while the
    /// guest's own vCPUs are in KVM_RUN.
    public func makePreFaultVcpu() throws -> Vcpu {
        let vcpu = try vm.createVcpu(id: layout.vcpus)
        try enterGuestMode(vcpu)
        return vcpu
    }
}
