/// Where a migration is, as far as failure handling is concerned. The line that matters is
/// the commit: before it the source holds the only live copy of the guest; after it the
/// destination's guest runs and the source's copy is no longer current.
public enum MigrationPhase: String, Sendable, CaseIterable {
    /// Connecting and handshake.
    case handshake
    /// Pre-copy rounds while the guest runs on the source.
    case precopy
    /// The source is paused and sends the vCPU state and what is still owed; not committed.
    case switchover
    /// The source committed (sent `commit`); the destination's guest runs, pages follow.
    case postcopy
    /// Every page sent; digest and verdict.
    case completion

    public var isBeforeCommit: Bool { self == .handshake || self == .precopy || self == .switchover }
}

/// What went wrong, as one classifier (shared by both sides) names it.
public enum FailureKind: String, Sendable, CaseIterable {
    /// The connection broke: reset, EOF, a send or receive timeout.
    case connectionLost
    /// Bytes arrived damaged in a way that loses the framing or a control message (a bad frame
    /// header, a damaged control frame): the connection cannot be trusted any more.
    case corruptTransport
    /// Intact frames that break the protocol (wrong message, page outside memory, bad session).
    case protocolViolation
    /// The peer reported an error or rejected us.
    case peerReported
    /// This side failed (a syscall, a thread, the guest).
    case local
    /// The digests differ: memory is not what the source had.
    case verification
}

/// What to do about a failure, decided from the phase and the kind only.
public enum FailureAction: String, Sendable {
    /// Before the commit: abandon this attempt. The source resumes (or never stopped) its guest;
    /// the destination throws away what it received. A retry may follow.
    case abandonAttempt
    /// After the commit, the connection is gone: reconnect and resume the session.
    case reconnect
    /// After the commit, nothing can repair it: report the cause on both sides; each side keeps
    /// its state (the source its paused guest, the destination its guest and pages).
    case unrecoverable
}

public enum FailurePolicy {
    /// The failure table (docs/design.md shows it).
    public static func action(phase: MigrationPhase, kind: FailureKind) -> FailureAction {
        if phase.isBeforeCommit { return .abandonAttempt }
        switch kind {
        case .connectionLost, .corruptTransport: return .reconnect
        case .protocolViolation, .peerReported, .local, .verification: return .unrecoverable
        }
    }
}
