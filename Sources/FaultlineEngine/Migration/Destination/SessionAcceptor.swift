import FaultlineCore
import FaultlineLinux

/// Accepts the two connections (bulk and fault) of one session on the destination's
/// listener, and turns away what does not belong: a stranger that does not speak the
/// protocol, a hello of another session while one is expected.
final class SessionAcceptor: @unchecked Sendable {
    let listener: ListeningSocket

    struct Pair {
        let bulk: WireChannel
        let fault: WireChannel
        let hello: WireMessage.Hello
    }

    init(listener: ListeningSocket) { self.listener = listener }

    /// Accepts a bulk and a fault connection of one session (any order), without acking them.
    /// `session`: only that session is accepted (a reconnect); others get `reject`. With
    /// `orNewSession`, a hello pair of another session is returned too (the caller decides).
    func acceptPair(timeout: Double, session: UInt64?, orNewSession: Bool = false) throws -> Pair {
        var channels: [ConnectionRole: WireChannel] = [:]
        var hello: WireMessage.Hello?
        let deadline = MonotonicClock.deadline(after: timeout)
        while channels.count < 2 || channels.values.contains(where: { $0.socket.peerHasClosed }) {
            // A connection whose source has already closed it (the rest of a reconnect that
            // failed half-way) must not be paired with a newer one: drop it, keep accepting.
            for (role, channel) in channels where channel.socket.peerHasClosed {
                channel.close()
                channels[role] = nil
                FaultlineLog.note("destination: dropped a \(role) connection its source had already closed")
            }
            if channels.isEmpty { hello = nil }
            let left = MonotonicClock.secondsLeft(until: deadline)
            guard left > 0, let socket = try listener.accept(timeoutSeconds: max(0.01, left)) else {
                throw MigrationError.timeout("waiting for the source on \(listener.endpoint)")
            }
            socket.setReceiveTimeout(seconds: 10)
            let probe = WireChannel(socket: socket, role: .bulk)
            let message: WireMessage
            do {
                message = try probe.receive()
            } catch {
                // A stranger, a corrupt hello or a peer that went away: turn it away, keep listening.
                try? probe.send(.error(message: "\(error)"))
                probe.close()
                FaultlineLog.warn("destination: turned away a connection from \(socket.peer): \(error)")
                if channels.isEmpty && !orNewSession && session == nil, case WireError.unsupportedVersion = error { throw error }
                continue
            }
            guard case .hello(let h) = message else {
                try? probe.send(.reject(reason: "expected hello"))
                probe.close()
                FaultlineLog.warn("destination: turned away \(socket.peer): its first message is \(message.type), not hello")
                continue
            }
            let expected = hello?.sessionID ?? (orNewSession ? nil : session)
            if let expected, h.sessionID != expected {
                try? probe.send(.reject(reason: "unknown session \(h.sessionID)"))
                probe.close()
                continue
            }
            if channels[h.role] != nil {
                // A second connection of one role: the first was from an attempt that is gone.
                channels[h.role]?.close()
            }
            socket.setReceiveTimeout(seconds: 0)
            if h.role == .fault { try socket.preferLatency() }
            probe.role = h.role
            channels[h.role] = probe
            hello = h
        }
        return Pair(bulk: channels[.bulk]!, fault: channels[.fault]!, hello: hello!)
    }

    static func ack(_ pair: Pair) throws {
        for channel in [pair.bulk, pair.fault] {
            try channel.send(.helloAck(version: WireProtocol.version, features: pair.hello.features.intersection(.supported)))
        }
    }
}
