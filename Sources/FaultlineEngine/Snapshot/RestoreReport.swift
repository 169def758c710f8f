import FaultlineCore

/// What a restore did, as one Codable value: the JSON report and the text report are both
/// rendered from it. Latencies count from the command's start.
public struct RestoreReport: Sendable, Codable, Equatable {
    public struct Latency: Sendable, Codable, Equatable {
        public var p50: Double
        public var p90: Double
        public var p99: Double
        public var max: Double
    }

    public var side = "restore"
    /// The snapshot folder, or for a remote restore the server and the snapshot's name.
    public var snapshot: String
    /// Remote: the `serve-snapshot` server the snapshot came from (nil: this process).
    public var from: String?
    /// "lazy" or "eager".
    public var mode: String
    public var faultMode: String
    public var vcpus: Int
    public var memoryBytes: UInt64
    public var snapshotDataPages: Int
    /// Eager: time to check every chunk and the digest before anything is installed.
    public var verifySeconds: Double?
    /// From the start of the restore's work (after the process started and read its
    /// arguments) to the vCPU threads running.
    public var firstInstructionMilliseconds = 0.0
    /// The same moment on CLOCK_MONOTONIC, in nanoseconds: a caller that noted the clock when
    /// it launched the restore measures from its own start (process start included).
    public var firstInstructionMonotonicNanoseconds: UInt64 = 0
    public var residentMilliseconds = 0.0
    public var faults = 0
    public var vcpuExitFaults = 0
    public var faultLatencyMicroseconds = Latency(p50: 0, p90: 0, p99: 0, max: 0)
    /// Power-of-two microsecond buckets: entry N counts faults of [2^N, 2^(N+1)) us.
    public var faultLatencyLog2: [UInt64] = []
    public var demandPages = 0
    public var backgroundPages = 0
    /// Pages copied before the vCPUs started (eager: all of them; lazy: low memory).
    public var pagesBeforeStart = 0
    public var zeroPages = 0
    public var pagesInstalledFromStaging = 0
    /// The restored memory's digest matched the source's, and the source's the snapshot manifest's.
    public var digestMatch = false
    /// The manifest's whole-memory digest.
    public var snapshotDigest: UInt64 = 0
    public var restoredDigest: UInt64 = 0
    public var digestPagesFromMemory = 0
    public var guestCheck = false
    public var guestMismatches = 0
    public var firstMismatch: String?
    public var passesAfterRestore: UInt64 = 0
    public var reconnects = 0
    /// Time from the start until every vCPU completed a whole pass of its program (every page
    /// of its working set touched since the restore); nil if one did not in the run.
    public var wholePassMilliseconds: Double?
    /// Pages of a replayed working set (sent first by the background fill).
    public var prefetchPages: Int?
    /// With recording: the pages the guest touched, first touched first (written to a file,
    /// not into the JSON report).
    public var workingSet: WorkingSet?
    /// The pages faults asked for, first asked first (kept for the recording; not in the JSON).
    var firstTouches: [Int] = []

    enum CodingKeys: String, CodingKey {
        case side, snapshot, from, mode, faultMode = "fault_mode", vcpus, memoryBytes = "memory_bytes"
        case snapshotDataPages = "snapshot_data_pages", verifySeconds = "verify_seconds"
        case firstInstructionMilliseconds = "first_instruction_ms", residentMilliseconds = "resident_ms", faults
        case firstInstructionMonotonicNanoseconds = "first_instruction_monotonic_ns"
        case vcpuExitFaults = "vcpu_exit_faults", faultLatencyMicroseconds = "fault_latency_us"
        case faultLatencyLog2 = "fault_latency_log2_us", demandPages = "demand_pages", backgroundPages = "background_pages"
        case pagesBeforeStart = "pages_before_start", zeroPages = "zero_pages"
        case pagesInstalledFromStaging = "pages_installed_from_staging", digestMatch = "digest_match"
        case snapshotDigest = "snapshot_digest", restoredDigest = "restored_digest"
        case digestPagesFromMemory = "digest_pages_from_memory", guestCheck = "guest_check"
        case guestMismatches = "guest_mismatches", firstMismatch = "first_mismatch", passesAfterRestore = "passes_after_restore"
        case reconnects, wholePassMilliseconds = "whole_pass_ms", prefetchPages = "prefetch_pages"
    }

