import FaultlineCore
import FaultlineEngine

/// Fault latency percentiles in microseconds.
struct LatencyPercentiles: Codable, Sendable, Equatable {
    var p50: Double
    var p90: Double
    var p99: Double
    var max: Double

    init(p50: Double, p90: Double, p99: Double, max: Double) {
        self.p50 = rounded(p50, 2)
        self.p90 = rounded(p90, 2)
        self.p99 = rounded(p99, 2)
        self.max = rounded(max, 2)
    }
}

/// `receive` (and the destination half of `demo`): what the destination saw of a completed
/// migration. docs/reports.md, "Destination".
struct DestinationMigrationReport: Codable, Sendable, Equatable {
    /// "destination" in `receive`'s report; absent in `demo`'s.
    var side: String?
    var faultMode: String
    var faultModeReason: String
    var guestMode: String
    @NullWhenAbsent var vcpuExitVia: String?
    var vcpuExitFaults: Int
    var preFault: PreFault
    var switchoverMilliseconds: Double
    var switchoverParts: NamedMilliseconds
    var postcopySeconds: Double
    var postcopy: Bool
    var precopyPages: Int
    var demandPages: Int
    var backgroundPages: Int
    var zeroPages: Int
    var faults: Int
    var faultAroundPages: Int
    var faultLatency: LatencyPercentiles
    var faultLatencyLog2: Log2Buckets
    var vcpuStallMilliseconds: [Double]
    var slowFaults: SlowFaults
    var corruptPagesRejected: Int
    var reconnects: Int
    var recycledPages: Int
    var recycledPagesReused: Int
    var pagesInstalledFromStaging: Int
    var sealedRunsHurried: Int
    @NullWhenAbsent var postcopyCPULatency: CPULatencyReport?
    var bytesReceived: UInt64
    var digestMatch: Bool
    /// The digest read back from the destination's guest memory, `0x` and hex.
    var digest: String
    var digestSeconds: Double
    var digestPagesFromMemory: Int
    var digestPagesGuestWritten: Int
    var abandonedAttempts: [String]
    var guestCheck: Bool
    var guestMismatches: Int
    var firstMismatch: String?
    var passesAfterMigration: UInt64

    /// KVM_PRE_FAULT_MEMORY at the switch-over and after post-copy (null: not run).
    struct PreFault: Codable, Sendable, Equatable {
        @NullWhenAbsent var switchover: Run?
        @NullWhenAbsent var afterPostcopy: Run?

        enum CodingKeys: String, CodingKey { case switchover, afterPostcopy = "after_postcopy" }

        struct Run: Codable, Sendable, Equatable {
            var bytes: UInt64
            var calls: Int
            var retries: Int
            var ms: Double
            @NullWhenAbsent var error: String?

            init(_ s: PreFaultSummary) {
                bytes = s.bytesMapped
                calls = s.calls
                retries = s.retries
                ms = rounded(s.milliseconds, 3)
                error = s.error
            }
        }
    }

    /// Demand-fault latency in power-of-two microsecond buckets ([2^N, 2^(N+1)) us): all faults, and per vCPU.
    struct Log2Buckets: Codable, Sendable, Equatable {
        var buckets: [UInt64]
        var perVcpu: [[UInt64]]

        enum CodingKeys: String, CodingKey { case buckets, perVcpu = "per_vcpu" }
    }

    /// Faults that waited 1 ms or more: how many, and the first of them.
    struct SlowFaults: Codable, Sendable, Equatable {
        var count: Int
        var first: [Fault]

        struct Fault: Codable, Sendable, Equatable {
            var atMilliseconds: Double
            var microseconds: Double
            var vcpu: Int
            var page: Int
            @NullWhenAbsent var requestSentMicroseconds: Double?
            @NullWhenAbsent var replyMicroseconds: Double?
            /// "reply" (the answer to its request) or "stream" (the background stream).
            var installedBy: String

            enum CodingKeys: String, CodingKey {
                case atMilliseconds = "at_ms", microseconds = "us", vcpu, page, requestSentMicroseconds = "request_sent_us"
                case replyMicroseconds = "reply_us", installedBy = "installed_by"
            }
        }
    }

