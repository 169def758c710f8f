import FaultlineCore
import FaultlineLinux

/// What to run: the guest, the discard policy, the shared backing.
public struct PrivateMemoryRunConfig: Sendable {
    public var guest = ConversionGuest.Config()
    public var policy: DiscardPolicy = .eager
    public var sharedBacking: MemoryBacking = .anonymous
    /// The region starts private (as confidential guests' memory does).
    public var initiallyPrivate = true
    /// The run fails past this many seconds (the vCPU is kicked out of KVM_RUN).
    public var timeoutSeconds: Double = 120
    public init() {}
}

/// One readback: the kernel's view of every page (seen by the guest) against the range map.
public struct ReadbackResult: Sendable, Equatable {
    public var index: UInt32
    public var sharedPages = 0
    public var privatePages = 0
    /// Pages where the kernel's view and the range map differ, in words (first few).
    public var mismatches: [String] = []
    public var mismatchCount = 0
}

/// The outcome of a run: what the guest did, what it saw, what it cost.
public struct PrivateMemoryReport: Sendable {
    public var config: PrivateMemoryRunConfig
    public var hypercallInstruction: ConversionGuest.HypercallInstruction
    public var guestStatus: ConversionGuest.Status?
    /// Loop conversions the guest completed.
    public var guestConversions = 0
    public var exits = 0
    /// KVM_EXIT_HYPERCALL exits (conversion requests, including ones that changed nothing).
    public var hypercalls = 0
    public var seconds = 0.0
    public var costs = ConversionCosts()
    /// Time inside KVM_RUN (guest execution, exits and entries, the faults that map the
    /// converted pages again), and in userspace handling outside ioctl/discard.
    public var kvmRunNanoseconds: UInt64 = 0
    public var userspaceNanoseconds: UInt64 = 0
    /// Discards done by the final flush (lazy), included in `costs`.
    public var discardCallsAtEnd = 0
    /// Content observations the host checked exactly, how many showed the old contents
    /// (the backing survived the round trip) or zeros (it had been discarded), per state.
    public var checkedObservations = 0
    public var survivedShared = 0, zeroShared = 0, survivedPrivate = 0, zeroPrivate = 0
    public var contentMismatches: [String] = []
    public var readbacks: [ReadbackResult] = []
    public var cancelledDiscardPages: UInt64 = 0
    public var finalMap: SharingMap?
    public var lastRefusal: String?

    /// Everything checked out: the guest finished, saw what it should, and the kernel's
    /// attributes matched the range map at every readback.
    public var verified: Bool {
        guestStatus == .done && contentMismatches.isEmpty && readbacks.allSatisfy { $0.mismatchCount == 0 }
            && (!config.guest.readbacks || readbacks.count == 2)
    }

    public var conversionsPerSecond: Double { seconds > 0 ? Double(costs.conversions) / seconds : 0 }
    public var hypercallsPerSecond: Double { seconds > 0 ? Double(hypercalls) / seconds : 0 }
}

