import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

// The process harness of the CLI tests: every child runs under a deadline, its output is
// read while it runs (a chatty child never blocks on a full pipe), and a child that overruns
// is killed together with the processes it started.

/// How a child ended and what it printed. `status` is the exit code, or 128 + the signal
/// number when a signal ended it (as a shell reports it); -1 if it could not be collected.
struct CLIRun {
    let status: Int32
    let stdout: String
    let stderr: String
    let timedOut: Bool
}

/// The `faultline` binary built next to the test bundle.
func faultlineBinary() -> URL {
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    var dir = exe.deletingLastPathComponent()
    while dir.path != "/" {
        let candidate = dir.appendingPathComponent("faultline")
        if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    return URL(fileURLWithPath: ".build/debug/faultline")
}

/// Runs `faultline arguments` (behind `prefix`, e.g. `setpriv ...` or `ip netns exec NS`) to
/// completion. Past `timeout` seconds it is killed, an issue is recorded, and the result says
/// `timedOut`.
func run(_ arguments: [String], as prefix: [String] = [], timeout: TimeInterval = 120,
         sourceLocation: SourceLocation = #_sourceLocation) throws -> CLIRun {
    try Child(arguments, as: prefix).run(timeout: timeout, sourceLocation: sourceLocation)
}

/// Runs any executable the same way (the harness's own tests use `/bin/sh`).
func run(executable: String, arguments: [String], timeout: TimeInterval = 120,
         sourceLocation: SourceLocation = #_sourceLocation) throws -> CLIRun {
    try Child(executable: executable, arguments: arguments).run(timeout: timeout, sourceLocation: sourceLocation)
}

/// A child could not be started, or did not do what the harness waited for.
struct HarnessError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
    init(_ operation: String, errno code: Int32) {
        description = "\(operation): \(String(cString: strerror(code))) (errno \(code))"
    }
}

/// A child process in its own process group, stdin from /dev/null, stdout and stderr captured.
/// Not thread-safe: one test drives it.
final class Child {
    let pid: pid_t
    /// How issues name it, e.g. "faultline receive --listen 127.0.0.1:0".
    let name: String
    /// Read ends of stdout and stderr; -1 once at end of file.
    private var pipes: [Int32]
    private var output: [[UInt8]] = [[], []]
    private var lineStart = 0
    private var exited = false
    private var status: Int32?
    private var timedOut = false
    private static let spawnLock = NSLock()

    /// Starts `faultline arguments`, behind `prefix` if given.
    convenience init(_ arguments: [String], as prefix: [String] = []) throws {
        let argv = prefix + [faultlineBinary().path] + arguments
        try self.init(executable: argv[0], arguments: Array(argv.dropFirst()),
                      name: (["faultline"] + arguments).joined(separator: " "))
    }

    init(executable: String, arguments: [String], name: String? = nil) throws {
        self.name = name ?? ([executable] + arguments).joined(separator: " ")
        // Pipes and spawn under one lock: a child spawned by another test in between must not
        // inherit these pipes before they are close-on-exec.
        Child.spawnLock.lock()
        defer { Child.spawnLock.unlock() }
        var out: [Int32] = [-1, -1], err: [Int32] = [-1, -1]
        guard pipe(&out) == 0 else { throw HarnessError("pipe", errno: errno) }
        guard pipe(&err) == 0 else {
            let code = errno
            close(out[0]); close(out[1])
            throw HarnessError("pipe", errno: code)
        }
        for fd in out + err { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, out[1], 1)
        posix_spawn_file_actions_adddup2(&actions, err[1], 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // Its own process group (so one signal reaches all it starts in it), default
        // dispositions for the signals a test runner may ignore, nothing blocked.
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        posix_spawnattr_setpgroup(&attributes, 0)
        var defaults = sigset_t(), mask = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCHLD] { sigaddset(&defaults, signal) }
        sigemptyset(&mask)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setsigmask(&attributes, &mask)

        var argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var child = pid_t()
        let rc = posix_spawn(&child, executable, &actions, &attributes, &argv, environ)
        close(out[1]); close(err[1])
        guard rc == 0 else {
            close(out[0]); close(err[0])
            throw HarnessError("posix_spawn \(executable)", errno: rc)
        }
        pid = child
        pipes = [out[0], err[0]]
    }

    deinit {
        kill()
        for fd in pipes where fd >= 0 { close(fd) }
    }