    public init(snapshot: String, mode: String, faultMode: String, vcpus: Int, memoryBytes: UInt64, snapshotDataPages: Int) {
        self.snapshot = snapshot
        self.mode = mode
        self.faultMode = faultMode
        self.vcpus = vcpus
        self.memoryBytes = memoryBytes
        self.snapshotDataPages = snapshotDataPages
    }

    mutating func fill(destination d: DestinationReport, sourceReconnects: Int, started: UInt64) {
        firstInstructionMilliseconds = Double(d.guestStartedAt &- started) / 1e6
        firstInstructionMonotonicNanoseconds = d.guestStartedAt
        residentMilliseconds = Double(max(d.everyPageInAt, d.guestStartedAt) &- started) / 1e6
        faults = d.faults
        vcpuExitFaults = d.vcpuExitFaults
        let l = d.faultLatencyMicroseconds
        faultLatencyMicroseconds = Latency(p50: l.p50, p90: l.p90, p99: l.p99, max: l.max)
        faultLatencyLog2 = d.faultLatencyLog2
        demandPages = d.demandPages
        backgroundPages = d.backgroundPages
        pagesBeforeStart = d.precopyPages
        zeroPages = d.zeroPages
        pagesInstalledFromStaging = d.pagesInstalledFromStaging
        digestMatch = d.digestMatch
        restoredDigest = d.destinationDigest
        digestPagesFromMemory = d.digestPagesFromMemory
        guestMismatches = d.guestMismatches
        firstMismatch = d.firstMismatch
        passesAfterRestore = d.passesAfterMigration
        guestCheck = d.guestMismatches == 0
        reconnects = d.reconnects + sourceReconnects
        wholePassMilliseconds = d.everyVcpuWholePassAt > 0 ? Double(d.everyVcpuWholePassAt &- started) / 1e6 : nil
        firstTouches = d.firstTouches
    }

    /// The text report.
    public var text: String {
        func ms(_ v: Double) -> String { String(format3(v)) }
        let l = faultLatencyMicroseconds
        var lines = [
            "restore complete (\(mode), fault mode \(faultMode)): \(vcpus) vCPU(s), \(memoryBytes >> 20) MiB from \(snapshot)",
            "  first guest instruction  \(ms(firstInstructionMilliseconds)) ms after the start",
            "  every page resident      \(ms(residentMilliseconds)) ms after the start",
            "  pages                    \(demandPages) on demand, \(backgroundPages) in the background, \(pagesBeforeStart) before the start, "
                + "\(zeroPages) zero",
            "  faults                   \(faults) (p50 \(ms(l.p50)) us, p90 \(ms(l.p90)) us, p99 \(ms(l.p99)) us, max \(ms(l.max)) us)",
            "  digest                   \(digestMatch ? "match" : "MISMATCH") (\(digestPagesFromMemory) pages read back from guest memory)",
            "  guest check              \(guestCheck ? "green" : "RED: \(guestMismatches) mismatches, first: \(firstMismatch ?? "?")"), "
                + "\(passesAfterRestore) passes after the restore",
        ]
        if let wholePassMilliseconds { lines.append("  whole pass done          \(ms(wholePassMilliseconds)) ms after the start (every vCPU)") }
        if let prefetchPages { lines.append("  working set replayed     \(prefetchPages) pages sent first") }
        if let verifySeconds { lines.insert("  snapshot verified        \(ms(verifySeconds * 1000)) ms before the start", at: 1) }
        return lines.joined(separator: "\n")
    }

    private func format3(_ v: Double) -> String {
        let scaled = (v * 1000).rounded() / 1000
        return "\(scaled)"
    }
}
