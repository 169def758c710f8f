import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// A connected Unix-domain socket (a stream from `connect`/`accept`, or one end of a
/// seqpacket pair), owning its descriptor. Blocking I/O; waits take explicit timeouts.
/// Descriptor passing and peer credentials are in UnixConnection+Descriptors.swift.
public final class UnixConnection: @unchecked Sendable {
    public let fd: FileDescriptor

    public init(fd: FileDescriptor) { self.fd = fd }

    public var label: String { fd.label }

    /// Connects to the stream socket at `path`.
    public static func connect(to path: String) throws(SystemError) -> UnixConnection {
        var addr = try unixAddress(path)
        let raw = try systemCall("socket(AF_UNIX)") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        let fd = FileDescriptor(adopting: raw, label: "unix \(path)")
        try systemCall("connect \(path)") {
            withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        }
        return UnixConnection(fd: fd)
    }

    /// Two connected seqpacket sockets (message boundaries kept), close-on-exec.
    public static func pair(label: String) throws(SystemError) -> (UnixConnection, UnixConnection) {
        var fds: [Int32] = [-1, -1]
        try systemCall("socketpair(AF_UNIX, SOCK_SEQPACKET) for \(label)") { fl_seqpacket_pair(&fds) }
        return (UnixConnection(fd: FileDescriptor(adopting: fds[0], label: "\(label) (a)")),
                UnixConnection(fd: FileDescriptor(adopting: fds[1], label: "\(label) (b)")))
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) until a read would not block (data, end
    /// of stream or an error). False on timeout.
    public func waitReadable(timeoutMilliseconds: Int32) throws(SystemError) -> Bool {
        var p = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
        while true {
            let rc = poll(&p, 1, timeoutMilliseconds)
            if rc >= 0 { return rc > 0 }
            let code = fl_errno()
            if code != EINTR { throw SystemError("poll \(label)", errno: code) }
        }
    }

    /// Whether the peer has shut its end (or reset it), without consuming anything.
    public var peerHasHungUp: Bool {
        var p = pollfd(fd: fd.rawValue, events: DescriptorPoll.Events.hangUp.rawValue, revents: 0)
        guard poll(&p, 1, 0) == 1 else { return false }
        return p.revents & (Int16(POLLHUP) | Int16(POLLERR) | DescriptorPoll.Events.hangUp.rawValue) != 0
    }

    /// Shuts both directions down: a thread blocked reading this socket (here or in the
    /// peer) wakes up at end of stream.
    public func shutdown() { _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_RDWR)) }
}

/// A listening Unix stream socket bound to a path, with the path's permissions set before
/// anyone can connect. The path is removed again in deinit (if it is still this socket).
public final class UnixListener: @unchecked Sendable {
    public let fd: FileDescriptor
    public let path: String
    private let inode: UInt64

    /// Binds and listens at `path` with permission bits `mode`. A stale socket left at the path
    /// (nothing accepts on it) is replaced; a live one, or any other file, is an error.
    public init(path: String, mode: UInt32 = 0o600) throws(SystemError) {
        var addr = try unixAddress(path)
        var existing = stat()
        if lstat(path, &existing) == 0 {
            guard existing.st_mode & S_IFMT == S_IFSOCK else {
                throw SystemError("bind \(path): the path exists and is not a socket", errno: EEXIST)
            }
            if (try? UnixConnection.connect(to: path)) != nil {
                throw SystemError("bind \(path): another server is listening there", errno: EADDRINUSE)
            }
            try systemCall("unlink stale socket \(path)") { unlink(path) }
        }
        let raw = try systemCall("socket(AF_UNIX)") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        fd = FileDescriptor(adopting: raw, label: "listen \(path)")
        try systemCall("bind \(path)") {
            withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        }
        // Until listen() nobody can connect, so the mode is in place before the first peer.
        do {
            try systemCall("chmod \(path) \(String(mode, radix: 8))") { fchmodat(AT_FDCWD, path, mode_t(mode), 0) }
            try systemCall("listen \(path)") { listen(raw, 8) }
        } catch {
            unlink(path)
            throw error
        }
        var bound = stat()
        inode = stat(path, &bound) == 0 ? UInt64(bound.st_ino) : 0
        self.path = path
    }

    deinit {
        var now = stat()
        if stat(path, &now) == 0, UInt64(now.st_ino) == inode { unlink(path) }
    }

    /// Waits up to `timeoutSeconds` (nil: forever) for a peer; nil on timeout.
    public func accept(timeoutSeconds: Double?) throws(SystemError) -> UnixConnection? {
        var p = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
        let deadline = timeoutSeconds.map { MonotonicClock.deadline(after: $0) }
        while true {
            let wait = deadline.map { Int32(min(MonotonicClock.secondsLeft(until: $0) * 1000, 1e9).rounded(.up)) } ?? -1
            let rc = poll(&p, 1, wait)
            if rc < 0 {
                let code = fl_errno()
                if code == EINTR { continue }
                throw SystemError("poll \(path)", errno: code)
            }
            if rc == 0 { return nil }
            let raw = fl_accept_cloexec(fd.rawValue)
            if raw >= 0 { return UnixConnection(fd: FileDescriptor(adopting: raw, label: "peer on \(path)")) }
            let code = fl_errno()
            // The peer may have gone between poll and accept: wait for the next one.
            if code == EINTR || code == ECONNABORTED || code == EAGAIN { continue }
            throw SystemError("accept on \(path)", errno: code)
        }
    }
}

/// A sockaddr_un for `path`; paths that do not fit (107 bytes and the NUL) are an error.
func unixAddress(_ path: String) throws(SystemError) -> sockaddr_un {
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    let capacity = MemoryLayout.size(ofValue: addr.sun_path)
    guard !bytes.isEmpty, bytes.count < capacity else {
        throw SystemError("socket path \"\(path)\": \(bytes.count) bytes (1 to \(capacity - 1) fit)", errno: ENAMETOOLONG)
    }
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    return addr
}