    /// The next line of stdout, without its newline; nil at end of output or after `timeout`
    /// seconds without one. Stderr is read meanwhile.
    func readLine(timeout: TimeInterval) -> String? {
        let deadline = ContinuousClock.now + .seconds(timeout)
        while true {
            if let newline = output[0][lineStart...].firstIndex(of: UInt8(ascii: "\n")) {
                defer { lineStart = newline + 1 }
                return String(decoding: output[0][lineStart..<newline], as: UTF8.self)
            }
            let left = milliseconds(until: deadline)
            if pipes[0] < 0 || left == 0 { return nil }
            pump(milliseconds: min(left, 50))
        }
    }

    /// Waits up to `timeout` seconds for it to exit and close its output; past that kills it
    /// (and what it started) and records an issue. stdout is all it printed, lines returned by
    /// `readLine` included.
    func finish(timeout: TimeInterval, sourceLocation: SourceLocation = #_sourceLocation)
        -> (status: Int32, stdout: String, stderr: String, timedOut: Bool) {
        if status == nil {
            if !waitUntilDone(deadline: ContinuousClock.now + .seconds(timeout), sourceLocation: sourceLocation) {
                timedOut = true
                terminate()
                Issue.record("\(name) ran past its \(Child.format(timeout)) s timeout; killed", sourceLocation: sourceLocation)
            }
            reap()
        }
        return (status ?? -1, String(decoding: output[0], as: UTF8.self), String(decoding: output[1], as: UTF8.self), timedOut)
    }

    func run(timeout: TimeInterval, sourceLocation: SourceLocation) -> CLIRun {
        let r = finish(timeout: timeout, sourceLocation: sourceLocation)
        return CLIRun(status: r.status, stdout: r.stdout, stderr: r.stderr, timedOut: r.timedOut)
    }

    /// Ends it now (SIGTERM, SIGKILL 2 s later), with what it started; records nothing.
    func kill() {
        guard status == nil else { return }
        terminate()
        reap()
    }

    // MARK: - Waiting

    /// Reads output until it has exited and closed both pipes, or until `deadline` (false).
    /// Processes it left behind holding its output are killed 2 s after it exited.
    private func waitUntilDone(deadline: ContinuousClock.Instant, sourceLocation: SourceLocation) -> Bool {
        var exitSeen: ContinuousClock.Instant?
        while true {
            if hasExited() {
                if pipes.allSatisfy({ $0 < 0 }) { return true }
                let now = ContinuousClock.now
                if exitSeen == nil { exitSeen = now }
                if let seen = exitSeen, now - seen > .seconds(2) {
                    let holders = Child.holders(of: pipes)
                    for p in holders { Glibc.kill(p.pid, SIGKILL) }
                    Issue.record("\(name) exited, but processes it started (\(holders.map { String($0.pid) }.joined(separator: ", "))) still held its output; killed them",
                                 sourceLocation: sourceLocation)
                    drain(for: .seconds(1))
                    return true
                }
            }
            let left = milliseconds(until: deadline)
            if left == 0 { return false }
            pump(milliseconds: min(left, 50))
        }
    }

    /// SIGTERM to it, its process group, its descendants and whatever holds its output; SIGKILL
    /// to all of them 2 s later. Returns once it has exited (or 5 s after SIGKILL).
    private func terminate() {
        guard status == nil else { return }
        var victims = hasExited() ? Child.holders(of: pipes) : Child.descendants(of: pid) + Child.holders(of: pipes)
        killpg(pid, SIGTERM)
        for v in victims { Glibc.kill(v.pid, SIGTERM) }
        let soft = ContinuousClock.now + .seconds(2)
        while !hasExited() && ContinuousClock.now < soft { pump(milliseconds: 50) }
        // Again: it may have started more meanwhile; keep only the ones that are still the same process.
        victims = victims.filter { Child.startTime(of: $0.pid) == $0.start }
            + (hasExited() ? [] : Child.descendants(of: pid)) + Child.holders(of: pipes)
        killpg(pid, SIGKILL)
        for v in victims { Glibc.kill(v.pid, SIGKILL) }
        let hard = ContinuousClock.now + .seconds(5)
        while !hasExited() && ContinuousClock.now < hard { pump(milliseconds: 50) }
        drain(for: .seconds(1))
    }

    /// Collects its status once it has exited; kills anything left in its process group first
    /// (the unreaped leader keeps the group's id from being reused).
    private func reap() {
        guard status == nil, hasExited() else { return }
        killpg(pid, SIGKILL)
        var raw: Int32 = 0
        if waitpid(pid, &raw, 0) == pid {
            let signal = raw & 0x7F
            status = signal == 0 ? (raw >> 8) & 0xFF : 128 + signal
        } else {
            status = -1
        }
        for i in pipes.indices where pipes[i] >= 0 { close(pipes[i]); pipes[i] = -1 }
    }

    /// Whether it has exited, without reaping it.
    private func hasExited() -> Bool {
        if exited || status != nil { return true }
        var info = siginfo_t()
        let rc = waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT)
        if (rc == 0 && info.si_signo == SIGCHLD) || (rc < 0 && errno == ECHILD) { exited = true }
        return exited
    }

