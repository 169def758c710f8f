import FaultlineCore
import FaultlineLinux
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What a page server did, over every worker it ran: printed as text, or as one JSON line.
public struct PageServerReport: Codable, Equatable, Sendable {
    public struct Latency: Codable, Equatable, Sendable {
        public var p50: Double
        public var p90: Double
        public var p99: Double
        public var max: Double
    }

    /// "supervised" (workers in child processes) or "in-process" (a worker thread).
    public var mode: String
    public var peer_pid: Int32
    public var peer_uid: UInt32
    public var regions: Int
    public var pages: UInt64
    public var faults_served: UInt64
    public var pages_copied: UInt64
    public var zero_pages: UInt64
    public var already_present: UInt64
    public var removes_seen: UInt64
    public var removed_pages: UInt64
    public var eagain_retries: UInt64
    public var faults_dropped: UInt64
    public var faults_outside_regions: UInt64
    /// Read (event off the queue) to filled (the fill ioctl returned), microseconds.
    public var fault_latency_us: Latency
    /// Pages filled per second, from the first fault read to the last page filled.
    public var pages_per_second: Double
    public var serving_seconds: Double
    public var workers_started: Int
    public var worker_restarts: Int
    /// Events a worker found in the landing buffer that a dead worker had read.
    public var removes_replayed: UInt64
    public var faults_replayed: UInt64
    /// Faults poisoned because their page could never arrive (a remote fetch that failed).
    public var pages_unavailable: UInt64
    public var ended_by: String
    /// Serving a remote snapshot (`--from`): how its fetch went.
    public var fetch: RemoteFetch?

    /// The fetch of a remote snapshot's memory, from the restore that did it.
    public struct RemoteFetch: Codable, Equatable, Sendable {
        public var from: String
        /// Nil when the fetch completed.
        public var error: String?
        /// Every page arrived, and the digest read back from the fetched memory matched the snapshot's.
        public var digest_match: Bool
        public var demand_pages: Int
        public var background_pages: Int
        public var reconnects: Int
        public var resident_ms: Double

        public init(from: String, outcome: Result<RestoreReport, Error>?) {
            self.from = from
            switch outcome {
            case .success(let r)?:
                error = nil
                digest_match = r.digestMatch
                demand_pages = r.demandPages
                background_pages = r.backgroundPages
                reconnects = r.reconnects
                resident_ms = r.residentMilliseconds
            case .failure(let e)?:
                error = "\(e)"
                digest_match = false
                demand_pages = 0; background_pages = 0; reconnects = 0; resident_ms = 0
            case nil:
                error = "still fetching when the page server ended"
                digest_match = false
                demand_pages = 0; background_pages = 0; reconnects = 0; resident_ms = 0
            }
        }
    }

    /// The counters in `ledger`, with what the supervisor knows.
    init(ledger: PageServerLedger, session: ServeSession, mode: String, workersStarted: Int, endedBy: String) {
        let counts = ledger.latencyCounts, maxNs = ledger[.latencyMaxNanoseconds]
        func us(_ p: Double) -> Double { Double(LatencyBuckets.value(atPercentile: p, counts: counts, max: maxNs)) / 1000 }
        let first = ledger[.firstFaultNanoseconds], last = ledger[.lastFillNanoseconds]
        let seconds = first > 0 && last > first ? Double(last - first) / 1e9 : 0
        let filled = ledger[.pagesCopied] + ledger[.zeroPages]
        self.mode = mode
        peer_pid = session.peer.pid
        peer_uid = session.peer.uid
        regions = session.layout.regions.count
        pages = session.layout.totalPages
        faults_served = ledger[.faultsServed]
        pages_copied = ledger[.pagesCopied]
        zero_pages = ledger[.zeroPages]
        already_present = ledger[.alreadyPresent]
        removes_seen = ledger[.removeEvents] + ledger[.removesReplayed]
        removed_pages = ledger[.removedPages]
        eagain_retries = ledger[.eagainRetries]
        faults_dropped = ledger[.faultsDropped]
        faults_outside_regions = ledger[.faultsOutsideRegions]
        fault_latency_us = Latency(p50: us(50), p90: us(90), p99: us(99), max: Double(maxNs) / 1000)
        pages_per_second = seconds > 0 ? (Double(filled) / seconds).rounded() : 0
        serving_seconds = seconds
        workers_started = workersStarted
        worker_restarts = max(workersStarted - 1, 0)
        removes_replayed = ledger[.removesReplayed]
        faults_replayed = ledger[.faultsReplayed]
        pages_unavailable = ledger[.pagesUnavailable]
        ended_by = endedBy
    }

    /// One JSON line (keys sorted).
    public var json: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: (try? encoder.encode(self)) ?? Data(), as: UTF8.self)
    }

    public var text: String {
        func f(_ v: Double) -> String {
            let scaled = (v * 10).rounded() / 10
            return scaled == scaled.rounded() ? String(Int(scaled)) : String(scaled)
        }
        let l = fault_latency_us
        return """
        uffd-serve report (\(mode), ended by \(ended_by))
          peer              pid \(peer_pid) uid \(peer_uid); \(regions) region(s), \(pages) pages
          faults served     \(faults_served) (\(pages_copied) pages copied, \(zero_pages) zero pages, \(already_present) already present)
          removes           \(removes_seen) REMOVE events, \(removed_pages) pages removed; \(eagain_retries) EAGAIN retries
          fault latency     p50 \(f(l.p50)) us, p90 \(f(l.p90)) us, p99 \(f(l.p99)) us, max \(f(l.max)) us (read to filled)
          throughput        \(Int(pages_per_second)) pages/s over \(f(serving_seconds * 1000)) ms
          workers           \(workers_started) started, \(worker_restarts) restarted; replayed \(removes_replayed) REMOVEs, \(faults_replayed) faults
          lost faults       \(faults_dropped) on memory gone, \(faults_outside_regions) outside every region, \(pages_unavailable) never available
        """ + fetchText
    }

    private var fetchText: String {
        guard let fetch else { return "" }
        let how: String
        if let error = fetch.error {
            how = "FAILED: \(error)"
        } else {
            let digest = fetch.digest_match ? "match" : "MISMATCH"
            how = "\(fetch.demand_pages) pages on demand, \(fetch.background_pages) in the background, "
                + "\(fetch.reconnects) reconnects, digest \(digest), every page in after \(Int(fetch.resident_ms)) ms"
        }
        return "\n  fetched from      \(fetch.from): " + how
    }
}
