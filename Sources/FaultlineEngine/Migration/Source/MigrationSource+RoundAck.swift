import FaultlineCore
import FaultlineLinux

extension MigrationSource {
    /// Pre-copy flow control (feature `roundAcks`): the round is over when the destination has
    /// stored it, not when its pages are in socket buffers. So the round's time (and the
    /// bandwidth the convergence policy estimates from it) is end to end, and the source never
    /// pauses while megabytes of pre-copy pages still wait in buffers ahead of the vCPU state.
    /// The guest runs on meanwhile; what it dirties is in the next dirty log.
    func awaitRoundStored() throws {
        guard accepted.contains(.roundAcks) else { return }
        let t0 = MonotonicClock.nanoseconds()
        try bulk.send(.ack(SessionAck.roundSent))
        switch try bulk.receive() {
        case .ack(SessionAck.roundStored): break
        case .error(let m): throw MigrationError.peerError(m)
        case let other: throw MigrationError.protocolViolation("expected the round-stored ack, got \(other.type)")
        }
        report.precopyDrainSeconds += Double(MonotonicClock.nanoseconds() - t0) / 1e9
    }
}

extension MigrationSource {
    /// Before pausing for post-copy (feature `earlyDiscard`): the pages the last round found
    /// dirty are owed anyway; the destination drops its copies now, while the guest runs here,
    /// and waits with its acknowledgement until it has. The switch-over then drops only the
    /// pages dirtied after the last dirty log.
    func discardBeforePause(_ dirty: [Int]) throws {
        guard accepted.contains(.earlyDiscard), accepted.contains(.roundAcks), !dirty.isEmpty else { return }
        let t0 = MonotonicClock.nanoseconds()
        var ranges: [Range<UInt64>] = []
        for page in dirty where page >= layout.lowPages {
            let p = UInt64(page)
            if let last = ranges.last, last.upperBound == p { ranges[ranges.count - 1] = last.lowerBound..<(p + 1) }
            else { ranges.append(p..<(p + 1)) }
        }
        try bulk.send(.discard(ranges))
        try awaitRoundStored()
        report.precopyDiscardSeconds = Double(MonotonicClock.nanoseconds() - t0) / 1e9
    }
}
