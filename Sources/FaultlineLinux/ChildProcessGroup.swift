#if canImport(Glibc)
import Glibc
#endif
import CFaultlineShim

// Killing a child together with what it started, without ever signalling a pid or process group
// that is no longer ours. A pid (and a process group id) is free for reuse as soon as its process
// is reaped and gone, and a process found through /proc may be gone, and its pid reused, by the
// time it is signalled. So:
//  * the child's group is signalled only while the child is not reaped (a zombie leader still
//    holds its pid and its group's id);
//  * any other process is signalled through a pidfd opened while it was confirmed to be the
//    process that was found (same pid, same start time): a pidfd reaches that process or nobody;
//  * a process that holds the child's output but is a child of this process is not the child's:
//    it is a child another thread is spawning, between fork and exec (it holds every descriptor
//    of this process until exec closes them).

/// A child of this process in its own process group (group id = its pid). Only `reap()` reaps
/// it, so until then its pid and group id are its own and signals to them are safe.
public final class ChildProcessGroup {
    public let pid: Int32
    /// Exit code, or 128 + the signal that ended it; -1 if something else reaped it. Nil until reaped.
    public private(set) var status: Int32?
    private var exited = false

    public init(pid: Int32) { self.pid = pid }

    /// Whether it has exited, without reaping it.
    public var hasExited: Bool {
        if exited || status != nil { return true }
        var info = siginfo_t()
        if waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 {
            exited = info.si_signo == SIGCHLD
        } else if errno == ECHILD {
            // Reaped by someone else: its pid and group id may already belong to others.
            status = -1
        }
        return exited || status != nil
    }

    /// Sends `signal` to its process group; nothing once it is reaped.
    public func signalGroup(_ signal: Int32) {
        guard status == nil else { return }
        _ = killpg(pid, signal)
    }

    /// Its live descendants, pinned; none once it has exited (they are then others' children).
    public func descendants() -> [PinnedProcess] {
        guard !hasExited else { return [] }
        let table = ProcessTable.all()
        var children: [Int32: [ProcessTable.Entry]] = [:]
        for e in table { children[e.parent, default: []].append(e) }
        var found: [ProcessTable.Entry] = [], queue = [pid]
        while let next = queue.popLast() {
            for child in children[next] ?? [] where !found.contains(child) {
                found.append(child)
                queue.append(child.pid)
            }
        }
        return found.compactMap(PinnedProcess.init)
    }

    /// Waits until it exits (blocking), kills what is left in its process group while its
    /// exited leader still holds the group's id, then reaps it. Returns `status`.
    @discardableResult
    public func reap() -> Int32 {
        if let status { return status }
        var info = siginfo_t()
        guard (try? systemCall("waitid \(pid)") { waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) }) != nil else {
            status = -1
            return -1
        }
        exited = true
        _ = killpg(pid, SIGKILL)
        var raw: Int32 = 0
        let r = (try? systemCall("waitpid \(pid)") { waitpid(pid, &raw, 0) }) ?? -1
        if r == pid {
            let signal = raw & 0x7F
            status = signal == 0 ? (raw >> 8) & 0xFF : 128 + signal
        } else {
            status = -1
        }
        return status!
    }
}

/// A process held by a pidfd: a signal reaches it or nobody, never a later process with its pid.
public final class PinnedProcess {
    public let pid: Int32
    public let start: UInt64
    private let fd: Int32

    /// Nil when the process `entry` describes is gone (its pid free, or another process's), or
    /// when the kernel has no pidfds (before Linux 5.3): then it is not signalled at all.
    public init?(_ entry: ProcessTable.Entry) {
        let fd = fl_pidfd_open(entry.pid, 0)
        // The pidfd holds whichever process has the pid now: keep it only if that is the one found.
        guard fd >= 0, ProcessTable.entry(entry.pid)?.start == entry.start else {
            if fd >= 0 { close(fd) }
            return nil
        }
        self.pid = entry.pid
        self.start = entry.start
        self.fd = fd
    }

    deinit { close(fd) }

    /// Sends `signal` (0: only checks); false if it is gone.
    @discardableResult
    public func signal(_ signal: Int32) -> Bool { fl_pidfd_send_signal(fd, signal) == 0 }
}

/// Processes as /proc shows them.
public enum ProcessTable {
    /// A process; `start` (clock ticks after boot) tells it from a later process with its pid.
    public struct Entry: Equatable, Sendable {
        public let pid: Int32
        public let parent: Int32
        public let start: UInt64
    }

    /// Every process.
    public static func all() -> [Entry] { pids().compactMap(entry) }

    /// `pid` from /proc/PID/stat (parent and start time are fields 4 and 22; the name in
    /// field 2 may hold spaces and parentheses).
    public static func entry(_ pid: Int32) -> Entry? {
        guard let text = read("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 19, let parent = Int32(fields[1]), let start = UInt64(fields[19]) else { return nil }
        return Entry(pid: pid, parent: parent, start: start)
    }

    /// Processes holding one of the pipes `fds` refer to, pinned: not this process, and not its
    /// children (a child another thread is spawning holds every descriptor until its exec).
    public static func holders(ofPipes fds: [Int32]) -> [PinnedProcess] {
        let names = Set(fds.filter { $0 >= 0 }.compactMap { fd -> String? in
            var info = stat()
            return fstat(fd, &info) == 0 ? "pipe:[\(info.st_ino)]" : nil
        })
        guard !names.isEmpty else { return [] }
        let me = getpid()
        return pids().compactMap { pid -> PinnedProcess? in
            guard pid != me, let before = entry(pid), before.parent != me,
                  links(in: "/proc/\(pid)/fd").contains(where: names.contains),
                  let process = PinnedProcess(before) else { return nil }
            // Pinned after the descriptors were read: still the same process, so they were its.
            return process
        }
    }

    private static func pids() -> [Int32] { entries(of: "/proc").compactMap { Int32($0) } }

    private static func entries(of path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    private static func links(in dir: String) -> [String] {
        entries(of: dir).compactMap { name in
            var buffer = [CChar](repeating: 0, count: 256)
            let n = readlink("\(dir)/\(name)", &buffer, buffer.count - 1)
            return n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : nil
        }
    }

    private static func read(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 1024)
        let n = Glibc.read(fd, &buffer, buffer.count)
        return n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self) : nil
    }
}
