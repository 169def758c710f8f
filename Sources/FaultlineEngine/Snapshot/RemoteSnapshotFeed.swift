import FaultlineCore
import FaultlineLinux

/// A snapshot a `serve-snapshot` server serves: one request on a control connection, after
/// which the server dials back to the new guest as a migration source (docs/protocol.md,
/// "The snapshot service"). The new guest listens on this end's address of the control
/// connection: the server dials only the address a request came from.
final class RemoteSnapshotFeed: SnapshotFeed, @unchecked Sendable {
    let server: SocketEndpoint
    let name: String?
    let retries: Int
    let answerSeconds: Double
    private let channel: ServiceChannel
    private var reader: OSThread?
    private let ended = TimedCondition()
    private var outcome: FeedOutcome?

    /// Connects the control connection (nothing is asked yet). `answerSeconds` bounds the wait
    /// for the server's answer, which comes once it has checked the snapshot.
    init(server: SocketEndpoint, name: String?, retries: Int, connectSeconds: Double = 10, answerSeconds: Double = 120) throws {
        if let name { try RestoreRequest.checkName(name) }
        guard (0...RestoreRequest.maxRetries).contains(retries) else {
            throw ServiceRequestError.invalid("retries \(retries) (0...\(RestoreRequest.maxRetries))")
        }
        self.server = server
        self.name = name
        self.retries = retries
        self.answerSeconds = answerSeconds
        do {
            channel = ServiceChannel(socket: try StreamSocket.connect(to: server, timeoutSeconds: connectSeconds))
        } catch {
            throw RestoreRequestFailed(server: "\(server)", cause: error)
        }
    }

    deinit {
        channel.close()
        reader?.join()
    }

    var label: String { "\(server)" + (name.map { "/\($0)" } ?? "") }
    var listenHost: String { channel.socket.localHost ?? "0.0.0.0" }

    func start(dialing endpoint: SocketEndpoint, lazy: Bool, onGaveUp: @escaping @Sendable (_ final: Bool) -> Void) throws -> ServedSnapshot {
        let answer: RestoreAnswer
        do {
            try channel.send(RestoreRequest(dialBackPort: Int(endpoint.port), snapshot: name, lazy: lazy, retries: retries))
            guard let payload = try channel.receivePayload(seconds: answerSeconds) else {
                throw MigrationError.connectionClosed("the server closed the connection without answering")
            }
            answer = try ServiceChannel.decode(RestoreAnswer.self, payload, what: "the server's answer is not a restore answer")
        } catch {
            throw RestoreRequestFailed(server: label, cause: error)
        }
        guard answer.isAccepted, let served = answer.snapshot else {
            throw RestoreRefused(server: label, reason: answer.error ?? "refused without a reason")
        }
        reader = try OSThread(name: "restore control") { [self] in
            let result: FeedOutcome
            do {
                guard let payload = try channel.receivePayload(seconds: 0) else {
                    throw MigrationError.connectionClosed("the control connection to the snapshot server \(label)")
                }
                let end = try ServiceChannel.decode(RestoreEnd.self, payload, what: "the server's last message is not a restore end")
                result = FeedOutcome(error: end.outcome == "completed" ? nil : SnapshotServerFailed(server: label, end: end),
                                     reconnects: end.reconnects)
            } catch {
                result = FeedOutcome(error: ControlConnectionLost(server: label, cause: error))
            }
            ended.withLock { outcome = result }
            ended.broadcast()
            if let error = result.error { onGaveUp(error is SnapshotServerFailed) }
        }
        return served
    }

    func finish(waitingSeconds seconds: Double) -> FeedOutcome? {
        let result = ended.wait(timeoutNanoseconds: UInt64(seconds * 1e9)) { outcome != nil } ? ended.withLock { outcome } : nil
        channel.close()  // wakes the reader if the end never came
        reader?.join()
        reader = nil
        return result
    }
}

/// The server refused the request (before anything was built): its reason, as it gave it.
public struct RestoreRefused: Error, CustomStringConvertible {
    public let server: String
    public let reason: String
    public var description: String { "the snapshot server \(server) refused the restore: \(reason)" }
}

/// The request got no answer: the server could not be reached, went away, or does not speak
/// the snapshot service protocol.
public struct RestoreRequestFailed: Error, CustomStringConvertible {
    public let server: String
    public let cause: Error
    public var description: String { "asking the snapshot server \(server) for a restore failed: \(cause)" }
}

/// The server accepted, then failed serving the restore: its cause, as it reported it.
public struct SnapshotServerFailed: Error, CustomStringConvertible {
    public let server: String
    public let end: RestoreEnd
    public var description: String {
        "the snapshot server \(server) failed \(end.committed ? "after" : "before") the commit: \(end.error ?? "no cause given")"
    }
}

/// The control connection ended without the server's last message (the server went away, or
/// the connection was cut).
public struct ControlConnectionLost: Error, CustomStringConvertible {
    public let server: String
    public let cause: Error
    public var description: String { "lost the control connection to the snapshot server \(server): \(cause)" }
}
