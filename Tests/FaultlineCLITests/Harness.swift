import Foundation
import Testing
import FaultlineLinux
import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

// The process harness of the CLI tests: every child runs under a deadline, its output is
// read while it runs (a chatty child never blocks on a full pipe), and a child that overruns
// is killed together with the processes it started. Signals go only to the child's group while
// the child is not reaped, and to other processes through pidfds (ChildProcessGroup): never to a
// pid or group id that is no longer the child's, nor to a child another test is spawning.

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
    private let process: ChildProcessGroup
    /// How issues name it, e.g. "faultline receive --listen 127.0.0.1:0".
    let name: String
    /// Read ends of stdout and stderr; -1 once at end of file.
    private var pipes: [Int32]
    private var output: [[UInt8]] = [[], []]
    private var lineStart = 0
    private var timedOut = false
    private var status: Int32? { process.status }

    /// Starts `faultline arguments`, behind `prefix` if given.
    convenience init(_ arguments: [String], as prefix: [String] = []) throws {
        let argv = prefix + [faultlineBinary().path] + arguments
        try self.init(executable: argv[0], arguments: Array(argv.dropFirst()),
                      name: (["faultline"] + arguments).joined(separator: " "))
    }

    init(executable: String, arguments: [String], name: String? = nil) throws {
        self.name = name ?? ([executable] + arguments).joined(separator: " ")
        // Pipes close-on-exec from birth: a child spawned meanwhile (by another test, or by
        // anything else in this process) must not keep them past its exec.
        var out: [Int32] = [-1, -1], err: [Int32] = [-1, -1]
        guard fl_pipe2(&out, O_CLOEXEC) == 0 else { throw HarnessError("pipe2", errno: errno) }
        guard fl_pipe2(&err, O_CLOEXEC) == 0 else {
            let code = errno
            close(out[0]); close(out[1])
            throw HarnessError("pipe2", errno: code)
        }
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
        process = ChildProcessGroup(pid: child)
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
                    let holders = ProcessTable.holders(ofPipes: pipes)
                    for p in holders { p.signal(SIGKILL) }
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
        // Pinned (pidfds): the SIGKILL round reaches these same processes or nobody.
        var victims = process.descendants() + ProcessTable.holders(ofPipes: pipes)
        process.signalGroup(SIGTERM)
        for v in victims { v.signal(SIGTERM) }
        let soft = ContinuousClock.now + .seconds(2)
        while !hasExited() && ContinuousClock.now < soft { pump(milliseconds: 50) }
        // Again: it may have started more meanwhile.
        victims += process.descendants() + ProcessTable.holders(ofPipes: pipes)
        process.signalGroup(SIGKILL)
        for v in victims { v.signal(SIGKILL) }
        let hard = ContinuousClock.now + .seconds(5)
        while !hasExited() && ContinuousClock.now < hard { pump(milliseconds: 50) }
        drain(for: .seconds(1))
    }

    /// Collects its status once it has exited; kills anything left in its process group first
    /// (the unreaped leader keeps the group's id from being reused).
    private func reap() {
        guard status == nil, hasExited() else { return }
        process.reap()
        for i in pipes.indices where pipes[i] >= 0 { close(pipes[i]); pipes[i] = -1 }
    }

    /// Whether it has exited, without reaping it.
    private func hasExited() -> Bool { process.hasExited }

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
}
