import FaultlineEngine

/// `demo`: both sides of the migration in one report - the source's keys, the destination's
/// (without `side`), and for a guest_memfd VM the path that ran (docs/reports.md, "demo").
/// `guest_check` is green only when both sides' checks were.
struct DemoReport: Codable, Sendable, Equatable {
    var source: SourceMigrationReport
    var guestMemfdPlan: GuestMemfdPlanReport?
    var destination: DestinationMigrationReport

    init(source: SourceMigrationReport, guestMemfdPlan: GuestMemfdPlanReport?, destination: DestinationMigrationReport) {
        self.source = source
        self.guestMemfdPlan = guestMemfdPlan
        self.destination = destination
    }

    init(from decoder: Decoder) throws {
        source = try SourceMigrationReport(from: decoder)
        destination = try DestinationMigrationReport(from: decoder)
        let keys = try decoder.container(keyedBy: GuestMemfdPlanReport.CodingKeys.self)
        guestMemfdPlan = keys.contains(.migrationPath) ? try GuestMemfdPlanReport(from: decoder) : nil
    }

    func encode(to encoder: Encoder) throws {
        try source.encode(to: encoder)
        try guestMemfdPlan?.encode(to: encoder)
        try destination.encode(to: encoder)
    }

    /// The source's report, the guest_memfd path that ran (its text), and a summary of the destination's.
    func text(guestMemfdPlan planText: String?) -> String {
        let d = destination
        let l = d.faultLatency
        var lines = [source.text]
        if let planText { lines.append(planText) }
        lines.append("destination (fault mode \(d.faultMode): \(d.faultModeReason))")
        lines.append("  faults                \(d.faults)\(d.viaText), latency p50 \(l.p50) us, p90 \(l.p90) us, p99 \(l.p99) us, max \(l.max) us")
        lines.append("  vCPU stall (ms)       \(d.vcpuStallMilliseconds)")
        if let c = d.postcopyCPULatency { lines.append("  CPU latency request   \(cpuLatencyText(c))") }
        lines += d.preFaultLines
        lines.append("  digest_match          \(d.digestMatch)")
        lines.append("  guest_check           \(d.guestCheck ? "green" : "RED") (\(d.guestMismatches) mismatches on the destination, "
                     + "\(d.passesAfterMigration) passes after the migration)")
        return lines.joined(separator: "\n")
    }
}
