import Foundation
import FaultlineLinux
#if canImport(Glibc)
import Glibc
#endif

/// A child process run to completion under a deadline, for the benchmarks that drive whole
/// migrations (`bench chaos`): its own process group, stdout and stderr into files (a chatty
/// child never blocks on a pipe), and past the deadline it is killed together with every
/// process it started. It is reaped only after that, so no signal reaches a reused pid or group.
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

    func run(timeout: Double) throws -> Outcome {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("faultline-child-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let outPath = dir.appendingPathComponent("stdout").path, errPath = dir.appendingPathComponent("stderr").path

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
        posix_spawnattr_setpgroup(&attributes, 0)

        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, arguments[0], &actions, &attributes, &argv, environ)
        guard rc == 0 else { throw CLIError(description: "posix_spawn \(arguments[0]): \(String(cString: strerror(rc)))") }

        let start = Date()
        let child = ChildProcessGroup(pid: pid)
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
        return Outcome(status: code, stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
                       stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "", timedOut: timedOut,
                       seconds: seconds)
    }
}
