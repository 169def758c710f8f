import FaultlineCore
import FaultlineEngine

func ms(_ v: Double) -> String { fmt(v, 2) }

/// Named durations in milliseconds (the parts of a downtime or a switch-over): a JSON object
/// of name to milliseconds. The text lists them in the order they happened; decoded, they
/// come back sorted by name.
struct NamedMilliseconds: Codable, Sendable, Equatable {
    var parts: [Part]

    struct Part: Sendable, Equatable {
        var name: String
        var milliseconds: Double
    }

    init(_ parts: [(name: String, milliseconds: Double)]) {
        self.parts = parts.map { Part(name: $0.name, milliseconds: rounded($0.milliseconds, 3)) }
    }

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: NamedKey.self)
        parts = try c.allKeys.sorted { $0.stringValue < $1.stringValue }
            .map { Part(name: $0.stringValue, milliseconds: try c.decode(Double.self, forKey: $0)) }
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: NamedKey.self)
        for p in parts { try c.encode(p.milliseconds, forKey: NamedKey(p.name)) }
    }

    /// `name 1.23, name 4.56` (milliseconds).
    var text: String { parts.map { "\($0.name) \(ms($0.milliseconds))" }.joined(separator: ", ") }
}

/// A side's post-copy CPU latency request (PM QoS), as both sides report it.
struct CPULatencyReport: Codable, Sendable, Equatable {
    var requestedMicroseconds: Int32
    var held: Bool
    @NullWhenAbsent var error: String?

    enum CodingKeys: String, CodingKey {
        case requestedMicroseconds = "requested_us", held, error
    }

    init(_ o: CPULatencyOutcome) {
        requestedMicroseconds = o.requestedMicroseconds
        held = o.held
        error = o.error
    }

    var outcome: CPULatencyOutcome { CPULatencyOutcome(requestedMicroseconds: requestedMicroseconds, held: held, error: error) }
}

/// The same, for the text report (nil: no request was made).
func cpuLatencyText(_ o: CPULatencyReport?) -> String {
    guard let o else { return "none (off, or no post-copy)" }
    return o.held ? "\(o.requestedMicroseconds) us, held while post-copy ran" : "not held (\(o.error ?? "unknown")): idle CPUs could halt"
}

/// `run --migrate-to` (and the source half of `demo`): what the source saw of a completed
/// migration. docs/reports.md, "Source".
struct SourceMigrationReport: Codable, Sendable, Equatable {
    /// "source" in `run`'s report; absent in `demo`'s, which holds both sides.
    var side: String?
    var totalSeconds: Double
    var postcopySeconds: Double
    var downtimeMilliseconds: Double
    var downtimeParts: NamedMilliseconds
    var precopyRoundCount: Int
    var precopy: [Round]
    var precopyPages: Int
    var precopyStop: String
    var precopyDrainSeconds: Double
    var precopyDiscardSeconds: Double
    var mode: String
    var stopAndCopyPages: Int
    var owedPages: Int
    var demandPages: Int
    var backgroundPages: Int
    var zeroPages: Int
    var faultRequests: Int
    var faultRequestsForSentPages: Int
    var bytesSent: UInt64
    var nonZeroBytes: UInt64
    var throughputMBps: Double
    var reconnects: Int
    var failedAttempts: [String]
    var guestMismatches: Int
    @NullWhenAbsent var postcopyCPULatency: CPULatencyReport?
    var tcpBaselineSeconds: Double?
    /// The memory digest, `0x` and hex.
    var digest: String
    /// `run`: the destination confirmed the digest (a migration reaches its report only then).
    var digestMatch: Bool?
    /// `run`: the guest's own check stayed green on the source.
    var guestCheck: Bool?

    struct Round: Codable, Sendable, Equatable {
        var pages: Int
        var dataPages: Int
        var seconds: Double
        var dirtyAfter: Int
        var cutShort: Bool

        enum CodingKeys: String, CodingKey {
            case pages, dataPages = "data_pages", seconds, dirtyAfter = "dirty_after", cutShort = "cut_short"
        }
    }

