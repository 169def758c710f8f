import FaultlineCore
import FaultlineLinux

/// One run of the pre-fault benchmark: a guest writes to every page of a region whose host
/// pages are already there (as after a migration: installed, but not in KVM's page tables),
/// with or without KVM_PRE_FAULT_MEMORY first.
public struct PreFaultRun: Sendable {
    public var preFaulted: Bool
    public var pages: Int
    /// KVM_PRE_FAULT_MEMORY over the region (0 without it).
    public var preFaultSeconds: Double
    public var preFaultCalls: Int
    public var preFaultRetries: Int
    /// The guest's first touch of every page: KVM_RUN until HLT.
    public var touchSeconds: Double
    /// Every page holds what the guest wrote.
    public var verified: Bool

    public var touchNanosecondsPerPage: Double { touchSeconds * 1e9 / Double(pages) }
}

/// `faultline bench prefault`: the first-touch cost of a region with and without
/// KVM_PRE_FAULT_MEMORY. Refused where the kernel answers EOPNOTSUPP (shadow
/// paging, as on nested hosts without TDP).
public enum PreFaultBenchmark {
    public struct Refused: Error, CustomStringConvertible { public let description: String }

    /// Why KVM_PRE_FAULT_MEMORY cannot work here, or nil (asked before anything runs).
    public static func obstacle() -> String? {
        do {
            let kvm = try KVM()
            if kvm.check(.preFaultMemory) == 0 {
                return "KVM_CAP_PRE_FAULT_MEMORY is 0: KVM_PRE_FAULT_MEMORY answers EOPNOTSUPP on this kernel (KVM shadows "
                    + "the page tables, no TDP - as with nested KVM here); run inside the rig: rig/run -- faultline bench prefault"
            }
            return nil
        } catch {
            return "\(error)"
        }
    }

    /// Runs one VM of `bytes` of RAM (one vCPU), pre-faulted or not. The RAM is in 4 KiB pages
    /// (as after a post-copy, which installs page by page) unless `transparentHugePages`.
    public static func run(bytes: UInt64, preFault: Bool, transparentHugePages: Bool = false) throws -> PreFaultRun {
        let pages = Int(bytes / 4096)
        let workload = try GuestWorkload(pattern: .sequential, pagesPerVcpu: pages)
        let vm = try DemandPagingBenchmark.workloadVM(workload)
        let ram = try GuestMemoryRegion(backing: .anonymous, size: bytes, label: "guest-ram")
        if !transparentHugePages { try ram.disableTransparentHugePages() }
        for page in 0..<pages { (ram.base + page * 4096).storeBytes(of: 0xFFFF_FFFF, as: UInt32.self) }  // host pages present
        try vm.setMemoryRegion(slot: 1, guestPhysicalAddress: GuestPhysicalAddress(DemandPagingConfig.ramBase), memory: ram)
        let vcpu = try vm.createVcpu(id: 0)
        try vcpu.enterFlatProtectedMode()
        var regs = VcpuRegisters()
        regs.rip = GuestWorkload.codeAddress
        regs.rflags = 2
        regs.rsi = DemandPagingConfig.ramBase
        regs.rdi = DemandPagingConfig.ramBase + bytes
        regs.rax = UInt64(GuestWorkload.storeValue(forVcpu: 0))
        try vcpu.setRegisters(regs)

        var run = PreFaultRun(preFaulted: preFault, pages: pages, preFaultSeconds: 0, preFaultCalls: 0, preFaultRetries: 0,
                              touchSeconds: 0, verified: false)
        if preFault {
            let t0 = MonotonicClock.nanoseconds()
            let outcome = vcpu.preFault(GuestMemoryRange(start: GuestPhysicalAddress(DemandPagingConfig.ramBase), size: bytes)!)
            run.preFaultSeconds = Double(MonotonicClock.nanoseconds() - t0) / 1e9
            run.preFaultCalls = outcome.progress.calls
            run.preFaultRetries = outcome.progress.retries
            if let error = outcome.error {
                if error.code == .notSupported {
                    throw Refused(description: "\(error): this kernel cannot pre-fault (KVM shadows the page tables: no TDP, "
                                  + "as with nested KVM here); run inside the rig: rig/run -- faultline bench prefault")
                }
                throw error
            }
        }
        vcpu.bindToCurrentThread()
        defer { vcpu.unbindThread() }
        let t0 = MonotonicClock.nanoseconds()
        while true {
            let exit = try vcpu.runOnce()
            if exit == .hlt { break }
            if exit == .interrupted { vcpu.clearKick(); continue }
            throw DemandPagingError.unexpectedExit(vcpu: 0, exit: exit)
        }
        run.touchSeconds = Double(MonotonicClock.nanoseconds() - t0) / 1e9
        let value = GuestWorkload.storeValue(forVcpu: 0)
        run.verified = (0..<pages).allSatisfy { (ram.base + $0 * 4096).load(as: UInt32.self) == value }
        withExtendedLifetime((vm, ram)) {}
        return run
    }
}
