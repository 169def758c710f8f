import Atomics
import FaultlineCore
import FaultlineLinux

public struct DestinationOptions: Sendable {
    public var listen: SocketEndpoint
    /// How faults reach the page source: vcpu-exit, uffd-missing or uffd-minor.
    public var faultMode: FaultMode = .vcpuExit
    public var uffd: UffdTopology = .single
    public var readers = 1
    /// Keep the guest running this long after the migration completed (then stop).
    public var runAfterSeconds = 1.0
    /// How long to wait for a source (and, after a failed attempt, for its retry).
    public var acceptSeconds = 60.0
    public var reconnectSeconds = 30.0
    /// Before the commit, how long a silent source may keep us waiting for its next message.
    public var idleSeconds = 30.0
    /// Niceness of the vCPU threads while post-copy runs (the stream they wait for goes
    /// first); back to 0 once every page is in.
    public var vcpuNicenessDuringPostcopy: Int32 = OSThread.Niceness.vcpuDuringPostcopy
    /// While post-copy runs, the vCPU threads keep off the fault path's CPU (where there is
    /// one and another CPU is left).
    public var vcpusOffFaultCPU = true
    /// While post-copy runs, hold a PM QoS request that keeps idle CPUs within this many
    /// microseconds of waking (0: they poll instead of halting); nil, the default, makes none
    /// (``PostcopyCPULatency`` says why it is off by default).
    public var postcopyCPULatencyMicroseconds: Int32?
    /// With `preallocBytes`: install MISSING-mode bulk runs by UFFDIO_MOVE from the
    /// pre-populated pool (when the kernel has MOVE). Without it every page goes in with
    /// UFFDIO_COPY (the kernel allocates it; nothing is populated up front).
    public var usePool = true
    /// KVM_PRE_FAULT_MEMORY (TDP hosts): map the installed pages into KVM's page tables at the
    /// switch-over (before the vCPUs start) and all of RAM at the end of post-copy, ahead of
    /// the guest's first touches. Reported, never fatal (EOPNOTSUPP without TDP).
    public var preFault = false
    /// Populate this much memory before the source connects (like QEMU's -mem-prealloc).
    public var preallocBytes: UInt64 = 0
    /// Pages asked for per post-copy fault: the faulting page and the ones after it that are
    /// not here yet, up to this many (1: the faulting page only). A guest that walks memory
    /// ahead of the stream then faults once per window instead of once per page.
    public var faultAround = 16
    /// The CPU the fault-path threads share (requests out, replies in, uffd readers).
    public var faultPathCPU: FaultPathCPU = .automatic
    /// Test hook: after this page is installed in post-copy, damage one byte of it in guest memory.
    public var damageInstalledPage: Int?
    /// Test hook: the process dies (as a killed peer would) after this many pre-copy pages.
    public var exitDuringPrecopyAfterPages: Int?
    /// Test hook: fail the fault-path thread that installs the first demand reply.
    public var failFaultPathThread = false
    /// Build a guest_memfd VM (KVM_X86_SW_PROTECTED_VM, RAM in a KVM_MEM_GUEST_MEMFD memslot);
    /// the source must be one too (`--vm-type sw-protected` on both sides).
    public var guestMemfdVM = false
    /// Pages this process can read itself (a snapshot being restored): faults are served on the
    /// faulting thread, not requested from the source.
    public var localPages: LocalPageSupplier?
    /// With ``localPages``: post-copy's background fill is read here too (``LocalFill``), the
    /// working set in ``localFillFirst`` first; the source then streams nothing.
    public var localFill = false
    public var localFillFirst: [Int] = []
    /// Memory for the per-page tables, reserved ahead (``MigrationDestination/tableArena(for:)``)
    /// by a caller that knows the layout before the guest is built; nil: the build reserves it.
    public var tableArena: ZeroFilledArena?
    /// Report the pages the guest asked for, in the order of their first fault
    /// (``DestinationReport/firstTouches``).
    public var recordFirstTouches = false
    /// Builds the guest and its page mapper (nil: a KVM guest under userfaultfd).
    public var machineFactory: DestinationMachineFactory?

    public init(listen: SocketEndpoint) { self.listen = listen }

    public func validate() throws {
        guard faultAround >= 1 && faultAround <= Int(WireProtocol.maxPagesPerRequest) else {
            throw InvalidSetting(.faultAround, "must be 1...\(WireProtocol.maxPagesPerRequest) pages (got \(faultAround))")
        }
        guard (0...19).contains(vcpuNicenessDuringPostcopy) else {
            throw InvalidSetting(.postcopyVcpuNiceness, "must be 0...19 (got \(vcpuNicenessDuringPostcopy))")
        }
        guard [.vcpuExit, .uffdMissing, .uffdMinor].contains(faultMode) else {
            throw InvalidSetting(.faultMode, "must be vcpu-exit, uffd-missing or uffd-minor (got \(faultMode))")
        }
        if guestMemfdVM && faultMode == .uffdMinor {
            // No dirty log on a guest_memfd slot: guest writes are tracked by write-protecting
            // the anonymous shared view, which Faultline does for MISSING installs only.
            throw InvalidSetting(.faultMode, "must be uffd-missing or vcpu-exit (KVM Userfault) for a guest_memfd VM's destination "
                + "(got \(faultMode)): its guest writes are tracked with userfaultfd write-protect on the anonymous shared "
                + "mapping, since the kernel refuses KVM_MEM_LOG_DIRTY_PAGES on a KVM_MEM_GUEST_MEMFD memslot")
        }
    }
}

