import ArgumentParser
import FaultlineCore
import FaultlineEngine
import Foundation

/// `bench chaos --path restore`: the seeded schedules against remote restores. One
/// `serve-snapshot` serves one snapshot to every run; each run is a `restore --from` whose
/// chaos proxy sits between the server's dial-back and the new guest (the server is told to
/// dial the proxy), so page data, control frames and both connections are hit as in a
/// migration, without pre-copy. A run must end one of two ways: completed with a matching
/// digest (the restored memory read back, against the snapshot's manifest) and a green guest;
/// or, when the schedule disturbed more sessions before the commit than the restore's retries
/// allow, a clean failure before the restored guest started (exit 3). And the server must
/// still be running after the last run: no restore's end stops it.
extension BenchChaos {
    func runRestorePath(modes: [String]) throws {
        let binary = binary
        var made: String?
        let folder: String
        if let snapshot {
            folder = snapshot
        } else {
            folder = NSTemporaryDirectory() + "faultline-chaos-snapshot-\(getpid())"
            made = folder
            let r = try BoundedChild(arguments: [binary, "run", "--vcpus", String(vcpus), "--memory", memory, "--workload", "selfcheck",
                                                 "--snapshot-to", folder, "--snapshot-after", "0.5", "--json"]).run(timeout: timeout)
            guard r.status == 0 else {
                throw CLIError(description: "bench chaos: writing the snapshot failed (exit \(r.status)): \(r.stderr.suffix(2000))")
            }
        }
        defer { if let made { try? FileManager.default.removeItem(atPath: made) } }

        let server = try BoundedChild(arguments: [binary, "serve-snapshot", folder, "--listen", "127.0.0.1:0", "--json"]).start()
        let endpoint = try Self.listeningEndpoint(of: server, timeout: 30)
        if !json { print("snapshot \(folder) served by pid \(server.child.pid) on \(endpoint)") }
        let results = try runSchedules { i, s in
            let mode = modes[i % modes.count]
            let arguments = [binary, "restore", "--from", endpoint, "--lazy", "--fault-mode", mode, "--json", "--run-after", "0.5",
                             "--chaos-seed", String(s), "--chaos-events", String(maxEvents)]
            let child = try BoundedChild(arguments: arguments).run(timeout: timeout)
            return (child, Self.judgeRestore(child, seed: s, mode: mode))
        }
        let alive = server.isRunning
        let served = server.stop()
        if let logDir {
            try? served.stdout.write(toFile: "\(logDir)/server.stdout", atomically: false, encoding: .utf8)
            try? served.stderr.write(toFile: "\(logDir)/server.stderr", atomically: false, encoding: .utf8)
        }
        var outcomes: [String: Int] = [:]
        for line in served.stdout.split(separator: "\n") where line.hasPrefix("{") {
            guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], o["request"] != nil else { continue }
            outcomes[o["outcome"] as? String ?? "?", default: 0] += 1
        }
        if !alive {
            FileHandle.standardError.write(Data(("the snapshot server exited (status \(served.status)); its stderr:\n"
                + served.stderr.split(separator: "\n").suffix(40).joined(separator: "\n") + "\n").utf8))
        }
        try summarize(results, server: (alive, outcomes), batchWrong: alive ? nil : "the snapshot server did not survive the batch")
    }

    /// The endpoint a started `serve-snapshot` prints first ("listening on HOST:PORT").
    static func listeningEndpoint(of server: BoundedChild.Started, timeout: Double) throws -> String {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline && server.isRunning {
            if let line = server.stdout.split(separator: "\n").first(where: { $0.hasPrefix("listening on ") }) {
                return String(line.dropFirst("listening on ".count))
            }
            usleep(20_000)  // its output is a file: polled
        }
        let ended = server.stop()
        throw CLIError(description: "bench chaos: serve-snapshot did not start listening (exit \(ended.status)): \(ended.stderr.suffix(2000))")
    }

    /// Decides whether a restore run ended in one of the two allowed ways.
    static func judgeRestore(_ child: BoundedChild.Outcome, seed: UInt64, mode: String) -> RunResult {
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
            else if disturbed > retries { wrong = "completed although \(disturbed) sessions were disturbed before the commit and only \(retries) retries were allowed" }
        } else if child.status == RestoreExit.failedBeforeStart {
            outcome = "failed_before_start"
            if report["outcome"] as? String != "failed_before_start" {
                wrong = "exit 3 without a failed_before_start report"
            } else if disturbed <= retries {
                wrong = "failed before the start although only \(disturbed) sessions were disturbed and \(retries) retries were allowed"
            }
        } else {
            outcome = report["outcome"] as? String ?? "exit \(child.status)"
            wrong = "exit \(child.status): \(report["error"] as? String ?? child.stderr.split(separator: "\n").last.map(String.init) ?? "")"
        }
        return RunResult(seed: seed, mode: mode, workload: "selfcheck", outcome: outcome, wrong: wrong, seconds: child.seconds,
                         chaos: chaos)
    }
}