    /// Reads whatever arrives within `milliseconds` on the open pipes.
    private func pump(milliseconds: Int32) {
        let open = pipes.indices.filter { pipes[$0] >= 0 }
        guard !open.isEmpty else {
            usleep(useconds_t(milliseconds) * 1000)
            return
        }
        var fds = open.map { pollfd(fd: pipes[$0], events: Int16(POLLIN), revents: 0) }
        guard poll(&fds, nfds_t(fds.count), milliseconds) > 0 else { return }
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        for (slot, i) in open.enumerated() where fds[slot].revents != 0 {
            let n = read(pipes[i], &buffer, buffer.count)
            if n > 0 {
                output[i] += buffer[0..<n]
            } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                close(pipes[i])
                pipes[i] = -1
            }
        }
    }

    private func drain(for duration: Duration) {
        let end = ContinuousClock.now + duration
        while pipes.contains(where: { $0 >= 0 }) {
            let left = milliseconds(until: end)
            if left == 0 { break }
            pump(milliseconds: min(left, 50))
        }
        for i in pipes.indices where pipes[i] >= 0 { close(pipes[i]); pipes[i] = -1 }
    }

    private func milliseconds(until deadline: ContinuousClock.Instant) -> Int32 {
        let left = deadline - ContinuousClock.now
        guard left > .zero else { return 0 }
        let (seconds, attoseconds) = left.components
        return Int32(clamping: seconds * 1000 + attoseconds / 1_000_000_000_000_000 + 1)
    }

    private static func format(_ seconds: TimeInterval) -> String {
        seconds == seconds.rounded() ? String(Int(seconds)) : String(seconds)
    }

    // MARK: - Finding what it started (/proc)

    /// A process, with its start time so a reused pid is not mistaken for it.
    struct Relative: Equatable { let pid: pid_t; let start: UInt64 }

    private static func allPids() -> [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { pid_t($0) }
    }

    /// Parent and start time from /proc/PID/stat (fields 4 and 22; the name in field 2 may hold spaces).
    private static func procStat(of pid: pid_t) -> (parent: pid_t, start: UInt64)? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 19, let parent = pid_t(fields[1]), let start = UInt64(fields[19]) else { return nil }
        return (parent, start)
    }

    static func startTime(of pid: pid_t) -> UInt64? { procStat(of: pid)?.start }

    /// Every live descendant of `root`.
    static func descendants(of root: pid_t) -> [Relative] {
        var children: [pid_t: [Relative]] = [:]
        for pid in allPids() {
            if let s = procStat(of: pid) { children[s.parent, default: []].append(Relative(pid: pid, start: s.start)) }
        }
        var found: [Relative] = [], queue = [root]
        while let next = queue.popLast() {
            for child in children[next] ?? [] where !found.contains(child) {
                found.append(child)
                queue.append(child.pid)
            }
        }
        return found
    }

    /// Processes other than this one with one of `fds`' pipes open.
    static func holders(of fds: [Int32]) -> [Relative] {
        let names = Set(fds.filter { $0 >= 0 }.compactMap { fd -> String? in
            var info = Glibc.stat()
            return fstat(fd, &info) == 0 ? "pipe:[\(info.st_ino)]" : nil
        })
        guard !names.isEmpty else { return [] }
        let me = getpid()
        return allPids().filter { $0 != me }.compactMap { pid in
            let dir = "/proc/\(pid)/fd"
            let entries = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
            let holds = entries.contains { entry in
                (try? FileManager.default.destinationOfSymbolicLink(atPath: "\(dir)/\(entry)")).map(names.contains) ?? false
            }
            guard holds, let start = startTime(of: pid) else { return nil }
            return Relative(pid: pid, start: start)
        }
    }
}