public struct DestinationReport: Sendable {
    public var faultMode: FaultMode = .vcpuExit
    /// The guest's CPU mode, as the destination read it from the announced layout.
    public var guestMode: GuestMode?
    /// vcpu-exit: how faults reached the vCPU threads (uffd-sigbus or kvm-userfault).
    public var vcpuExitMechanism: VcpuExitMechanism?
    /// vcpu-exit: faults that came back from KVM_RUN as exits (the rest of `faults`, if any,
    /// came through userfaultfd: on KVM Userfault, accesses that were not a vCPU's).
    public var vcpuExitFaults = 0
    /// With `preFault`: KVM_PRE_FAULT_MEMORY at the switch-over and at the end of post-copy.
    public var preFaultAtSwitchover: PreFaultSummary?
    public var preFaultAfterPostcopy: PreFaultSummary?
    /// The CPU latency request held while post-copy ran (nil: none was made).
    public var postcopyCPULatency: CPULatencyOutcome?
    public var totalSeconds = 0.0
    public var switchoverMilliseconds = 0.0
    /// Parts of the switch-over (first vCPU state -> running).
    public var switchoverParts: [(name: String, milliseconds: Double)] = []
    public var postcopySeconds = 0.0
    public var precopyPages = 0
    public var demandPages = 0
    public var backgroundPages = 0
    public var zeroPages = 0
    public var faults = 0
    /// Pages asked for per fault (``DestinationOptions/faultAround``).
    public var faultAround = 1
    public var corruptPagesRejected = 0
    /// Pages the bulk stream had staged and a fault (or the receiver, for a page a vCPU was
    /// waiting for) mapped from the staged bytes, with no request to the source.
    public var pagesInstalledFromStaging = 0
    /// uffd-minor: bulk runs a fault found sealed and hurried (made real-time until mapped).
    public var sealedRunsHurried = 0
    /// Stale pages kept (moved out, not freed) when dropped, and how many took a new copy.
    public var recycledPages = 0
    public var recycledPagesReused = 0
    public var reconnects = 0
    public var bytesReceived: UInt64 = 0
    public var faultLatencyMicroseconds: (p50: Double, p90: Double, p99: Double, max: Double) = (0, 0, 0, 0)
    public var vcpuStallMilliseconds: [Double] = []
    /// Demand-fault latency in power-of-two microsecond buckets ([2^N, 2^(N+1)) us), all
    /// faults and per vCPU.
    public var faultLatencyLog2: [UInt64] = []
    /// Faults that waited 1 ms or more, and the first 16 of them: ms after the first fault,
    /// how long (us), vCPU, page.
    public var slowFaultCount = 0
    public var slowFaults: [SlowFaultRecord] = []
    public var faultLatencyLog2PerVcpu: [[UInt64]] = []
    /// Attempts that failed before the commit (their state was discarded) before this one.
    public var abandonedAttempts: [String] = []
    /// True when the migration finished in post-copy (pages were still owed at the switch-over).
    public var postcopy = false
    public var digestMatch = false
    public var sourceDigest: UInt64 = 0
    public var destinationDigest: UInt64 = 0
    /// Time to compute the digest from guest memory.
    public var digestSeconds = 0.0
    /// Pages whose digest entry was read back from guest memory, and pages the guest had
    /// rewritten since they were installed (their entry is the checksum they arrived with).
    public var digestPagesFromMemory = 0
    public var digestPagesGuestWritten = 0
    public var guestMismatches = 0
    public var firstMismatch: String?
    public var passesAfterMigration: UInt64 = 0
    /// Monotonic clock (ns) when the vCPUs were started, and when every page was in (a restore
    /// measures both from its own start).
    public var guestStartedAt: UInt64 = 0
    public var everyPageInAt: UInt64 = 0
    /// When every vCPU had completed a whole pass of its program after the start (0: not all did).
    public var everyVcpuWholePassAt: UInt64 = 0
    /// With ``DestinationOptions/recordFirstTouches``: the pages faults asked for, first asked first.
    public var firstTouches: [Int] = []

    public init() {}
}

/// The destination side: listens, takes one migration attempt at a time and returns when one
/// completes. An attempt that fails before the commit is thrown away whole (guest, pages,
/// threads) and the next attempt is awaited; after the commit, a broken connection is
/// resumed and anything else is unrecoverable (reported to the source, then thrown).
public final class MigrationDestination: @unchecked Sendable {
    public let options: DestinationOptions
    let listener: ListeningSocket
    var pool: DestinationPool?

