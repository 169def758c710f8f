import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// A process watched through a pidfd: the descriptor turns readable when the process exits,
/// and a signal sent through it reaches that process or nobody (never a later process that
/// got its pid).
public final class ProcessWatch: @unchecked Sendable {
    public let pid: Int32
    public let fd: FileDescriptor

    /// Watches `pid` (pidfd_open). For a process that is not this one's child, open it while
    /// the process is known to be alive (e.g. it holds a connection open).
    public init(pid: Int32) throws(SystemError) {
        let raw = try systemCall("pidfd_open \(pid)") { fl_pidfd_open(pid, 0) }
        self.pid = pid
        fd = FileDescriptor(adopting: raw, label: "pidfd \(pid)")
    }

    /// Whether it has exited (the pidfd is readable).
    public var hasExited: Bool {
        var p = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) == 1
    }

    /// Sends `signal`; false if the process is gone.
    @discardableResult
    public func signal(_ signal: Int32) -> Bool { fl_pidfd_send_signal(fd.rawValue, signal) == 0 }
}

/// A child started with posix_spawn, in its own process group, with one descriptor of this
/// process handed over at a fixed number; watched through a pidfd and reaped only by `reap`
/// (so its pid stays its own until then).
public final class SpawnedProcess: @unchecked Sendable {
    public let watch: ProcessWatch
    public var pid: Int32 { watch.pid }
    /// Exit code, or 128 + the signal that ended it; nil until reaped.
    public private(set) var status: Int32?

    /// Starts `executable` with `arguments` (argv[1...]); `descriptor`, if given, is the
    /// child's descriptor `target` (every other descriptor of this process is close-on-exec).
    /// The child starts with no signal blocked, whatever this thread blocks.
    public init(executable: String, arguments: [String], passing descriptor: FileDescriptor? = nil, as target: Int32 = 3) throws(SystemError) {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var moved: Int32 = -1
        defer { if moved >= 0 { close(moved) } }
        if let descriptor {
            var source = descriptor.rawValue
            // dup2 onto itself would leave close-on-exec set: hand over a copy instead.
            if source == target {
                moved = fcntl(source, F_DUPFD_CLOEXEC, target + 1)
                guard moved >= 0 else { throw SystemError("fcntl F_DUPFD_CLOEXEC \(descriptor)", errno: fl_errno()) }
                source = moved
            }
            posix_spawn_file_actions_adddup2(&actions, source, target)
        }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP))

        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let rc = argv.withUnsafeBufferPointer { p in
            posix_spawn(&pid, executable, &actions, &attributes, p.baseAddress!, environ)
        }
        guard rc == 0 else { throw SystemError("posix_spawn \(executable)", errno: rc) }
        do {
            watch = try ProcessWatch(pid: pid)
        } catch {
            Glibc.kill(pid, SIGKILL)
            var raw: Int32 = 0
            _ = waitpid(pid, &raw, 0)
            throw error
        }
    }

    /// Whether it has exited (not reaped yet).
    public var hasExited: Bool { status != nil || watch.hasExited }

    /// Sends `signal` through the pidfd; false once it is gone.
    @discardableResult
    public func signal(_ signal: Int32) -> Bool { status == nil && watch.signal(signal) }

    /// Ends it now (SIGKILL).
    public func kill() { signal(SIGKILL) }

    /// Waits for it to exit and reaps it; returns `status`.
    @discardableResult
    public func reap() -> Int32 {
        if let status { return status }
        var raw: Int32 = 0
        var r: pid_t
        repeat { r = waitpid(pid, &raw, 0) } while r < 0 && fl_errno() == EINTR
        let code: Int32 = r != pid ? -1 : (raw & 0x7F == 0 ? (raw >> 8) & 0xFF : 128 + (raw & 0x7F))
        status = code
        return code
    }

    /// "exit 2", "SIGKILL", ... for a status from `reap`.
    public static func describe(status: Int32) -> String {
        status > 128 ? TerminationSignals.name(status - 128) : status < 0 ? "reaped elsewhere" : "exit \(status)"
    }
}

extension HostProcess {
    /// This process's id.
    public static var id: Int32 { getpid() }

    /// Ends this process at once with SIGKILL: a crash as its parent and peers see it (no
    /// cleanup, no flushed output, descriptors closed by the kernel).
    public static func crashNow() -> Never {
        _ = kill(getpid(), SIGKILL)
        _exit(137)
    }
}
