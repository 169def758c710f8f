import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// A host:port pair (IPv4 or a resolvable name).
public struct SocketEndpoint: Sendable, CustomStringConvertible, Equatable {
    public let host: String
    public let port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// Parses "HOST:PORT" (or ":PORT" / "PORT" for all interfaces).
    public init?(parsing text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard let last = parts.last, let port = UInt16(last) else { return nil }
        let host = parts.count > 1 ? parts.dropLast().joined(separator: ":") : ""
        self.init(host: host.isEmpty ? "0.0.0.0" : host, port: port)
    }

    public var description: String { "\(host):\(port)" }

    func sockaddr() throws(SystemError) -> sockaddr_in {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        if inet_pton(AF_INET, host, &addr.sin_addr) == 1 { return addr }
        var hints = addrinfo()
        hints.ai_family = AF_INET
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, nil, &hints, &result)
        guard rc == 0, let info = result, let sa = info.pointee.ai_addr else {
            throw SystemError("resolve \(host): \(String(cString: gai_strerror(rc)))", errno: ENOENT)
        }
        defer { freeaddrinfo(result) }
        addr.sin_addr = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr }
        return addr
    }
}

/// A connected TCP stream socket: owns its fd; blocking I/O meant for a dedicated thread.
/// (Faultline's page traffic runs on dedicated threads with blocking sockets: a fault reply
/// goes from recv() to UFFDIO_COPY on the same thread, with no event-loop hop.)
public final class StreamSocket: @unchecked Sendable {
    public let fd: FileDescriptor
    public let peer: String

    init(fd: FileDescriptor, peer: String) {
        self.fd = fd
        self.peer = peer
        var one: Int32 = 1
        setsockopt(fd.rawValue, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var size: Int32 = 4 << 20
        setsockopt(fd.rawValue, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd.rawValue, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Connects to `endpoint`, retrying refused connections until `timeoutSeconds` pass.
    public static func connect(to endpoint: SocketEndpoint, timeoutSeconds: Double = 10) throws(SystemError) -> StreamSocket {
        let addr = try endpoint.sockaddr()
        let deadline = fl_now_ns() + UInt64(timeoutSeconds * 1e9)
        while true {
            let raw = try systemCall("socket") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
            let fd = FileDescriptor(adopting: raw, label: "tcp \(endpoint)")
            var a = addr
            do {
                // Not retried on the same socket: an interrupted connect goes on in the background.
                try systemCall("connect \(endpoint)", retryOnInterrupt: false) {
                    withUnsafePointer(to: &a) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(raw, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                    }
                }
                return StreamSocket(fd: fd, peer: endpoint.description)
            } catch {
                let code = error.errno
                guard [ECONNREFUSED, ENETUNREACH, EINTR, ETIMEDOUT].contains(code) && fl_now_ns() < deadline else { throw error }
                usleep(50_000)
            }
        }
    }

    /// Sends every byte (retrying short writes and EINTR).
    public func sendAll(_ bytes: UnsafeRawBufferPointer) throws(SystemError) {
        var done = 0
        while done < bytes.count {
            done += try systemCall("send to \(peer)") {
                send(fd.rawValue, bytes.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL))
            }
        }
    }

    public func sendAll(_ bytes: [UInt8]) throws(SystemError) {
        let result: Result<Void, SystemError> = bytes.withUnsafeBytes { raw in Result { () throws(SystemError) in try sendAll(raw) } }
        try result.get()
    }

    /// Receives up to `buffer.count` bytes; 0 means the peer closed the connection.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int {
        try systemCall("recv from \(peer)") { recv(fd.rawValue, buffer.baseAddress, buffer.count, 0) }
    }

    /// Sets a receive timeout (0 = none); a timed-out receive throws EAGAIN.
    public func setReceiveTimeout(seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1e6))
        setsockopt(fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Sets a send timeout (0 = none): a peer that stops reading makes a send throw EAGAIN
    /// instead of blocking forever.
    public func setSendTimeout(seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1e6))
        setsockopt(fd.rawValue, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// The socket's TCP congestion control (TCP_CONGESTION), e.g. "bbr".
    public var congestionControl: String {
        var name = [CChar](repeating: 0, count: 32)
        var length = socklen_t(name.count)
        guard getsockopt(fd.rawValue, Int32(IPPROTO_TCP), TCP_CONGESTION, &name, &length) == 0 else { return "?" }
        return String(decoding: name.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Makes this a latency-first connection for small, sporadic messages (fault requests
    /// and replies): a congestion control that does not pace. BBR, a common default (and
    /// this machine's), paces every send by its estimate of the connection's bandwidth,
    /// which on a connection that carries a page now and then is low. "reno" is built into
    /// every kernel and allowed for unprivileged sockets.
    public func preferLatency() throws(SystemError) {
        guard congestionControl != "reno" else { return }
        var name = Array("reno".utf8CString)
        try systemCall("setsockopt TCP_CONGESTION reno") {
            setsockopt(fd.rawValue, Int32(IPPROTO_TCP), TCP_CONGESTION, &name, socklen_t(name.count - 1))
        }
    }

    /// Shuts both directions down: wakes a thread blocked in receive on this socket.
    public func shutdown() { _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_RDWR)) }

    /// The IPv4 address of this end (getsockname), e.g. "127.0.0.1"; nil if unknown.
    public var localHost: String? { address(getsockname) }

    /// The IPv4 address of the other end (getpeername); nil if unknown.
    public var peerHost: String? { address(getpeername) }

    private func address(_ call: (Int32, UnsafeMutablePointer<sockaddr>?, UnsafeMutablePointer<socklen_t>?) -> Int32) -> String? {
        var addr = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let rc = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { call(fd.rawValue, $0, &len) } }
        guard rc == 0, addr.sin_family == sa_family_t(AF_INET) else { return nil }
        var text = [CChar](repeating: 0, count: 32)
        guard inet_ntop(AF_INET, &addr.sin_addr, &text, 32) != nil else { return nil }
        return String(cString: text)
    }

    /// True when the peer has already closed its end (or reset it): the socket is readable
    /// and a peek finds end of stream, or poll reports a hang-up. Consumes nothing.
    public var peerHasClosed: Bool {
        let pollRDHUP: Int16 = 0x2000  // POLLRDHUP (Linux; Glibc's module map leaves it out)
        var p = pollfd(fd: fd.rawValue, events: Int16(POLLIN) | pollRDHUP, revents: 0)
        guard poll(&p, 1, 0) == 1 else { return false }
        if p.revents & (Int16(POLLHUP) | Int16(POLLERR) | pollRDHUP) != 0 { return true }
        var byte: UInt8 = 0
        return recv(fd.rawValue, &byte, 1, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT)) == 0
    }
}

