import Atomics
import FaultlineCore
import FaultlineLinux
import Histogram

/// The outcome of one demand-paging run: the kernel selftest's figures, the C reference's
/// JSON keys, latency percentiles and the verification verdict.
public struct DemandPagingResult: Sendable {
    public var config: DemandPagingConfig
    public var backend: ExecutionBackend
    public var seconds: Double
    public var pages: Int
    public var resolved: Int
    public var raced: Int
    public var badPages: Int
    public var checksumFailures: Int
    /// Fault service latency in microseconds (fault seen -> page installed): p50, p90, p99, max.
    public var latencyMicroseconds: (p50: Double, p90: Double, p99: Double, max: Double)
    public var faultsMeasured: UInt64
    /// vcpu-exit: how faults reached the vCPU threads (nil in other modes).
    public var vcpuExitMechanism: VcpuExitMechanism?
    /// vcpu-exit on KVM Userfault: faults that came through the userfaultfd behind it (accesses
    /// the userfault bitmap did not catch; 0 when every fault was a KVM Userfault exit).
    public var uffdFallbackFaults = 0

    public var pagesPerSecondPerVcpu: Double { Double(pages) / Double(config.vcpus) / seconds }
    public var pagesPerSecond: Double { Double(pages) / seconds }
    public var verified: Bool { badPages == 0 && checksumFailures == 0 }
}

public enum DemandPagingError: Error, CustomStringConvertible {
    case unexpectedExit(vcpu: Int, exit: VcpuExit)
    case threadFailed(String)
    case kernelLacks(String)

    public var description: String {
        switch self {
        case .unexpectedExit(let v, let e): return "vcpu \(v): unexpected exit \(e)"
        case .threadFailed(let s): return s
        case .kernelLacks(let s): return s
        }
    }

    /// `error` as raised on vCPU `vcpu`'s thread, named once ("vcpu 1: ..."): an error that
    /// names its vCPU already is not prefixed again.
    public static func onVcpu(_ vcpu: Int, _ error: Error) -> String {
        let text = "\(error)"
        return text.hasPrefix("vcpu \(vcpu): ") ? text : "vcpu \(vcpu): \(text)"
    }
}

/// Collects the first error raised by any thread of a run and tells the others to stop.
final class RunControl: @unchecked Sendable {
    let stopping = ManagedAtomic(false)
    private let failures = Locked<[String]>([])
    var errors: [String] { failures.withLock { $0 } }
    var onFailure: (() -> Void)?

    func fail(_ message: String) {
        let first = failures.withLock { errors in
            errors.append(message)
            return errors.count == 1
        }
        stopping.store(true, ordering: .sequentiallyConsistent)
        if first { onFailure?() }
    }
}

/// Runs the demand-paging experiment: N vCPUs (real or software) each touch every page of
/// their own chunk of guest RAM while faults are resolved from a page source by the chosen
/// mode; afterwards every page is verified.
public final class DemandPagingBenchmark {
    public let config: DemandPagingConfig
    public let backend: ExecutionBackend
    /// vcpu-exit: how faults reach the vCPU threads here (nil in other modes).
    public let vcpuExitMechanism: VcpuExitMechanism?

    /// `probe`: what this kernel does with a vCPU fault (this process's probe by default).
    /// `modeOption`: how a refusal names the mode setting (a front end's spelling of it).
    public init(config: DemandPagingConfig, probe: @autoclosure () -> VcpuFaultProbe = .current, modeOption: String = "mode") throws {
        try config.validate()
        var mechanism: VcpuExitMechanism?
        if config.mode == .vcpuExit {
            mechanism = .sigbusExit  // software vCPUs: SIGBUS on the faulting thread
            if config.backend == .kvm {
                // Refused up front where KVM_RUN cannot say which page a vCPU fault wants (TDP
                // without KVM Userfault).
                let p = probe()
                _ = try FaultModeSelection.resolve(requested: .explicit(.vcpuExit), option: modeOption, offerAuto: false, probe: p)
                mechanism = FaultModeSelection.vcpuExitMechanism(probe: p)
            }
        }
        self.config = config
        self.backend = config.backend
        self.vcpuExitMechanism = mechanism
    }

    static let codeRegionSize: UInt64 = 0x10000