/// Runs the conversion guest in a SW-protected VM: handles KVM_HC_MAP_GPA_RANGE exits
/// (conversions), KVM_EXIT_MEMORY_FAULT (implicit conversions), and the readback ports;
/// checks every content observation against the ledger of discards.
public enum PrivateMemoryRun {
    public static func run(_ config: PrivateMemoryRunConfig) throws -> PrivateMemoryReport {
        let kvm = try KVM()
        if let why = PrivateMemoryVM.obstacle(kvm) { throw PrivateMemoryVM.Unavailable(description: why) }
        var guestConfig = config.guest
        guestConfig.hypercall = HostCPU.isAMD ? .vmmcall : .vmcall
        let guest = try ConversionGuest(guestConfig)
        let g = guest.config
        let pvm = try PrivateMemoryVM(kvm: kvm, gpa: GuestPhysicalAddress(g.regionGPA), size: g.regionPages * 4096,
                                      slot: 1, sharedBacking: config.sharedBacking, initiallyPrivate: config.initiallyPrivate)
        let low = try GuestMemoryRegion(backing: .anonymous, size: ConversionGuest.lowMemorySize, label: "private-run-low")
        guest.code.withUnsafeBytes { low.base.advanced(by: Int(ConversionGuest.codeGPA)).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        try pvm.vm.setMemoryRegion(slot: 0, guestPhysicalAddress: GuestPhysicalAddress(0), memory: low)
        try pvm.enableMapGPARangeExits()
        let vcpu = try pvm.vm.createVcpu(id: 0)
        try vcpu.enterFlatProtectedMode()
        var regs = VcpuRegisters()
        regs.rip = ConversionGuest.codeGPA
        regs.rflags = 2
        try vcpu.setRegisters(regs)

        let map = try SharingMap(memory: pvm.region, initial: config.initiallyPrivate ? .private : .shared)
        let controller = ConversionController(map: map, policy: config.policy, kernel: pvm, clock: MonotonicClock.nanoseconds)
        var report = PrivateMemoryReport(config: config, hypercallInstruction: guestConfig.hypercall)
        let mailbox = low.base.advanced(by: Int(ConversionGuest.mailboxGPA))
        func word(_ offset: Int) -> UInt32 { mailbox.load(fromByteOffset: offset, as: UInt32.self) }

        let watchdog = Watchdog(vcpu: vcpu, seconds: config.timeoutSeconds)
        defer { watchdog.stop() }
        vcpu.bindToCurrentThread()
        defer { vcpu.unbindThread() }
        var checkedPhase = 0
        let start = MonotonicClock.nanoseconds()
        loop: while true {
            let t0 = MonotonicClock.nanoseconds()
            let exit = try vcpu.runOnce()
            let t1 = MonotonicClock.nanoseconds()
            report.kvmRunNanoseconds += t1 - t0
            report.exits += 1
            let before = controller.costs
            switch exit {
            case .hypercall(let number, let gpa, let pages, let attributes, _):
                report.hypercalls += 1
                guard number == MapGPARange.number else {
                    vcpu.completeHypercall(returning: UInt64(bitPattern: -MapGPARange.eNoSys))
                    break
                }
                let phase = Int(word(ConversionGuest.Mailbox.phase))
                if phase == checkedPhase + 1 && !g.baseline {
                    checkPhase(phase, guest: guest, controller: controller, word: word, report: &report)
                    checkedPhase = phase
                }
                vcpu.completeHypercall(returning: try controller.mapGPARange(gpa: gpa, pages: pages, attributes: attributes))
            case .io(let port, _, _, true) where port == UInt16(ConversionGuest.readbackRequestPort):
                let r = vcpu.ioData.load(as: UInt32.self)
                for page in 0..<g.regionPages {
                    pvm.shared.base.storeBytes(of: ConversionGuest.marker(readback: r, page: page),
                                               toByteOffset: Int(page * 4096) + ConversionGuest.markerOffset, as: UInt32.self)
                }
            case .io(let port, _, _, true) where port == UInt16(ConversionGuest.readbackDonePort):
                let r = vcpu.ioData.load(as: UInt32.self)
                report.readbacks.append(compareReadback(r, pages: g.regionPages, map: controller.map, word: word))
            case .memoryFault(let address, let size, let flags):
                try controller.memoryFault(gpa: address.rawValue, size: size, flags: flags)
            case .hlt:
                break loop
            case .interrupted:
                if watchdog.fired {
                    throw MemoryFaultRefusal(description: "private-memory run: the guest did not finish within \(config.timeoutSeconds) s "
                        + "(\(word(ConversionGuest.Mailbox.phase)) of \(g.conversions) conversions)")
                }
                vcpu.clearKick()
            default:
                throw MemoryFaultRefusal(description: "private-memory run: unexpected exit \(exit) after \(report.exits) exits")
            }
            let after = controller.costs
            let handled = MonotonicClock.nanoseconds() - t1
            let kernelParts = (after.attributeNanoseconds - before.attributeNanoseconds) + (after.discardNanoseconds - before.discardNanoseconds)
            report.userspaceNanoseconds += handled > kernelParts ? handled - kernelParts : 0
        }
        let callsBefore = controller.costs.discardCalls
        try controller.flush()
        report.discardCallsAtEnd = controller.costs.discardCalls - callsBefore
        report.seconds = Double(MonotonicClock.nanoseconds() - start) / 1e9
        report.guestStatus = ConversionGuest.Status(rawValue: word(ConversionGuest.Mailbox.status))
        report.guestConversions = Int(word(g.baseline ? ConversionGuest.Mailbox.baselineCount : ConversionGuest.Mailbox.phase))
        if report.guestStatus == .hypercallFailed {
            let ret = Int32(bitPattern: word(ConversionGuest.Mailbox.lastResult))
            report.contentMismatches.append("the guest's KVM_HC_MAP_GPA_RANGE returned \(ret) after \(report.guestConversions) conversions"
                + (controller.lastRefusal.map { " (\($0))" } ?? ""))
        }
        if report.guestStatus == .contentMismatch {
            report.contentMismatches.append("the guest saw 0x\(String(word(ConversionGuest.Mailbox.observed), radix: 16)) / "
                + "0x\(String(word(ConversionGuest.Mailbox.observedLast), radix: 16)) after conversion \(report.guestConversions + 1): "
                + "neither zero nor what it last wrote")
        }
        report.costs = controller.costs
        report.cancelledDiscardPages = controller.planner.cancelledPages
        report.finalMap = controller.map
        report.lastRefusal = controller.lastRefusal
        withExtendedLifetime((pvm, low)) {}
        return report
    }

    /// The exact check of phase `j`'s observation: the ledger knows what the buffer's backing
    /// must show (the last value written there, or 0 after a discard).
    static func checkPhase(_ j: Int, guest: ConversionGuest, controller: ConversionController,
                           word: (Int) -> UInt32, report: inout PrivateMemoryReport) {
        let state = ConversionGuest.target(ofPhase: j)
        let page = guest.config.bufferPage
        let observed = word(ConversionGuest.Mailbox.observed)
        let expected = controller.ledger.expected(page: page, backing: state)
        report.checkedObservations += 1
        if observed != expected {
            if report.contentMismatches.count < 5 {
                report.contentMismatches.append("conversion \(j) to \(state): the buffer showed 0x\(String(observed, radix: 16)), "
                    + "expected 0x\(String(expected, radix: 16)) (\(expected == 0 ? "discarded" : "kept"))")
            }
        } else {
            switch (state, observed != 0) {
            case (.shared, true): report.survivedShared += 1
            case (.shared, false): report.zeroShared += 1
            case (.private, true): report.survivedPrivate += 1
            case (.private, false): report.zeroPrivate += 1
            }
        }
        controller.ledger.wrote(page: page, backing: state, value: word(ConversionGuest.Mailbox.written))
    }

    /// Readback `r`: a page is shared in the kernel's view exactly when the guest read the
    /// marker the host had just written into its shared backing.
    static func compareReadback(_ r: UInt32, pages: UInt64, map: SharingMap, word: (Int) -> UInt32) -> ReadbackResult {
        var result = ReadbackResult(index: r)
        for page in 0..<pages {
            let seen = word(ConversionGuest.Mailbox.readback + Int(page) * 4)
            let kernel: MemorySharing = seen == ConversionGuest.marker(readback: r, page: page) ? .shared : .private
            if kernel == .shared { result.sharedPages += 1 } else { result.privatePages += 1 }
            let believed = map.state(ofPage: page)
            let anomaly = kernel == .private && seen != 0
            if kernel != believed || anomaly {
                result.mismatchCount += 1
                if result.mismatches.count < 5 {
                    result.mismatches.append("page \(page): kernel maps it \(kernel) (read 0x\(String(seen, radix: 16))), "
                        + "range map says \(believed.map { "\($0)" } ?? "nothing")")
                }
            }
        }
        return result
    }
}

/// Kicks the vCPU out of KVM_RUN once `seconds` have passed, unless stopped first.
final class Watchdog: @unchecked Sendable {
    private let condition = TimedCondition()
    private var stopped = false
    private var didFire = false
    private var thread: OSThread?

    init(vcpu: Vcpu, seconds: Double) {
        thread = try? OSThread(name: "private-run watchdog") { [self] in
            let done = condition.wait(timeoutNanoseconds: UInt64(seconds * 1e9)) { stopped }
            if !done {
                condition.withLock { didFire = true }
                vcpu.kick()
            }
        }
    }

    var fired: Bool { condition.withLock { didFire } }

    func stop() {
        condition.withLock { stopped = true }
        condition.broadcast()
        thread?.join()
    }
}
