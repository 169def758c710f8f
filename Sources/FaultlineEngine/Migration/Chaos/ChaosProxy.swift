import FaultlineCore
import FaultlineLinux

/// A frame-aware TCP proxy between a migration's source and destination that carries out a
/// `ChaosSchedule`: it forwards whole frames, follows the session's phase, and on the frames
/// the schedule names flips one bit or cuts the connection. The decisions are
/// `ChaosTracker`'s; this type only moves bytes. Test and benchmark use only.
public final class ChaosProxy: @unchecked Sendable {
    /// One proxied connection: the source's end and the destination's end.
    final class Link: @unchecked Sendable {
        let client: StreamSocket
        let server: StreamSocket
        var role: ConnectionRole = .bulk
        init(client: StreamSocket, server: StreamSocket) {
            self.client = client
            self.server = server
        }
        func cut() {
            client.shutdown()
            server.shutdown()
        }
    }

    public struct Summary: Sendable {
        public let schedule: ChaosSchedule
        public let fired: [ChaosTracker.Firing]
        public let unfired: [ChaosEvent]
        public let attempts: Int
        public let disturbedAttemptsBeforeCommit: Int
    }

    let listener: ListeningSocket
    let upstream: SocketEndpoint
    let tracker: Locked<ChaosTracker>
    let links = Locked<[Link]>([])
    let threads = Locked<[OSThread]>([])
    let stopping = Locked(false)
    var acceptor: OSThread?

    /// Listens on a free port of `host` (loopback unless the source comes from elsewhere) and
    /// forwards every connection to `upstream`.
    public init(upstream: SocketEndpoint, schedule: ChaosSchedule, host: String = "127.0.0.1") throws {
        self.upstream = upstream
        tracker = Locked(ChaosTracker(schedule: schedule))
        listener = try ListeningSocket(endpoint: SocketEndpoint(host: host, port: 0))
        acceptor = try OSThread(name: "chaos accept") { [self] in acceptLoop() }
    }

    /// Where the source should connect.
    public var endpoint: SocketEndpoint { listener.endpoint }

    public var summary: Summary {
        tracker.withLock { t in
            Summary(schedule: t.schedule, fired: t.fired, unfired: t.unfired, attempts: t.attempts,
                    disturbedAttemptsBeforeCommit: t.disturbedAttemptsBeforeCommit)
        }
    }

    /// Cuts every connection and joins every thread.
    public func stop() {
        stopping.withLock { $0 = true }
        acceptor?.join()
        acceptor = nil
        for link in links.withLock({ $0 }) { link.cut() }
        for thread in threads.withLock({ list in let all = list; list = []; return all }) { thread.join() }
    }

    deinit { stop() }

    func acceptLoop() {
        while !stopping.withLock({ $0 }) {
            guard let client = try? listener.accept(timeoutSeconds: 0.05) else { continue }
            guard let server = try? StreamSocket.connect(to: upstream, timeoutSeconds: 2) else {
                client.shutdown()
                continue
            }
            let link = Link(client: client, server: server)
            links.withLock { $0.append(link) }
            spawn("chaos to destination") { [self] in pump(link, .toDestination) }
        }
    }

    func spawn(_ name: String, _ body: @escaping () -> Void) {
        guard let thread = try? OSThread(name: name, body) else { return }
        threads.withLock { $0.append(thread) }
    }

    /// Forwards whole frames one way until either end closes or the schedule cuts the link.
    func pump(_ link: Link, _ direction: ChaosDirection) {
        let (from, to) = direction == .toDestination ? (link.client, link.server) : (link.server, link.client)
        var frame: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        var first = direction == .toDestination
        defer { link.cut() }
        while true {
            frame.removeAll(keepingCapacity: true)
            guard read(WireProtocol.headerSize, from: from, into: &frame, chunk: &chunk) else { return }
            let length = Int(UInt32(frame[8]) | UInt32(frame[9]) << 8 | UInt32(frame[10]) << 16 | UInt32(frame[11]) << 24)
            guard length <= WireProtocol.maxPayloadLength, read(length, from: from, into: &frame, chunk: &chunk) else { return }
            // The source's first frame is its hello, which names the connection's role.
            if first, let role = frameRole(frame) { link.role = role }
            let decision = frame.withUnsafeBytes { raw in
                tracker.withLock { $0.decide(role: link.role, direction: direction, frame: raw) }
            }
            switch decision {
            case .forward: break
            case .cut(let both):
                if both { for other in links.withLock({ $0 }) { other.cut() } }
                return
            case .flip(let offset, let mask):
                frame[offset] ^= mask
            }
            do { try to.sendAll(frame) } catch { return }
            if first {
                first = false
                spawn("chaos to source") { [self] in pump(link, .toSource) }
            }
        }
    }

    /// The role a hello frame opens (payload offset 4), or nil.
    func frameRole(_ frame: [UInt8]) -> ConnectionRole? {
        let at = WireProtocol.headerSize + 4
        guard frame.count >= at + 4, UInt16(frame[4]) | UInt16(frame[5]) << 8 == WireProtocol.MessageType.hello.rawValue else {
            return nil
        }
        return ConnectionRole(rawValue: UInt32(frame[at]) | UInt32(frame[at + 1]) << 8
                              | UInt32(frame[at + 2]) << 16 | UInt32(frame[at + 3]) << 24)
    }

    /// Appends exactly `count` bytes read from `socket`; false at end of stream or on an error.
    func read(_ count: Int, from socket: StreamSocket, into frame: inout [UInt8], chunk: inout [UInt8]) -> Bool {
        var left = count
        while left > 0 {
            let want = min(left, chunk.count)
            let got = chunk.withUnsafeMutableBytes { raw in
                (try? socket.receive(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<want]))) ?? 0
            }
            guard got > 0 else { return false }
            frame.append(contentsOf: chunk[0..<got])
            left -= got
        }
        return true
    }
}
