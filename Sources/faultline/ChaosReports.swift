import FaultlineEngine

/// The chaos proxy's line in `demo` and `restore --from` output: the seeded schedule and what
/// of it fired (`bench chaos` reads it; docs/reports.md, "Chaos").
struct ChaosProxyReport: Codable, Sendable, Equatable {
    var chaos: Schedule

    struct Schedule: Codable, Sendable, Equatable {
        var seed: UInt64 = 0
        var retries = 0
        var attempts = 0
        var disturbedAttemptsBeforeCommit = 0
        /// `attempt N: EVENT (frame type T)`, in the order they fired.
        var fired: [String] = []
        var firedPhases: [String] = []
        var unfired: [String] = []

        enum CodingKeys: String, CodingKey {
            case seed, retries, attempts, disturbedAttemptsBeforeCommit = "disturbed_attempts_before_commit", fired
            case firedPhases = "fired_phases", unfired
        }
    }

    init(chaos: Schedule) { self.chaos = chaos }

    init(_ s: ChaosProxy.Summary) {
        chaos = Schedule(seed: s.schedule.seed, retries: s.schedule.retries, attempts: s.attempts,
                         disturbedAttemptsBeforeCommit: s.disturbedAttemptsBeforeCommit,
                         fired: s.fired.map { "attempt \($0.attempt): \($0.event) (frame type \($0.frameType))" },
                         firedPhases: s.fired.map(\.event.phase.rawValue), unfired: s.unfired.map(\.description))
    }
}

/// `bench chaos --json`: one schedule's run and whether it ended correctly.
struct ChaosRunReport: Codable, Sendable, Equatable {
    var seed: UInt64
    var faultMode: String
    var workload: String
    var outcome: String
    var correct: Bool
    /// What was wrong (null: the run ended one of the allowed ways).
    @NullWhenAbsent var wrong: String?
    var seconds: Double
    var retries: Int
    var disturbedAttemptsBeforeCommit: Int
    var fired: [String]

    enum CodingKeys: String, CodingKey {
        case seed, faultMode = "fault_mode", workload, outcome, correct, wrong, seconds, retries
        case disturbedAttemptsBeforeCommit = "disturbed_attempts_before_commit", fired
    }

    var text: String {
        "seed \(seed) \(faultMode) \(workload): \(outcome)\(wrong.map { " - WRONG: \($0)" } ?? "") "
            + "(\(fmt(seconds, 1)) s; fired: \(fired.isEmpty ? "nothing" : fired.joined(separator: "; ")))"
    }
}

/// `bench chaos --json`: the batch summary after every schedule.
struct ChaosBatchReport: Codable, Sendable, Equatable {
    var path: String
    var schedules: Int
    var completed: Int
    /// The clean failures: `--path migration` counts failed_before_switchover, `--path restore` failed_before_start.
    var failedBeforeSwitchover: Int?
    var failedBeforeStart: Int?
    var wrong: Int
    var wrongSeeds: [UInt64]
    var eventsFiredByPhase: [String: Int]
    var memory: String
    var firstSeed: UInt64
    /// `--path restore`: whether the snapshot server survived the batch, and its requests by outcome.
    var serverAlive: Bool?
    var serverRequests: [String: Int]?

    enum CodingKeys: String, CodingKey {
        case path, schedules, completed, failedBeforeSwitchover = "failed_before_switchover", failedBeforeStart = "failed_before_start"
        case wrong, wrongSeeds = "wrong_seeds", eventsFiredByPhase = "events_fired_by_phase", memory, firstSeed = "first_seed"
        case serverAlive = "server_alive", serverRequests = "server_requests"
    }

    var text: String {
        let failed = failedBeforeSwitchover.map { "\($0) failed before the switch-over with the guest running" }
            ?? "\(failedBeforeStart ?? 0) failed before the restored guest started"
        var s = "\(schedules) schedules: \(completed) completed, \(failed), \(wrong) WRONG\(wrongSeeds.isEmpty ? "" : " (seeds \(wrongSeeds))"); "
            + "events fired by phase: \(eventsFiredByPhase.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))"
        if let serverAlive {
            s += "; the server \(serverAlive ? "kept running" : "DID NOT keep running") and saw "
                + (serverRequests ?? [:]).sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
        }
        return s
    }
}
