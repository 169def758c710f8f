import Foundation
import FaultlineLinux
#if canImport(Glibc)
import Glibc
#endif

/// A child process run to completion under a deadline, for the benchmarks that drive whole
/// migrations (`bench chaos`): its own process group, stdout and stderr into files (a chatty
/// child never blocks on a pipe), and past the deadline it is killed together with every
/// process it started. It is reaped only after that, so no signal reaches a reused pid or group.
/// A child meant to run until told (the snapshot server of `bench chaos --path restore`) is
/// started, read from while it runs, and stopped.
struct BoundedChild {
    struct Outcome {
        /// Exit code, or 128 + the signal that ended it.
        let status: Int32
        let stdout: String
        let stderr: String
        let timedOut: Bool
        let seconds: Double
    }

    let arguments: [String]

    func run(timeout: Double) throws -> Outcome { try start().wait(timeout: timeout) }

    /// Starts it; ``Started/wait(timeout:)`` or ``Started/stop()`` ends it.
    func start() throws -> Started {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("faultline-child-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let outPath = dir.appendingPathComponent("stdout").path, errPath = dir.appendingPathComponent("stderr").path

        let pid: pid_t
        do {
            pid = try spawnInOwnGroup(arguments) { actions in
                posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
                posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
                posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            }
        } catch {
            try? FileManager.default.removeItem(at: dir)
            throw error
        }
        return Started(child: ChildProcessGroup(pid: pid), dir: dir, outPath: outPath, errPath: errPath)
    }

    /// A started child; its output goes to files in a folder of its own, removed when it is reaped.
    final class Started {
        let child: ChildProcessGroup
        let dir: URL
        let outPath: String
        let errPath: String
        let start = Date()

        init(child: ChildProcessGroup, dir: URL, outPath: String, errPath: String) {
            self.child = child
            self.dir = dir
            self.outPath = outPath
            self.errPath = errPath
        }

        deinit { try? FileManager.default.removeItem(at: dir) }

        /// What it printed so far.
        var stdout: String { (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "" }
        var stderr: String { (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "" }
        var isRunning: Bool { !child.hasExited }

        /// Waits until it exits; past `timeout` seconds kills it with everything it started.
        func wait(timeout: Double) -> Outcome {
            var timedOut = false
            while !child.hasExited {
                if Date().timeIntervalSince(start) > timeout && !timedOut {
                    timedOut = true
                    // Found through it while it runs (some left its group), before its group dies.
                    let descendants = child.descendants()
                    child.signalGroup(SIGKILL)
                    for d in descendants { d.signal(SIGKILL) }
                }
                usleep(20_000)
            }
            let seconds = Date().timeIntervalSince(start)
            // Kills what is left in its group while its exited leader still holds the group's id, then reaps it.
            let code = child.reap()
            return Outcome(status: code, stdout: stdout, stderr: stderr, timedOut: timedOut, seconds: seconds)
        }

        /// Ends a child meant to run until told: SIGTERM to its group, SIGKILL after `grace` seconds.
        func stop(grace: Double = 5) -> Outcome {
            if !child.hasExited { child.signalGroup(SIGTERM) }
            let deadline = Date().addingTimeInterval(grace)
            while !child.hasExited && Date() < deadline { usleep(20_000) }
            return wait(timeout: 0)
        }
    }
}
