/// The values an `ack` carries; each has one meaning at one point of the session
/// (docs/protocol.md, "Acks").
public enum SessionAck {
    /// Destination -> source after `pageSetSummary`: everything is prepared, the vCPUs have
    /// not started. The source may now commit.
    public static let ready: UInt64 = 0
    /// Destination -> source after `complete`: every page is in and the digest, computed
    /// from guest memory, matched.
    public static let verified: UInt64 = 1
    /// Source -> destination after the verdict: a plain TCP copy follows (the yardstick).
    public static let baselineFollows: UInt64 = 2
    /// Source -> destination after `ready`: the source has committed (it will never resume
    /// its guest); the destination starts the vCPUs. The switch-over point.
    public static let commit: UInt64 = 3
    /// Source -> destination after the verdict: the source has the verdict. Until it arrives
    /// the destination keeps answering a reconnect of the session (a verdict lost in transit
    /// is sent again), for at most its reconnect timeout.
    public static let verdictReceived: UInt64 = 4
    /// Source -> destination at the end of a pre-copy round (feature `roundAcks`): every page
    /// of the round has been sent.
    public static let roundSent: UInt64 = 5
    /// Destination -> source after `roundSent`: every page sent before it is stored.
    public static let roundStored: UInt64 = 6
}
