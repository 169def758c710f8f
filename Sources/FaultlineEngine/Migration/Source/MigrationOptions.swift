import FaultlineCore
import FaultlineLinux

/// How the source migrates.
public struct MigrationOptions: Sendable {
    public var destination: SocketEndpoint
    /// The most pre-copy rounds with dirty logging before the switch-over (0 = none).
    public var precopyRounds = 0
    /// Upper bound on the time spent in pre-copy.
    public var precopySeconds = 10.0
    /// never | auto | always (see ``PostcopyPolicy``).
    public var postcopy: PostcopyPolicy = .auto
    /// The downtime target the convergence policy compares its estimate with.
    public var maxDowntimeMilliseconds = 300.0
    /// Attempts after the first when one fails before the switch-over.
    public var retries = 0
    /// Pause between a failed attempt and the next.
    public var retryDelaySeconds = 1.0
    /// Pages per bulk message.
    public var batchPages = 64
    /// How long to keep trying to reconnect after the connection breaks in post-copy.
    public var reconnectSeconds = 30.0
    /// Before the commit: how long the destination may leave a send or an answer hanging
    /// before the attempt is abandoned (the guest keeps running here).
    public var peerTimeoutSeconds = 10.0
    /// Fault injection for tests: cut both connections once, after this many background pages.
    public var disconnectAfterPages: Int?
    /// Fault injection for tests: cut both connections during pre-copy, after this many pages.
    public var disconnectDuringPrecopyAfterPages: Int?
    /// Fault injection for tests: cut both connections just before the commit is sent (the
    /// destination cannot tell whether the source committed until it reconnects).
    public var disconnectAtCommit = false
    /// Fault injection for tests: corrupt the data of one background page after its checksum.
    public var corruptOnePage = false
    /// Fault injection for tests: corrupt the data of one pre-copy page after its checksum.
    public var corruptOnePrecopyPage = false
    /// Fault injection for tests: leave one page the guest changed after pre-copy sent it out
    /// of the final dirty set, as a dirty log that missed a write would.
    public var missOneDirtyPage = false
    /// Fault injection for tests: send a page request's worth of protocol violation after the
    /// commit (a page index outside memory on the bulk connection).
    public var violateProtocolAfterCommit = false
    /// Test hook: after the commit, hold the background stream until the fault server has
    /// served this many demand pages (at most 10 s), so that demand faults are certain to be
    /// answered on the fault connection rather than overtaken by the stream.
    public var holdStreamUntilDemandPages: Int?
    /// Post-copy's background stream sends these pages first, in this order (a recorded
    /// working set, replayed), then everything else in address order.
    public var streamFirst: [Int] = []
    /// Post-copy's background stream starts this long after the commit: until then every page
    /// the guest touches is asked for, so the faults record its first touches.
    public var streamDelaySeconds = 0.0
    /// Post-copy sends no background stream: the destination reads the pages itself (a
    /// restore in the snapshot's own process). Requests are still answered.
    public var noBackgroundStream = false
    /// The CPU the fault server runs on (see ``FaultPathCPU``).
    public var faultPathCPU: FaultPathCPU = .automatic
    /// While post-copy runs, hold a PM QoS request that keeps idle CPUs within this many
    /// microseconds of waking (0: they poll instead of halting); nil, the default, makes none
    /// (``PostcopyCPULatency`` says why it is off by default).
    public var postcopyCPULatencyMicroseconds: Int32?
    /// Skip pre-copy and stop-and-copy at once, for this reason (a guest_memfd VM whose RAM
    /// slot cannot log dirty pages, asked for `--postcopy never`: GuestMemfdMigrationPlanner).
    public var immediateStopAndCopy: String?
    /// Told how post-copy's background stream goes: every 4096 pages it sends, and once at the
    /// end. Called on the stream's thread: it must return quickly.
    public var progress: (@Sendable (MigrationProgress) -> Void)?

    public init(destination: SocketEndpoint) { self.destination = destination }
}

