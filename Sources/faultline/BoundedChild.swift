import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A child process run to completion under a deadline, for the benchmarks that drive whole
/// migrations (`bench chaos`): its own process group, stdout and stderr into files (a chatty
/// child never blocks on a pipe), and past the deadline it is killed together with every
/// process it started.
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
        var status: Int32 = 0
        var timedOut = false
        while true {
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid { break }
            if r < 0 && errno != EINTR { status = -1; break }
            if Date().timeIntervalSince(start) > timeout && !timedOut {
                timedOut = true
                Self.killTree(pid)
            }
            usleep(20_000)
        }
        let seconds = Date().timeIntervalSince(start)
        Self.killTree(pid)  // anything the child left behind
        let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return Outcome(status: code, stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
                       stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "", timedOut: timedOut,
                       seconds: seconds)
    }

    /// SIGKILL to the process group of `pid` and to every descendant found through /proc
    /// (a grandchild may have left the group).
    static func killTree(_ pid: pid_t) {
        var parents: [pid_t: [pid_t]] = [:]
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let child = pid_t(entry),
                  let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            if fields.count > 1, let parent = pid_t(fields[1]) { parents[parent, default: []].append(child) }
        }
        var stack = [pid], all: [pid_t] = []
        while let p = stack.popLast() {
            all.append(p)
            stack += parents[p] ?? []
        }
        kill(-pid, SIGKILL)
        for p in all.dropFirst() { kill(p, SIGKILL) }
    }
}