    enum CodingKeys: String, CodingKey {
        case side, totalSeconds = "total_seconds", postcopySeconds = "postcopy_seconds", downtimeMilliseconds = "downtime_ms"
        case downtimeParts = "downtime_parts_ms", precopyRoundCount = "precopy_rounds", precopy, precopyPages = "precopy_pages"
        case precopyStop = "precopy_stop", precopyDrainSeconds = "precopy_drain_seconds", precopyDiscardSeconds = "precopy_discard_seconds"
        case mode, stopAndCopyPages = "stop_and_copy_pages", owedPages = "owed_pages", demandPages = "demand_pages"
        case backgroundPages = "background_pages", zeroPages = "zero_pages", faultRequests = "fault_requests"
        case faultRequestsForSentPages = "fault_requests_for_sent_pages", bytesSent = "bytes_sent", nonZeroBytes = "nonzero_bytes"
        case throughputMBps = "throughput_mbps", reconnects, failedAttempts = "failed_attempts"
        case guestMismatches = "source_guest_mismatches", postcopyCPULatency = "source_postcopy_cpu_latency"
        case tcpBaselineSeconds = "tcp_baseline_seconds", digest, digestMatch = "digest_match", guestCheck = "guest_check"
    }

    /// `standalone`: `run`'s own report (with `side`, `digest_match` and `guest_check`);
    /// otherwise the source half of `demo`'s.
    init(_ r: SourceReport, standalone: Bool) {
        side = standalone ? "source" : nil
        totalSeconds = rounded(r.totalSeconds, 6)
        postcopySeconds = rounded(r.postcopySeconds, 6)
        downtimeMilliseconds = rounded(r.downtimeMilliseconds, 3)
        downtimeParts = NamedMilliseconds(r.downtimeParts)
        precopyRoundCount = r.precopyRounds.count
        precopy = r.precopyRounds.map {
            Round(pages: $0.pages, dataPages: $0.dataPages, seconds: rounded($0.seconds, 6), dirtyAfter: $0.dirtyAfter, cutShort: $0.cutShort)
        }
        precopyPages = r.precopyPages
        precopyStop = r.precopyStop
        precopyDrainSeconds = rounded(r.precopyDrainSeconds, 6)
        precopyDiscardSeconds = rounded(r.precopyDiscardSeconds, 6)
        mode = r.mode
        stopAndCopyPages = r.stopAndCopyPages
        owedPages = r.owedPages
        demandPages = r.demandPages
        backgroundPages = r.backgroundPages
        zeroPages = r.zeroPages
        faultRequests = r.faultRequests
        faultRequestsForSentPages = r.faultRequestsForSentPages
        bytesSent = r.bytesSent
        nonZeroBytes = r.nonZeroBytes
        throughputMBps = rounded(r.throughputMBps, 1)
        reconnects = r.reconnects
        failedAttempts = r.failedAttempts
        guestMismatches = r.guestMismatchesBeforeMigration
        postcopyCPULatency = r.postcopyCPULatency.map(CPULatencyReport.init)
        tcpBaselineSeconds = r.baselineSeconds.map { rounded($0, 6) }
        digest = "0x" + String(r.digest, radix: 16)
        digestMatch = standalone ? true : nil
        guestCheck = standalone ? r.guestMismatchesBeforeMigration == 0 : nil
    }

    var text: String {
        var lines = [
            "migration complete (source)",
            "  total time            \(fmt(totalSeconds, 3)) s (post-copy \(fmt(postcopySeconds, 3)) s)",
            "  downtime              \(ms(downtimeMilliseconds)) ms (vCPUs paused until the commit): \(downtimeParts.text)",
            "  pre-copy              \(precopyRoundCount) round(s), \(precopyPages) pages; stopped: \(precopyStop); finished in \(mode)"
                + (stopAndCopyPages > 0 ? " (\(stopAndCopyPages) pages sent while paused)" : ""),
        ] + precopy.enumerated().map { i, r in
            "    round \(i + 1)             \(r.pages) pages (\(r.dataPages) with data) in \(fmt(r.seconds, 3)) s; \(r.dirtyAfter) dirtied meanwhile"
        } + [
            "  post-copy             \(demandPages) on demand, \(backgroundPages) in background, \(zeroPages) zero pages",
            "  fault requests        \(faultRequests) (\(faultRequestsForSentPages) for pages the stream had sent already)",
            "  bytes on the wire     \(bytesSent) (\(fmt(throughputMBps, 1)) MB/s in post-copy)",
            "  reconnects            \(reconnects)",
            "  CPU latency request   \(cpuLatencyText(postcopyCPULatency))",
            "  digest                \(digest) - confirmed by the destination",
            "  guest check (source)  \(guestMismatches == 0 ? "green" : "RED: \(guestMismatches) mismatches")",
        ] + failedAttempts.enumerated().map { "  failed attempt \($0.offset + 1)      \($0.element) (the guest kept running)" }
        if let b = tcpBaselineSeconds {
            lines.append("  plain TCP copy        \(fmt(b, 3)) s for the same \(nonZeroBytes) non-zero bytes; migration/TCP = "
                         + fmt(totalSeconds / b, 2))
        }
        return lines.joined(separator: "\n")
    }
}