/// How far post-copy has come: pages the destination has (sent or installed) of all of them.
public struct MigrationProgress: Sendable, Equatable {
    public var pagesDone: Int
    public var pagesTotal: Int
    public var finished: Bool

    public init(pagesDone: Int, pagesTotal: Int, finished: Bool) {
        self.pagesDone = pagesDone
        self.pagesTotal = pagesTotal
        self.finished = finished
    }
}

extension MigrationOptions {
    mutating func clearInjections() {
        disconnectAfterPages = nil
        disconnectDuringPrecopyAfterPages = nil
        disconnectAtCommit = false
        corruptOnePage = false
        corruptOnePrecopyPage = false
        missOneDirtyPage = false
        violateProtocolAfterCommit = false
    }

    var policy: ConvergencePolicy {
        ConvergencePolicy(postcopy: postcopy, maxRounds: precopyRounds, maxSeconds: precopySeconds,
                          maxDowntimeMilliseconds: maxDowntimeMilliseconds)
    }
}

/// One pre-copy round as the report shows it.
public struct PrecopyRoundReport: Sendable, Equatable {
    public var pages: Int
    public var dataPages: Int
    public var seconds: Double
    public var dirtyAfter: Int
    /// The time limit stopped the round before it had sent every page it started with.
    public var cutShort = false
}

/// What the source saw.
public struct SourceReport: Sendable {
    public var totalSeconds = 0.0
    public var downtimeMilliseconds = 0.0
    /// Parts of the downtime: final dirty log, pages sent while paused (stop-and-copy and low
    /// memory), vCPU state, the destination's preparation (summary -> ready).
    public var downtimeParts: [(name: String, milliseconds: Double)] = []
    public var precopyRounds: [PrecopyRoundReport] = []
    public var precopyPages = 0
    /// Time the pre-copy rounds waited for the destination to store what was sent (`roundAcks`).
    public var precopyDrainSeconds = 0.0
    /// Time the destination took to drop the last round's dirtied pages before the pause (`discard`).
    public var precopyDiscardSeconds = 0.0
    /// Why pre-copy stopped, and how the migration finished.
    public var precopyStop = "no pre-copy"
    public var mode = "postcopy"
    public var stopAndCopyPages = 0
    /// Pages the destination still lacked after the switch-over, which post-copy then sent
    /// (on demand or in the background): 0 after a stop-and-copy.
    public var owedPages = 0
    public var demandPages = 0
    public var backgroundPages = 0
    public var zeroPages = 0
    public var bytesSent: UInt64 = 0
    public var nonZeroBytes: UInt64 = 0
    public var faultRequests = 0
    /// Of those, requests for a page the stream had already sent.
    public var faultRequestsForSentPages = 0
    public var reconnects = 0
    public var digest: UInt64 = 0
    public var postcopySeconds = 0.0
    /// Seconds a plain TCP copy of `nonZeroBytes` took on the same link (when measured).
    public var baselineSeconds: Double?
    public var guestMismatchesBeforeMigration = 0
    public var passesBeforeMigration: UInt64 = 0
    /// The CPU latency request held while post-copy ran (nil: none was made).
    public var postcopyCPULatency: CPULatencyOutcome?
    /// Attempts that failed before the switch-over, with their causes (the guest kept running).
    public var failedAttempts: [String] = []
    public init() {}

    public var throughputMBps: Double { postcopySeconds > 0 ? Double(bytesSent) / postcopySeconds / 1e6 : 0 }
}

/// Every attempt failed before the switch-over: the guest is still running on the source.
public struct MigrationFailedBeforeSwitchover: Error, CustomStringConvertible {
    public let causes: [String]
    public var description: String {
        "migration failed before the switch-over (\(causes.count) attempt(s)); the guest keeps running on the source: "
            + causes.enumerated().map { "attempt \($0.offset + 1): \($0.element)" }.joined(separator: "; ")
    }
}