    /// A VM whose slot 0 holds the workload's program (RAM is the caller's slot 1).
    static func workloadVM(_ workload: GuestWorkload) throws -> VirtualMachine {
        let machine = try KVM().createVM()
        let low = try GuestMemoryRegion(backing: .anonymous, size: codeRegionSize, label: "guest-code")
        let code = try workload.program()
        code.withUnsafeBytes { low.base.advanced(by: Int(GuestWorkload.codeAddress)).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        try machine.setMemoryRegion(slot: 0, guestPhysicalAddress: GuestPhysicalAddress(0), memory: low)
        return machine
    }

    public func run() throws -> DemandPagingResult {
        let cfg = config
        let total = cfg.totalBytes
        let workload = try GuestWorkload(pattern: cfg.pattern, pagesPerVcpu: cfg.pagesPerVcpu)
        let source = try LocalPageSource(size: total, delayMicroseconds: cfg.delayMicroseconds)
        let backing = MemoryBacking(rawValue: cfg.effectiveBacking.rawValue)!

        // KVM objects (kvm backend only). The VM keeps the memory of its memslots alive.
        var vm: VirtualMachine?
        if backend == .kvm { vm = try Self.workloadVM(workload) }
        let region = try GuestMemoryRegion(backing: backing, size: total, vm: vm)
        switch cfg.mode {
        case .prefilled: region.base.copyMemory(from: source.base, byteCount: Int(total))
        case .uffdMinor: try region.allocateFile()
        default: break
        }
        // KVM Userfault: the resolver's page bitmap is the memslot's userfault bitmap (stored
        // with a set bit = missing; installing a page clears its bit with a store-release).
        let kvmUserfault = vm != nil && vcpuExitMechanism == .kvmUserfault
        let present = PageBitmap(count: Int(total / backing.pageSize), polarity: kvmUserfault ? .setMeansMissing : .setMeansPresent)
        if let vm {
            var flags: MemslotFlags = backing == .guestMemfd ? .guestMemfd : []
            if kvmUserfault { flags.insert(.userfault) }  // set at creation, never toggled
            try vm.setMemoryRegion(slot: 1, flags: flags,
                                   guestPhysicalAddress: GuestPhysicalAddress(DemandPagingConfig.ramBase), memory: region,
                                   guestMemfd: region.guestMemfd, userfaultBitmap: kvmUserfault ? UnsafeRawPointer(present.words) : nil)
        }

        let resolver = FaultResolver(region: region, source: source, present: present,
                                     method: cfg.mode == .uffdMinor ? .writeThenContinue : .copy)
        let control = RunControl()

        // userfaultfds and their ranges.
        var uffds: [(Userfaultfd, UInt64, UInt64)] = []  // fd, offset, length
        if cfg.mode.usesUserfaultfd {
            var features: UffdFeatures = []
            var mode: UffdRegisterMode = .missing
            switch (cfg.mode, backing) {
            case (.uffdMinor, .hugetlb): features = .minorHugetlbfs; mode = .minor
            case (.uffdMinor, _): features = .minorShmem; mode = .minor
            case (.vcpuExit, _) where kvmUserfault: break
            case (.vcpuExit, _): features = .sigbus
            case (_, .hugetlb): features = .missingHugetlbfs
            case (_, .memfd): features = .missingShmem
            default: break
            }
            let n = cfg.uffdCount
            for i in 0..<n {
                let offset = n == 1 ? 0 : UInt64(i) * cfg.bytesPerVcpu
                let length = n == 1 ? total : cfg.bytesPerVcpu
                let flags: Userfaultfd.OpenFlags = backend == .soft ? [.nonBlocking, .userModeOnly] : [.nonBlocking]
                let uffd = try Userfaultfd(required: features, flags: flags, label: "uffd \(i)")
                try uffd.register(start: region.hostAddress.adding(offset)!, length: length, mode: mode)
                uffds.append((uffd, offset, length))
            }
        }
        // On any failure: unregister every range, which wakes all faulting threads (they
        // then see plain memory and finish; verification reports the damage), and kick vCPUs.
        let vcpuHandles = Locked<[Vcpu?]>(Array(repeating: nil, count: cfg.vcpus))
        control.onFailure = { [uffds] in
            for (uffd, offset, length) in uffds { try? uffd.unregister(start: region.hostAddress.adding(offset)!, length: length) }
            vcpuHandles.withLock { for v in $0 { v?.kick() } }
        }

        // Handler threads (uffd-missing / uffd-minor).
        let stop = try EventFD()  // each reader holds it: it is closed after the last one ends
        var readerStates: [FaultThreadState] = []
        var readers: [OSThread] = []
        // KVM Userfault: one reader on the userfaultfd behind it (non-vCPU accesses).
        var fallbackStates: [FaultThreadState] = []
        if kvmUserfault, let (uffd, _, _) = uffds.first {
            let state = FaultThreadState(pageSize: Int(backing.pageSize))
            fallbackStates.append(state)
            readers.append(try OSThread(name: "uffd fallback reader") {
                try? KickSignal.blockInCurrentThread()
                Self.readerLoop(uffd: uffd, stopFD: stop.fd, resolver: resolver, state: state, control: control)
            })
        }
        if cfg.mode.hasReaders {
            for (index, entry) in uffds.enumerated() {
                for r in 0..<cfg.readers {
                    let state = FaultThreadState(pageSize: Int(backing.pageSize))
                    readerStates.append(state)
                    let uffd = entry.0
                    readers.append(try OSThread(name: "uffd \(index) reader \(r)") {
                        try? KickSignal.blockInCurrentThread()
                        Self.readerLoop(uffd: uffd, stopFD: stop.fd, resolver: resolver, state: state, control: control)
                    })
                }
            }
        }

        // vCPUs.
        let vcpuStates = (0..<cfg.vcpus).map { _ in FaultThreadState(pageSize: Int(backing.pageSize)) }
        let checksums = UnsafeMutableBufferPointer<UInt32>.allocate(capacity: cfg.vcpus)
        checksums.initialize(repeating: 0)
        defer { checksums.deallocate() }
        let exitUffd = cfg.mode == .vcpuExit ? uffds.first?.0 : nil
        if backend == .soft && cfg.mode == .vcpuExit { try? SigbusResolver.installHandler() }

        let start = MonotonicClock.nanoseconds()
        var threads: [OSThread] = []
        for id in 0..<cfg.vcpus {
            let state = vcpuStates[id]
            let body: () -> Void
            if let vm {
                body = {
                    do {
                        let vcpu = try vm.createVcpu(id: id)
                        vcpuHandles.withLock { $0[id] = vcpu }
                        checksums[id] = try Self.runKVMVcpu(vcpu, id: id, config: cfg, workload: workload, region: region,
                                                            resolver: resolver, exitUffd: exitUffd, state: state, control: control)
                    } catch {
                        control.fail(DemandPagingError.onVcpu(id, error))
                    }
                }
            } else {
                body = {
                    checksums[id] = Self.runSoftVcpu(id: id, config: cfg, workload: workload, region: region,
                                                     resolver: resolver, exitUffd: exitUffd, state: state, control: control)
                }
            }
            do {
                threads.append(try OSThread(name: "vcpu \(id)", body))
            } catch {
                control.fail("\(error)")
                break
            }
        }
        for t in threads { t.join() }
        let elapsed = Double(MonotonicClock.nanoseconds() - start) / 1e9

        stop.signal()
        for t in readers { t.join() }
        if let first = control.errors.first { throw DemandPagingError.threadFailed(first) }

        // Verification: every page, after the run.
        let (bad, checksumFailures) = verify(region: region, workload: workload, checksums: checksums)
        var merged = Histogram<UInt32>(lowestDiscernibleValue: 1, highestTrackableValue: 120_000_000_000,
                                       numberOfSignificantValueDigits: .two)
        var resolved = 0, raced = 0
        for s in readerStates + fallbackStates + vcpuStates {
            merged.add(s.latency)
            resolved += s.resolved
            raced += s.raced
        }
        let us = { (p: Double) in Double(merged.valueAtPercentile(p)) / 1000 }
        return DemandPagingResult(
            config: cfg, backend: backend, seconds: elapsed, pages: Int(total / 4096), resolved: resolved, raced: raced,
            badPages: bad, checksumFailures: checksumFailures,
            latencyMicroseconds: merged.totalCount == 0 ? (0, 0, 0, 0) : (us(50), us(90), us(99), Double(merged.max) / 1000),
            faultsMeasured: merged.totalCount, vcpuExitMechanism: vcpuExitMechanism,
            uffdFallbackFaults: fallbackStates.reduce(0) { $0 + $1.resolved + $1.raced })
    }

    // MARK: handler threads

    static func readerLoop(uffd: Userfaultfd, stopFD: Int32, resolver: FaultResolver, state: FaultThreadState,
                           control: RunControl) {
        var events = UffdEventBuffer(capacity: 16)
        let base = resolver.region.hostAddress.rawValue
        do {
            while try uffd.waitReadable(orStop: stopFD) {
                let n = try uffd.readEvents(into: &events)
                for i in 0..<n {
                    guard case .pagefault(let address, _, _) = events[i] else { continue }
                    try resolver.resolve(offset: address.rawValue &- base, uffd: uffd, wake: true, state: state)
                }
            }
        } catch {
            control.fail("\(uffd.label) handler: \(error)")
        }
    }

    // MARK: vCPUs

    /// Runs one KVM vCPU to HLT, resolving its own faults in vcpu-exit mode. Returns edx
    /// (the read workload's checksum).
    static func runKVMVcpu(_ vcpu: Vcpu, id: Int, config: DemandPagingConfig, workload: GuestWorkload,
                           region: GuestMemoryRegion, resolver: FaultResolver, exitUffd: Userfaultfd?,
                           state: FaultThreadState, control: RunControl) throws -> UInt32 {
        try vcpu.enterFlatProtectedMode()
        var regs = VcpuRegisters()
        let chunk = DemandPagingConfig.ramBase + UInt64(id) * config.bytesPerVcpu
        regs.rip = GuestWorkload.codeAddress
        regs.rflags = 2
        regs.rsi = chunk
        regs.rdi = chunk + config.bytesPerVcpu
        regs.rax = UInt64(GuestWorkload.storeValue(forVcpu: id))
        regs.rbp = UInt64(workload.seed(forVcpu: id))
        try vcpu.setRegisters(regs)
        vcpu.bindToCurrentThread()
        defer { vcpu.unbindThread() }
        let ramBase = DemandPagingConfig.ramBase
        let ramSize = region.size
        while true {
            let exit = try vcpu.runOnce()
            switch exit {
            case .hlt:
                return UInt32(truncatingIfNeeded: try vcpu.registers().rdx)
            case .interrupted:
                vcpu.clearKick()
                if control.stopping.load(ordering: .relaxed) { return 0 }
            default:
                guard let uffd = exitUffd,
                      try completeRAMAccess(exit, vcpu: vcpu, ramBase: ramBase, ram: region.base, ramSize: ramSize,
                                            resolve: { try resolver.resolve(offset: $0, uffd: uffd, wake: false, state: state) })
                else { throw DemandPagingError.unexpectedExit(vcpu: id, exit: exit) }
            }
        }
    }

    /// A software vCPU: the same page order with plain loads and stores on guest RAM.
    /// In vcpu-exit mode a missing page raises SIGBUS on this thread, and the handler
    /// resolves it here, on the faulting thread.
    static func runSoftVcpu(id: Int, config: DemandPagingConfig, workload: GuestWorkload, region: GuestMemoryRegion,
                            resolver: FaultResolver, exitUffd: Userfaultfd?, state: FaultThreadState,
                            control: RunControl) -> UInt32 {
        let order = workload.pageOrder(forVcpu: id)
        let chunk = region.base + id * Int(config.bytesPerVcpu)
        let value = GuestWorkload.storeValue(forVcpu: id)
        let touch = { () -> UInt32 in
            var sum: UInt32 = 0
            if workload.writes {
                for page in order { (chunk + page * 4096).storeBytes(of: value, as: UInt32.self) }
            } else {
                for page in order { sum &+= (chunk + page * 4096).load(as: UInt32.self) }
            }
            return sum
        }
        guard let exitUffd else { return touch() }
        let context = SoftFaultContext(resolver: resolver, uffd: exitUffd, state: state, control: control)
        return SigbusResolver { context.handle(address: $0) }.whileRegistered(touch)
    }

    // MARK: verification

    func verify(region: GuestMemoryRegion, workload: GuestWorkload, checksums: UnsafeMutableBufferPointer<UInt32>) -> (Int, Int) {
        let cfg = config
        var bad = 0
        let pagesPerVcpu = cfg.pagesPerVcpu
        let zeroRest = cfg.mode == .none
        for page in 0..<Int(cfg.totalBytes / 4096) {
            let words = (region.base + page * 4096).assumingMemoryBound(to: UInt32.self)
            let vcpu = page / pagesPerVcpu
            let first = workload.writes ? GuestWorkload.storeValue(forVcpu: vcpu)
                                        : (zeroRest ? 0 : SourcePattern.word(page: page, word: 0))
            if words[0] != first { bad += 1; continue }
            for w in 1..<1024 where words[w] != (zeroRest ? 0 : SourcePattern.word(page: page, word: w)) {
                bad += 1
                break
            }
        }
        var checksumFailures = 0
        if !workload.writes {
            for id in 0..<cfg.vcpus {
                let firstWords = (0..<pagesPerVcpu).map { zeroRest ? 0 : SourcePattern.word(page: id * pagesPerVcpu + $0, word: 0) }
                if checksums[id] != GuestWorkload.expectedReadChecksum(firstWords: firstWords) { checksumFailures += 1 }
            }
        }
        return (bad, checksumFailures)
    }
}

/// What the SIGBUS handler of a software vCPU needs. Resolving runs inside a signal
/// handler: it only fetches, ioctls and updates atomics - no allocation, no locks.
final class SoftFaultContext {
    let resolver: FaultResolver
    let uffd: Userfaultfd
    let state: FaultThreadState
    let control: RunControl
    let base: UInt64
    let size: UInt64

    init(resolver: FaultResolver, uffd: Userfaultfd, state: FaultThreadState, control: RunControl) {
        self.resolver = resolver
        self.uffd = uffd
        self.state = state
        self.control = control
        self.base = resolver.region.hostAddress.rawValue
        self.size = resolver.region.size
    }

    /// True when the page is there now (the access is retried).
    func handle(address: UInt64) -> Bool {
        guard address >= base, address - base < size else { return false }
        do {
            try resolver.resolve(offset: address - base, uffd: uffd, wake: false, state: state)
            return true
        } catch {
            return false
        }
    }
}
