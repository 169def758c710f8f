import ArgumentParser
import FaultlineCore
import FaultlineEngine
import Foundation

/// `faultline bench chaos`: seeded chaos schedules against whole demo migrations. Each run is a
/// `demo` with a frame-aware proxy between the two sides that flips bits in page data and
/// frame headers, in both directions, and cuts connections in every phase (docs/design.md,
/// "Chaos"). A run must end one of two ways: the migration completes with matching digests
/// (read back from destination memory) and a green guest; or, when the schedule disturbed more
/// attempts before the commit than `--retries` allows, it fails before the switch-over with
/// the source guest still running (its pass counter advances afterwards). Anything else - a
/// wrong digest, a failure after the switch-over, a hang, a crash - is WRONG. `--path restore`
/// runs the schedules against remote restores instead (BenchChaosRestore.swift).
struct BenchChaos: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chaos", abstract: "Seeded chaos schedules against live migrations or remote restores; every run must end correctly.")

    @Option(help: "Number of schedules") var schedules = 50
    @Option(help: "Seed of the first schedule (schedule i uses seed + i)") var seed: UInt64 = 1
    @Option(help: "Guest RAM of each migration") var memory = "256M"
    @Option(help: "Number of vCPUs") var vcpus = 2
    @Option(name: .customLong("fault-mode"), help: "all (rotate vcpu-exit, uffd-missing, uffd-minor where they work) or one mode")
    var faultMode = "all"
    @Option(name: .customLong("precopy-rounds"), help: "Pre-copy rounds before the switch-over (post-copy always follows)")
    var precopyRounds = 2
    @Option(name: .customLong("max-events"), help: "The most events per schedule") var maxEvents = 3
    @Option(help: "Seconds before a run counts as hung and is killed") var timeout = 180.0
    @Flag(help: "One JSON line per run and a JSON summary") var json = false
    @Option(name: .customLong("log-dir"), help: "Keep each run's output there (seed-N.stdout, seed-N.stderr; --path restore: server.stdout, server.stderr too)")
    var logDir: String?
    @Option(help: "migration (demo migrations) | restore (serve-snapshot and restore --from, through the proxy)")
    var path: ChaosPath = .migration
    @Option(help: "--path restore: the snapshot to serve (default: one written first, of a selfcheck guest of --memory)")
    var snapshot: String?

    enum ChaosPath: String, ExpressibleByArgument { case migration, restore }

    struct RunResult {
        let seed: UInt64
        let mode: String
        let workload: String
        let outcome: String
        let wrong: String?
        let seconds: Double
        let chaos: ChaosProxyReport.Schedule

        var report: ChaosRunReport {
            ChaosRunReport(seed: seed, faultMode: mode, workload: workload, outcome: outcome, correct: wrong == nil, wrong: wrong,
                           seconds: rounded(seconds, 2), retries: chaos.retries,
                           disturbedAttemptsBeforeCommit: chaos.disturbedAttemptsBeforeCommit, fired: chaos.fired)
        }
    }

    func modes() -> [String] {
        guard faultMode == "all" else { return [faultMode] }
        return FaultModeChoice.migrationModes.filter { FaultModeSelection.obstacle(to: $0, probe: .current) == nil }.map(\.rawValue)
    }

    var binary: String { URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path }

    func run() throws {
        let modes = modes()
        guard !modes.isEmpty else { throw CLIError(description: "bench chaos: no fault mode works on this machine") }
        if path == .restore { return try runRestorePath(modes: modes) }
        let binary = binary
        let results = try runSchedules { i, s in
            let mode = modes[i % modes.count]
            let workload = (i / modes.count) % 2 == 0 ? "selfcheck" : "dirtier"
            let arguments = [binary, "demo", "--json", "--memory", memory, "--vcpus", String(vcpus), "--workload", workload,
                             "--fault-mode", mode, "--precopy-rounds", String(precopyRounds), "--postcopy", "always",
                             "--migrate-after", "0.5", "--run-after", "0.5", "--chaos-seed", String(s),
                             "--chaos-events", String(maxEvents)]
            let child = try BoundedChild(arguments: arguments).run(timeout: timeout)
            return (child, Self.judge(child, seed: s, mode: mode, workload: workload))
        }
        try summarize(results)
    }

    /// Runs every schedule (`body` runs schedule `i` with its seed and judges it), printing
    /// each run's line, and keeping its output in `--log-dir`.
    func runSchedules(_ body: (Int, UInt64) throws -> (BoundedChild.Outcome, RunResult)) throws -> [RunResult] {
        var results: [RunResult] = []
        for i in 0..<schedules {
            let s = seed &+ UInt64(i)
            let (child, result) = try body(i, s)
            if let logDir {
                try? FileManager.default.createDirectory(atPath: logDir, withIntermediateDirectories: true)
                try? child.stdout.write(toFile: "\(logDir)/seed-\(s).stdout", atomically: false, encoding: .utf8)
                try? child.stderr.write(toFile: "\(logDir)/seed-\(s).stderr", atomically: false, encoding: .utf8)
            }
            results.append(result)
            if json { printJSON(result.report) } else { print(result.report.text) }
            if result.wrong != nil {
                FileHandle.standardError.write(Data(("seed \(s) stderr (last 40 lines):\n"
                    + child.stderr.split(separator: "\n").suffix(40).joined(separator: "\n") + "\n").utf8))
            }
            fflush(stdout)
        }
        return results
    }

    /// The summary line; exits 1 if any run was wrong, or `batchWrong` names something wrong
    /// beyond the runs. `server`: `--path restore`'s snapshot server, alive or not, and its
    /// requests by outcome.
    func summarize(_ results: [RunResult], server: (alive: Bool, requests: [String: Int])? = nil, batchWrong: String? = nil) throws {
        let wrong = results.filter { $0.wrong != nil }
        let failedKey = path == .migration ? "failed_before_switchover" : "failed_before_start"
        let failedBefore = results.filter { $0.outcome == failedKey }.count
        var phases: [String: Int] = [:]
        for r in results { for p in r.chaos.firedPhases { phases[p, default: 0] += 1 } }
        let report = ChaosBatchReport(
            path: path.rawValue, schedules: results.count, completed: results.filter { $0.outcome == "completed" }.count,
            failedBeforeSwitchover: path == .migration ? failedBefore : nil, failedBeforeStart: path == .restore ? failedBefore : nil,
            wrong: wrong.count, wrongSeeds: wrong.map(\.seed), eventsFiredByPhase: phases, memory: memory, firstSeed: seed,
            serverAlive: server?.alive, serverRequests: server?.requests)
        if json { printJSON(report) } else { print(report.text) }
        if let batchWrong { FileHandle.standardError.write(Data("WRONG: \(batchWrong)\n".utf8)) }
        if !wrong.isEmpty || batchWrong != nil { throw ExitCode(1) }
    }

    /// A run's chaos line (the proxy's schedule) and its report line: the last JSON line that is not the chaos one.
    static func readLines(_ stdout: String) -> (chaos: ChaosProxyReport.Schedule, report: [String: Any]) {
        var chaos = ChaosProxyReport.Schedule()
        var report: [String: Any] = [:]
        for line in stdout.split(separator: "\n") where line.hasPrefix("{") {
            if let c = try? decodeJSONLine(ChaosProxyReport.self, from: String(line)) {
                chaos = c.chaos
            } else if let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] {
                report = object
            }
        }
        return (chaos, report)
    }

    /// Decides whether a run ended in one of the two allowed ways.
    static func judge(_ child: BoundedChild.Outcome, seed: UInt64, mode: String, workload: String) -> RunResult {
        let (chaos, report) = readLines(child.stdout)
        let retries = chaos.retries
        let disturbed = chaos.disturbedAttemptsBeforeCommit
        let outcome: String
        var wrong: String?
        if child.timedOut {
            outcome = "hung"
            wrong = "no end within the deadline (killed)"
        } else if child.status == 0 {
            outcome = "completed"
            if report["digest_match"] as? Bool != true { wrong = "completed without a matching digest" }
            else if report["guest_check"] as? Bool != true { wrong = "completed with a red guest check" }
            else if disturbed > retries { wrong = "completed although \(disturbed) attempts were disturbed before the commit and only \(retries) retries were allowed" }
        } else if child.status == 3 {
            outcome = "failed_before_switchover"
            let at = report["passes_at_failure"] as? Int ?? 0, after = report["passes_after_failure"] as? Int ?? 0
            if report["guest_running"] as? Bool != true || after <= at {
                wrong = "failed before the switch-over but the source guest did not keep running (\(at) -> \(after) passes)"
            } else if disturbed <= retries {
                wrong = "failed before the switch-over although only \(disturbed) attempts were disturbed and \(retries) retries were allowed"
            }
        } else {
            outcome = report["outcome"] as? String ?? "exit \(child.status)"
            wrong = "exit \(child.status): \(report["error"] as? String ?? child.stderr.split(separator: "\n").last.map(String.init) ?? "")"
        }
        return RunResult(seed: seed, mode: mode, workload: workload, outcome: outcome, wrong: wrong, seconds: child.seconds,
                         chaos: chaos)
    }
}
