import FaultlineCore
import FaultlineEngine

func ms(_ v: Double) -> String { fmt(v, 2) }

extension SourceReport {
    var guestCheck: Bool { guestMismatchesBeforeMigration == 0 }

    var human: String {
        var lines = [
            "migration complete (source)",
            "  total time            \(fmt(totalSeconds, 3)) s (post-copy \(fmt(postcopySeconds, 3)) s)",
            "  downtime              \(ms(downtimeMilliseconds)) ms (vCPUs paused until the commit): "
                + downtimeParts.map { "\($0.name) \(ms($0.milliseconds))" }.joined(separator: ", "),
            "  pre-copy              \(precopyRounds.count) round(s), \(precopyPages) pages; stopped: \(precopyStop); finished in \(mode)"
                + (stopAndCopyPages > 0 ? " (\(stopAndCopyPages) pages sent while paused)" : ""),
        ] + precopyRounds.enumerated().map { i, r in
            "    round \(i + 1)             \(r.pages) pages (\(r.dataPages) with data) in \(fmt(r.seconds, 3)) s; \(r.dirtyAfter) dirtied meanwhile"
        } + [
            "  post-copy             \(demandPages) on demand, \(backgroundPages) in background, \(zeroPages) zero pages",
            "  fault requests        \(faultRequests) (\(faultRequestsForSentPages) for pages the stream had sent already)",
            "  bytes on the wire     \(bytesSent) (\(fmt(throughputMBps, 1)) MB/s in post-copy)",
            "  reconnects            \(reconnects)",
            "  CPU latency request   \(cpuLatencyText(postcopyCPULatency))",
            "  digest                0x\(String(digest, radix: 16)) - confirmed by the destination",
            "  guest check (source)  \(guestCheck ? "green" : "RED: \(guestMismatchesBeforeMigration) mismatches")",
        ] + failedAttempts.enumerated().map { "  failed attempt \($0.offset + 1)      \($0.element) (the guest kept running)" }
        if let b = baselineSeconds {
            lines.append("  plain TCP copy        \(fmt(b, 3)) s for the same \(nonZeroBytes) non-zero bytes; migration/TCP = "
                         + fmt(totalSeconds / b, 2))
        }
        return lines.joined(separator: "\n")
    }

    var jsonFields: [String] {
        var f = [
            "\"total_seconds\":\(fmt(totalSeconds, 6))", "\"downtime_ms\":\(fmt(downtimeMilliseconds, 3))",
            "\"precopy_rounds\":\(precopyRounds.count)", "\"precopy_pages\":\(precopyPages)", "\"demand_pages\":\(demandPages)",
            "\"fault_requests\":\(faultRequests)", "\"fault_requests_for_sent_pages\":\(faultRequestsForSentPages)",
            "\"precopy\":[" + precopyRounds.map {
                "{\"pages\":\($0.pages),\"data_pages\":\($0.dataPages),\"seconds\":\(fmt($0.seconds, 6)),\"dirty_after\":\($0.dirtyAfter),\"cut_short\":\($0.cutShort)}"
            }.joined(separator: ",") + "]",
            "\"precopy_stop\":\"\(jsonEscape(precopyStop))\"", "\"mode\":\"\(mode)\"", "\"stop_and_copy_pages\":\(stopAndCopyPages)", "\"owed_pages\":\(owedPages)",
            "\"downtime_parts_ms\":{" + downtimeParts.map { "\"\($0.name)\":\(fmt($0.milliseconds, 3))" }.joined(separator: ",") + "}",
            "\"failed_attempts\":[" + failedAttempts.map { "\"\(jsonEscape($0))\"" }.joined(separator: ",") + "]",
            "\"background_pages\":\(backgroundPages)", "\"zero_pages\":\(zeroPages)", "\"bytes_sent\":\(bytesSent)",
            "\"nonzero_bytes\":\(nonZeroBytes)", "\"throughput_mbps\":\(fmt(throughputMBps, 1))",
            "\"postcopy_seconds\":\(fmt(postcopySeconds, 6))", "\"reconnects\":\(reconnects)",
            "\"precopy_drain_seconds\":\(fmt(precopyDrainSeconds, 6))",
            "\"precopy_discard_seconds\":\(fmt(precopyDiscardSeconds, 6))",
            "\"source_guest_mismatches\":\(guestMismatchesBeforeMigration)",
            "\"source_postcopy_cpu_latency\":\(cpuLatencyJSON(postcopyCPULatency))",
        ]
        if let b = baselineSeconds { f.append("\"tcp_baseline_seconds\":\(fmt(b, 6))") }
        return f
    }

