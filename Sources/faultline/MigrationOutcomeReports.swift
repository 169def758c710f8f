/// `run` / `demo`: every attempt failed before the switch-over, and the guest kept running on
/// the source (docs/reports.md, "Failures").
struct FailedBeforeSwitchoverReport: Codable, Sendable, Equatable {
    var side = "source"
    var outcome = "failed_before_switchover"
    var error: String
    var attempts: Int
    var guestRunning: Bool
    var passesAtFailure: UInt64
    var passesAfterFailure: UInt64

    enum CodingKeys: String, CodingKey {
        case side, outcome, error, attempts, guestRunning = "guest_running", passesAtFailure = "passes_at_failure"
        case passesAfterFailure = "passes_after_failure"
    }
}

/// `demo --vm-type sw-protected`: a guest_memfd VM's migration refused before it started.
struct RefusedBeforeStartReport: Codable, Sendable, Equatable {
    var side = "source"
    var outcome = "refused_before_start"
    var vmType = "sw-protected"
    /// The kernel features the migration would need.
    var missing: String
    var error: String
    var privatePages: Int

    enum CodingKeys: String, CodingKey {
        case side, outcome, vmType = "vm_type", missing, error, privatePages = "private_pages"
    }
}

/// `run --snapshot-to`: the keys added to the snapshot writer's report.
struct SnapshotWrittenFields: Codable, Sendable, Equatable {
    var outcome = "snapshot_written"
    var passesBeforeSnapshot: UInt64
    var guestMismatches: UInt64
    /// How long pausing the vCPUs took.
    var pauseMilliseconds: Double

    enum CodingKeys: String, CodingKey {
        case outcome, passesBeforeSnapshot = "passes_before_snapshot", guestMismatches = "guest_mismatches"
        case pauseMilliseconds = "pause_ms"
    }
}