    enum CodingKeys: String, CodingKey {
        case side, faultMode = "fault_mode", faultModeReason = "fault_mode_reason", guestMode = "guest_mode"
        case vcpuExitVia = "vcpu_exit_via", vcpuExitFaults = "vcpu_exit_faults", preFault = "pre_fault"
        case switchoverMilliseconds = "switchover_ms", switchoverParts = "switchover_parts_ms"
        case postcopySeconds = "destination_postcopy_seconds", postcopy, precopyPages = "destination_precopy_pages"
        case demandPages = "installed_demand_pages", backgroundPages = "installed_background_pages", zeroPages = "installed_zero_pages"
        case faults, faultAroundPages = "fault_around_pages", faultLatency = "fault_latency_us", faultLatencyLog2 = "fault_latency_log2_us"
        case vcpuStallMilliseconds = "vcpu_stall_ms", slowFaults = "slow_faults", corruptPagesRejected = "corrupt_pages_rejected"
        case reconnects = "destination_reconnects", recycledPages = "recycled_pages", recycledPagesReused = "recycled_pages_reused"
        case pagesInstalledFromStaging = "pages_installed_from_staging", sealedRunsHurried = "sealed_runs_hurried"
        case postcopyCPULatency = "postcopy_cpu_latency", bytesReceived = "bytes_received", digestMatch = "digest_match"
        case digest = "destination_digest", digestSeconds = "digest_seconds", digestPagesFromMemory = "digest_pages_from_memory"
        case digestPagesGuestWritten = "digest_pages_guest_written", abandonedAttempts = "abandoned_attempts"
        case guestCheck = "guest_check", guestMismatches = "guest_mismatches", firstMismatch = "first_mismatch"
        case passesAfterMigration = "passes_after_migration"
    }

    /// `standalone`: `receive`'s own report (with `side`); otherwise the destination half of `demo`'s.
    init(_ r: DestinationReport, faultModeReason: String, standalone: Bool) {
        side = standalone ? "destination" : nil
        faultMode = r.faultMode.rawValue
        self.faultModeReason = faultModeReason
        guestMode = r.guestMode?.rawValue ?? "unknown"
        vcpuExitVia = r.vcpuExitMechanism?.rawValue
        vcpuExitFaults = r.vcpuExitFaults
        preFault = PreFault(switchover: r.preFaultAtSwitchover.map(PreFault.Run.init),
                            afterPostcopy: r.preFaultAfterPostcopy.map(PreFault.Run.init))
        switchoverMilliseconds = rounded(r.switchoverMilliseconds, 3)
        switchoverParts = NamedMilliseconds(r.switchoverParts)
        postcopySeconds = rounded(r.postcopySeconds, 6)
        postcopy = r.postcopy
        precopyPages = r.precopyPages
        demandPages = r.demandPages
        backgroundPages = r.backgroundPages
        zeroPages = r.zeroPages
        faults = r.faults
        faultAroundPages = r.faultAround
        let l = r.faultLatencyMicroseconds
        faultLatency = LatencyPercentiles(p50: l.p50, p90: l.p90, p99: l.p99, max: l.max)
        faultLatencyLog2 = Log2Buckets(buckets: r.faultLatencyLog2, perVcpu: r.faultLatencyLog2PerVcpu)
        vcpuStallMilliseconds = r.vcpuStallMilliseconds.map { rounded($0, 3) }
        slowFaults = SlowFaults(count: r.slowFaultCount, first: r.slowFaults.map {
            SlowFaults.Fault(atMilliseconds: rounded($0.atMilliseconds, 3), microseconds: rounded($0.microseconds, 1), vcpu: $0.vcpu,
                             page: $0.page, requestSentMicroseconds: $0.requestSentMicroseconds.map { rounded($0, 1) },
                             replyMicroseconds: $0.replyMicroseconds.map { rounded($0, 1) },
                             installedBy: $0.installedByReply ? "reply" : "stream")
        })
        corruptPagesRejected = r.corruptPagesRejected
        reconnects = r.reconnects
        recycledPages = r.recycledPages
        recycledPagesReused = r.recycledPagesReused
        pagesInstalledFromStaging = r.pagesInstalledFromStaging
        sealedRunsHurried = r.sealedRunsHurried
        postcopyCPULatency = r.postcopyCPULatency.map(CPULatencyReport.init)
        bytesReceived = r.bytesReceived
        digestMatch = r.digestMatch
        digest = "0x" + String(r.destinationDigest, radix: 16)
        digestSeconds = rounded(r.digestSeconds, 6)
        digestPagesFromMemory = r.digestPagesFromMemory
        digestPagesGuestWritten = r.digestPagesGuestWritten
        abandonedAttempts = r.abandonedAttempts
        guestCheck = r.guestMismatches == 0
        guestMismatches = r.guestMismatches
        firstMismatch = r.firstMismatch
        passesAfterMigration = r.passesAfterMigration
    }

