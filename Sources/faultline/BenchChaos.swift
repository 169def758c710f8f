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
        let chaos: [String: Any]
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
        try summarize(results, failedKey: "failed_before_switchover", failedText: "failed before the switch-over with the guest running")
    }

    /// Runs every schedule (`body` runs schedule `i` with its seed and judges it), printing
    /// each run's line, and keeping its output in `--log-dir`.
    func runSchedules(_ body: (Int, UInt64) throws -> (BoundedChild.Outcome, RunResult)) throws -> [RunResult] {
        var results: [RunResult] = []
        for i in 0..<schedules {
            let s = seed &+ UInt64(i)
            let (child, result) = try body(i, s)
            let mode = result.mode, workload = result.workload
            if let logDir {
                try? FileManager.default.createDirectory(atPath: logDir, withIntermediateDirectories: true)
                try? child.stdout.write(toFile: "\(logDir)/seed-\(s).stdout", atomically: false, encoding: .utf8)
                try? child.stderr.write(toFile: "\(logDir)/seed-\(s).stderr", atomically: false, encoding: .utf8)
            }
            results.append(result)
            if json {
                print(Self.line(result))
            } else {
                let fired = (result.chaos["fired"] as? [String] ?? []).joined(separator: "; ")
                print("seed \(s) \(mode) \(workload): \(result.outcome)\(result.wrong.map { " - WRONG: \($0)" } ?? "") "
                      + "(\(String(format: "%.1f", result.seconds)) s; fired: \(fired.isEmpty ? "nothing" : fired))")
            }
            if result.wrong != nil {
                FileHandle.standardError.write(Data(("seed \(s) stderr (last 40 lines):\n"
                    + child.stderr.split(separator: "\n").suffix(40).joined(separator: "\n") + "\n").utf8))
            }
            fflush(stdout)
        }
        return results
    }

    /// The summary line; exits 1 if any run was wrong, or `batchWrong` names something wrong
    /// beyond the runs. `failedKey`: the outcome of a clean failure on this path; `extra`: more
    /// JSON fields (and text) for the summary.
    func summarize(_ results: [RunResult], failedKey: String, failedText: String, extra: [(json: String, text: String)] = [],
                   batchWrong: String? = nil) throws {
        let wrong = results.filter { $0.wrong != nil }
        let completed = results.filter { $0.outcome == "completed" }.count
        let failedBefore = results.filter { $0.outcome == failedKey }.count
        var phases: [String: Int] = [:]
        for r in results { for p in r.chaos["fired_phases"] as? [String] ?? [] { phases[p, default: 0] += 1 } }
        let phaseText = phases.sorted { $0.key < $1.key }.map { "\"\($0.key)\":\($0.value)" }.joined(separator: ",")
        if json {
            print("{\"path\":\"\(path.rawValue)\",\"schedules\":\(results.count),\"completed\":\(completed),\"\(failedKey)\":\(failedBefore),"
                  + "\"wrong\":\(wrong.count),\"wrong_seeds\":[\(wrong.map { String($0.seed) }.joined(separator: ","))],"
                  + "\"events_fired_by_phase\":{\(phaseText)},\"memory\":\"\(memory)\",\"first_seed\":\(seed)"
                  + extra.map { "," + $0.json }.joined() + "}")
        } else {
            print("\(results.count) schedules: \(completed) completed, \(failedBefore) \(failedText), "
                  + "\(wrong.count) WRONG\(wrong.isEmpty ? "" : " (seeds \(wrong.map(\.seed)))"); "
                  + "events fired by phase: \(phases.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))"
                  + extra.map { "; " + $0.text }.joined())
        }
        if let batchWrong { FileHandle.standardError.write(Data("WRONG: \(batchWrong)\n".utf8)) }
        if !wrong.isEmpty || batchWrong != nil { throw ExitCode(1) }
    }

    /// Decides whether a run ended in one of the two allowed ways.
    static func judge(_ child: BoundedChild.Outcome, seed: UInt64, mode: String, workload: String) -> RunResult {
        var chaos: [String: Any] = [:]
        var report: [String: Any] = [:]
        for line in child.stdout.split(separator: "\n") where line.hasPrefix("{") {
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { continue }
            if let c = object["chaos"] as? [String: Any] { chaos = c } else { report = object }
        }
        let retries = chaos["retries"] as? Int ?? 0
        let disturbed = chaos["disturbed_attempts_before_commit"] as? Int ?? 0
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

    static func line(_ r: RunResult) -> String {
        let fired = (r.chaos["fired"] as? [String] ?? []).map { "\"\(jsonEscape($0))\"" }.joined(separator: ",")
        return "{\"seed\":\(r.seed),\"fault_mode\":\"\(r.mode)\",\"workload\":\"\(r.workload)\",\"outcome\":\"\(r.outcome)\","
            + "\"correct\":\(r.wrong == nil),\"wrong\":\(r.wrong.map { "\"\(jsonEscape($0))\"" } ?? "null"),"
            + "\"seconds\":\(String(format: "%.2f", r.seconds)),\"retries\":\(r.chaos["retries"] as? Int ?? 0),"
            + "\"disturbed_attempts_before_commit\":\(r.chaos["disturbed_attempts_before_commit"] as? Int ?? 0),\"fired\":[\(fired)]}"
    }
}
