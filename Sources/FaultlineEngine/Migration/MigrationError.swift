import FaultlineCore
import FaultlineLinux

public enum MigrationError: Error, CustomStringConvertible {
    case protocolViolation(String)
    case rejected(String)
    case peerError(String)
    case connectionClosed(String)
    /// Damaged bytes that cost the framing or a control message: the connection is dropped.
    case corruptTransport(String)
    case digestMismatch(source: UInt64, destination: UInt64)
    case timeout(String)
    /// `--postcopy never` and pre-copy did not converge.
    case didNotConverge(String)
    /// A fault-path or installer thread failed.
    case thread(String, Error)
    /// A failure after the commit that cannot be repaired (the cause inside).
    case unrecoverable(String)

    public var description: String {
        switch self {
        case .protocolViolation(let s): return "protocol violation: \(s)"
        case .rejected(let s): return "the peer rejected the migration: \(s)"
        case .peerError(let s): return "the peer reported an error: \(s)"
        case .connectionClosed(let s): return "connection closed: \(s)"
        case .corruptTransport(let s): return "corrupt data on the connection: \(s)"
        case .digestMismatch(let s, let d):
            return "memory digest mismatch: source 0x\(String(s, radix: 16)), destination 0x\(String(d, radix: 16))"
        case .timeout(let s): return "timed out: \(s)"
        case .didNotConverge(let s): return "pre-copy did not converge: \(s)"
        case .thread(let name, let e): return "\(name): \(e)"
        case .unrecoverable(let s): return "unrecoverable after the switch-over: \(s)"
        }
    }
}

/// The one classifier both sides use: which ``FailureKind`` an error is.
public enum FailureClassifier {
    public static func classify(_ error: Error) -> FailureKind {
        switch error {
        case let e as MigrationError:
            switch e {
            case .connectionClosed, .timeout: return .connectionLost
            case .corruptTransport: return .corruptTransport
            case .protocolViolation: return .protocolViolation
            case .rejected, .peerError: return .peerReported
            case .digestMismatch: return .verification
            case .didNotConverge, .unrecoverable: return .local
            case .thread(_, let inner): return classify(inner)
            }
        case let e as SystemError:
            return connectionErrnos.contains(e.code) ? .connectionLost : .local
        case let e as WireError:
            switch e {
            case .truncated: return .connectionLost
            case .headerChecksumMismatch, .payloadTooLarge, .checksumMismatch, .payloadChecksumMismatch: return .corruptTransport
            case .notAFaultlinePeer, .unsupportedVersion, .unknownMessageType, .malformed: return .protocolViolation
            }
        default:
            return .local
        }
    }

    /// errnos of a connection that is gone (or a peer that stopped answering).
    static let connectionErrnos: Set<Errno> = [.brokenPipe, .connectionReset, .socketNotConnected, .socketShutdown, .timedOut,
                                                .resourceTemporarilyUnavailable, .connectionRefused, .connectionAbort,
                                                .noRouteToHost, .networkUnreachable]

    public static func isConnectionLoss(_ error: Error) -> Bool {
        let kind = classify(error)
        return kind == .connectionLost || kind == .corruptTransport
    }
}