    var json: String { "{\"side\":\"source\"," + (jsonFields + ["\"digest_match\":true", "\"guest_check\":\(guestCheck)"]).joined(separator: ",") + "}" }
}

/// A side's post-copy CPU latency request in the JSON report (null: none was made).
func cpuLatencyJSON(_ o: CPULatencyOutcome?) -> String {
    guard let o else { return "null" }
    return "{\"requested_us\":\(o.requestedMicroseconds),\"held\":\(o.held),\"error\":"
        + (o.error.map { "\"\(jsonEscape($0))\"" } ?? "null") + "}"
}

/// The same, for the text report.
func cpuLatencyText(_ o: CPULatencyOutcome?) -> String {
    guard let o else { return "none (off, or no post-copy)" }
    return o.held ? "\(o.requestedMicroseconds) us, held while post-copy ran" : "not held (\(o.error ?? "unknown")): idle CPUs could halt"
}

/// `[1,2,3]`.
func intList(_ values: [UInt64]) -> String { "[" + values.map(String.init).joined(separator: ",") + "]" }

extension DestinationReport {
    var guestCheck: Bool { guestMismatches == 0 }

    func human(faultModeReason: String) -> String {
        let l = faultLatencyMicroseconds
        return [
            "migration complete (destination, fault mode \(faultMode))",
            "  fault mode            \(faultMode): \(faultModeReason)",
            "  guest mode            \(guestMode?.rawValue ?? "unknown") (from the announced layout)",
            "  switch-over           \(ms(switchoverMilliseconds)) ms from the first vCPU state to running: "
                + switchoverParts.map { "\($0.name) \(ms($0.milliseconds))" }.joined(separator: ", "),
            "  post-copy             \(fmt(postcopySeconds, 3)) s: \(demandPages) pages on demand, \(backgroundPages) in background, \(zeroPages) zero",
            "  pre-copy pages        \(precopyPages)",
            "  stale pages kept      \(recycledPages), \(recycledPagesReused) reused for their new copies",
            "  from staging          \(pagesInstalledFromStaging) pages a fault found staged and took at once (no request)"
                + (faultMode == .uffdMinor ? "; \(sealedRunsHurried) sealed runs hurried" : ""),
            "  faults                \(faults)\(vcpuExitMechanism.map { " (\(vcpuExitFaults) as vCPU exits via \($0.rawValue))" } ?? ""), up to \(faultAround) pages each, latency p50 \(fmt(l.p50, 1)) us, p90 \(fmt(l.p90, 1)) us, p99 \(fmt(l.p99, 1)) us, max \(fmt(l.max, 1)) us",
            "  fault latency (log2)  " + faultLatencyLog2.enumerated().filter { $0.element > 0 }
                .map { "[\(1 << $0.offset), \(2 << $0.offset)) us: \($0.element)" }.joined(separator: ", "),
            "  vCPU stall            " + vcpuStallMilliseconds.enumerated().map { "vcpu\($0.offset) \(ms($0.element)) ms" }.joined(separator: ", "),
            "  corrupt pages refused \(corruptPagesRejected)",
            "  CPU latency request   \(cpuLatencyText(postcopyCPULatency))",
            "  reconnects            \(reconnects)",
            "  bytes received        \(bytesReceived)",
            "  digest                \(digestMatch ? "match" : "MISMATCH") (0x\(String(destinationDigest, radix: 16))), read back from guest "
                + "memory in \(ms(digestSeconds * 1000)) ms: \(digestPagesFromMemory) pages from memory, \(digestPagesGuestWritten) rewritten by the guest",
            "  guest check           \(guestCheck ? "green" : "RED: \(guestMismatches) mismatches, first: \(firstMismatch ?? "")") "
                + "(\(passesAfterMigration) passes after the migration)",
        ].joined(separator: "\n")
    }