/// A listening TCP socket.
public final class ListeningSocket: @unchecked Sendable {
    public let fd: FileDescriptor
    public let endpoint: SocketEndpoint

    public init(endpoint: SocketEndpoint) throws(SystemError) {
        let raw = try systemCall("socket") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        fd = FileDescriptor(adopting: raw, label: "listen \(endpoint)")
        var one: Int32 = 1
        setsockopt(raw, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = try endpoint.sockaddr()
        try systemCall("bind \(endpoint)") {
            withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(raw, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
        }
        try systemCall("listen \(endpoint)") { listen(raw, 16) }
        var bound = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(raw, $0, &len) }
        }
        self.endpoint = SocketEndpoint(host: endpoint.host, port: UInt16(bigEndian: bound.sin_port))
    }

    /// Stops listening: a thread waiting in ``accept(timeoutSeconds:)`` wakes and fails, and so
    /// does every later call (shutdown, which unlike close is safe while another thread polls).
    public func shutdown() { _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_RDWR)) }

    /// Waits up to `timeoutSeconds` (nil: forever) for a connection; nil on timeout.
    public func accept(timeoutSeconds: Double? = nil) throws(SystemError) -> StreamSocket? {
        if let timeoutSeconds {
            var p = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
            let rc = try systemCall("poll \(endpoint)") { poll(&p, 1, Int32(timeoutSeconds * 1000)) }
            if rc == 0 { return nil }
        }
        var addr = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let raw = try systemCall("accept on \(endpoint)") {
            withUnsafeMutablePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.accept(fd.rawValue, $0, &len) }
            }
        }
        var text = [CChar](repeating: 0, count: 32)
        inet_ntop(AF_INET, &addr.sin_addr, &text, 32)
        let peer = "\(String(cString: text)):\(UInt16(bigEndian: addr.sin_port))"
        return StreamSocket(fd: FileDescriptor(adopting: raw, label: "tcp \(peer)"), peer: peer)
    }
}