    public init(options: DestinationOptions) throws {
        try options.validate()
        self.options = options
        listener = try ListeningSocket(endpoint: options.listen)
    }

    /// No further attempt will come (the one source gave up): a wait for one ends at once.
    public func stopAccepting() { listener.shutdown() }

    /// True once an attempt has started its guest's vCPUs (from then on a failure is no longer
    /// one before the start).
    public var guestHasStarted: Bool { guestStarts.load(ordering: .relaxed) > 0 }
    let guestStarts = ManagedAtomic<Int>(0)

    /// Memory for the per-page tables a guest of `layout` writes on its fault path, reserved
    /// and being allocated in the background (nil if it cannot be mapped: the tables then use
    /// zero pages allocated on first write).
    public static func tableArena(for layout: MachineLayout) -> ZeroFilledArena? {
        // Received CRC 4, request time 8, requesting vCPU 4, staged entry 8 and its checksum 4
        // bytes a page; five tables, each rounded up to a page.
        let arena = ZeroFilledArena()
        guard (try? arena.reserve(bytes: layout.totalPages * 28 + 5 * 4096)) != nil else { return nil }
        return arena
    }

    /// The port actually bound (for `--listen :0`).
    public var endpoint: SocketEndpoint { listener.endpoint }

    /// MISSING-based modes: a pool as large as guest RAM, populated before the source pauses.
    func preparePool(ramBytes: UInt64) {
        guard options.machineFactory == nil, options.faultMode != .uffdMinor, options.usePool,
              Userfaultfd.kernelOffers(.move) else { return }
        // Room for every RAM page plus the partly used chunks of two installer threads.
        let pages = Int(ramBytes / 4096) + 8 * PageInstaller.PoolCursor.chunkPages
        if let pool, pool.pages >= pages, pool.used == 0 { return }
        pool = nil
        pool = DestinationPool(pages: pages)
    }

    /// `expecting`: the layout the source will announce, when the caller knows it (a restore):
    /// the first attempt's guest is built while the source connects, not after its hello.
    public func run(expecting expected: MachineLayout? = nil, onReady: ((SocketEndpoint) -> Void)? = nil) throws -> DestinationReport {
        var preallocated: GuestMemoryRegion?
        if options.preallocBytes > 0 {
            if options.faultMode == .uffdMinor {
                let region = try GuestMemoryRegion(backing: .memfd, size: options.preallocBytes, label: "guest-ram")
                try region.allocateFile()
                preallocated = region
            } else {
                preparePool(ramBytes: options.preallocBytes)
            }
        }
        onReady?(listener.endpoint)
        let sessions = SessionAcceptor(listener: listener)
        var prebuilt: DestinationAttempt?
        if let expected {
            let attempt = DestinationAttempt(options: options, destination: self, sessions: sessions, prepared: preallocated)
            preallocated = nil
            do { try attempt.build(layout: expected) } catch { attempt.tearDown(); throw error }
            prebuilt = attempt
        }
        var abandoned: [String] = []
        var next: SessionAcceptor.Pair
        do { next = try sessions.acceptPair(timeout: options.acceptSeconds, session: nil) } catch { prebuilt?.tearDown(); throw error }
        while true {
            let attempt = prebuilt ?? DestinationAttempt(options: options, destination: self, sessions: sessions,
                                                         prepared: preallocated)
            prebuilt = nil
            preallocated = nil  // one attempt's memory is never reused by the next
            do {
                var report = try attempt.run(bulk: next.bulk, fault: next.fault, hello: next.hello)
                report.abandonedAttempts = abandoned
                return report
            } catch let abandon as AttemptAbandoned {
                attempt.tearDown()
                abandoned.append("\(abandon.cause)")
                FaultlineLog.note("destination: attempt \(abandoned.count) failed before the switch-over (\(abandon.cause)); "
                                  + "everything it received is discarded; waiting \(Int(options.acceptSeconds)) s for a retry")
                next = try abandon.next ?? sessions.acceptPair(timeout: options.acceptSeconds, session: nil)
            } catch {
                attempt.tearDown()
                throw error
            }
        }
    }
}

/// A failed attempt before the commit (the destination discards it). `next`: the connections
/// of a new session that arrived while waiting.
struct AttemptAbandoned: Error {
    let cause: Error
    var next: SessionAcceptor.Pair?
}

/// A fault that waited 1 ms or more: when (ms after the first fault), how long (us), which
/// vCPU and page, and where the wait went: until its request left and until the source's
/// reply arrived (us after the fault; nil: not before the page went in), and whether that
/// reply or the stream installed the page.
public struct SlowFaultRecord: Sendable, Equatable {
    public var atMilliseconds: Double
    public var microseconds: Double
    public var vcpu: Int
    public var page: Int
    public var requestSentMicroseconds: Double?
    public var replyMicroseconds: Double?
    public var installedByReply: Bool
}