    func jsonFields(faultModeReason: String) -> [String] {
        let l = faultLatencyMicroseconds
        return [
            "\"fault_mode\":\"\(faultMode)\"", "\"fault_mode_reason\":\"\(jsonEscape(faultModeReason))\"",
            "\"guest_mode\":\"\(guestMode?.rawValue ?? "unknown")\"",
            "\"vcpu_exit_via\":" + (vcpuExitMechanism.map { "\"\($0.rawValue)\"" } ?? "null"), "\"vcpu_exit_faults\":\(vcpuExitFaults)",
            "\"pre_fault\":{\"switchover\":\(preFaultJSON(preFaultAtSwitchover)),\"after_postcopy\":\(preFaultJSON(preFaultAfterPostcopy))}",
            "\"switchover_ms\":\(fmt(switchoverMilliseconds, 3))",
            "\"switchover_parts_ms\":{" + switchoverParts.map { "\"\($0.name)\":\(fmt($0.milliseconds, 3))" }.joined(separator: ",") + "}",
            "\"destination_postcopy_seconds\":\(fmt(postcopySeconds, 6))", "\"faults\":\(faults)", "\"fault_around_pages\":\(faultAround)",
            "\"fault_latency_us\":{\"p50\":\(fmt(l.p50, 2)),\"p90\":\(fmt(l.p90, 2)),\"p99\":\(fmt(l.p99, 2)),\"max\":\(fmt(l.max, 2))}",
            "\"fault_latency_log2_us\":{\"buckets\":\(intList(faultLatencyLog2)),\"per_vcpu\":["
                + faultLatencyLog2PerVcpu.map(intList).joined(separator: ",") + "]}",
            "\"vcpu_stall_ms\":[" + vcpuStallMilliseconds.map { fmt($0, 3) }.joined(separator: ",") + "]",
            "\"slow_faults\":{\"count\":\(slowFaultCount),\"first\":[" + slowFaults.map {
                "{\"at_ms\":\(fmt($0.atMilliseconds, 3)),\"us\":\(fmt($0.microseconds, 1)),\"vcpu\":\($0.vcpu),\"page\":\($0.page),"
                    + "\"request_sent_us\":\($0.requestSentMicroseconds.map { fmt($0, 1) } ?? "null"),"
                    + "\"reply_us\":\($0.replyMicroseconds.map { fmt($0, 1) } ?? "null"),"
                    + "\"installed_by\":\"\($0.installedByReply ? "reply" : "stream")\"}"
            }.joined(separator: ",") + "]}",
            "\"installed_demand_pages\":\(demandPages)", "\"installed_background_pages\":\(backgroundPages)",
            "\"corrupt_pages_rejected\":\(corruptPagesRejected)", "\"destination_reconnects\":\(reconnects)",
            "\"recycled_pages\":\(recycledPages)", "\"recycled_pages_reused\":\(recycledPagesReused)",
            "\"pages_installed_from_staging\":\(pagesInstalledFromStaging)",
            "\"postcopy_cpu_latency\":\(cpuLatencyJSON(postcopyCPULatency))", "\"sealed_runs_hurried\":\(sealedRunsHurried)",
            "\"bytes_received\":\(bytesReceived)", "\"digest_match\":\(digestMatch)", "\"guest_check\":\(guestCheck)",
            "\"digest_seconds\":\(fmt(digestSeconds, 6))", "\"digest_pages_from_memory\":\(digestPagesFromMemory)",
            "\"digest_pages_guest_written\":\(digestPagesGuestWritten)", "\"postcopy\":\(postcopy)",
            "\"abandoned_attempts\":[" + abandonedAttempts.map { "\"\(jsonEscape($0))\"" }.joined(separator: ",") + "]",
            "\"guest_mismatches\":\(guestMismatches)", "\"passes_after_migration\":\(passesAfterMigration)",
        ]
    }

    func preFaultJSON(_ s: PreFaultSummary?) -> String {
        guard let s else { return "null" }
        return "{\"bytes\":\(s.bytesMapped),\"calls\":\(s.calls),\"retries\":\(s.retries),\"ms\":\(fmt(s.milliseconds, 3)),"
            + "\"error\":" + (s.error.map { "\"\(jsonEscape($0))\"" } ?? "null") + "}"
    }

    func json(faultModeReason: String) -> String {
        "{\"side\":\"destination\"," + jsonFields(faultModeReason: faultModeReason).joined(separator: ",") + "}"
    }
}