    var text: String {
        let l = faultLatency
        return [
            "migration complete (destination, fault mode \(faultMode))",
            "  fault mode            \(faultMode): \(faultModeReason)",
            "  guest mode            \(guestMode) (from the announced layout)",
            "  switch-over           \(ms(switchoverMilliseconds)) ms from the first vCPU state to running: \(switchoverParts.text)",
            "  post-copy             \(fmt(postcopySeconds, 3)) s: \(demandPages) pages on demand, \(backgroundPages) in background, \(zeroPages) zero",
            "  pre-copy pages        \(precopyPages)",
            "  stale pages kept      \(recycledPages), \(recycledPagesReused) reused for their new copies",
            "  from staging          \(pagesInstalledFromStaging) pages a fault found staged and took at once (no request)"
                + (faultMode == FaultMode.uffdMinor.rawValue ? "; \(sealedRunsHurried) sealed runs hurried" : ""),
            "  faults                \(faults)\(viaText), up to \(faultAroundPages) pages each, latency p50 \(fmt(l.p50, 1)) us, "
                + "p90 \(fmt(l.p90, 1)) us, p99 \(fmt(l.p99, 1)) us, max \(fmt(l.max, 1)) us",
            "  fault latency (log2)  " + faultLatencyLog2.buckets.enumerated().filter { $0.element > 0 }
                .map { "[\(1 << $0.offset), \(2 << $0.offset)) us: \($0.element)" }.joined(separator: ", "),
            "  vCPU stall            " + vcpuStallMilliseconds.enumerated().map { "vcpu\($0.offset) \(ms($0.element)) ms" }.joined(separator: ", "),
            "  corrupt pages refused \(corruptPagesRejected)",
            "  CPU latency request   \(cpuLatencyText(postcopyCPULatency))",
            "  reconnects            \(reconnects)",
            "  bytes received        \(bytesReceived)",
            "  digest                \(digestMatch ? "match" : "MISMATCH") (\(digest)), read back from guest "
                + "memory in \(ms(digestSeconds * 1000)) ms: \(digestPagesFromMemory) pages from memory, \(digestPagesGuestWritten) rewritten by the guest",
            "  guest check           \(guestCheck ? "green" : "RED: \(guestMismatches) mismatches, first: \(firstMismatch ?? "")") "
                + "(\(passesAfterMigration) passes after the migration)",
        ].joined(separator: "\n")
    }

    /// ` (N as vCPU exits via MECHANISM)` in vcpu-exit mode, else nothing.
    var viaText: String { vcpuExitVia.map { " (\(vcpuExitFaults) as vCPU exits via \($0))" } ?? "" }

    /// KVM_PRE_FAULT_MEMORY runs, one line each (the demo's summary of its destination).
    var preFaultLines: [String] {
        [("at switch-over ", preFault.switchover), ("after post-copy", preFault.afterPostcopy)].compactMap { label, run in
            run.map { p in
                "  pre-fault \(label) \(p.bytes) bytes in \(p.ms) ms (\(p.calls) calls, \(p.retries) retried)"
                    + (p.error.map { " - stopped: \($0)" } ?? "")
            }
        }
    }
}
