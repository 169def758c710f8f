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
    /// and acknowledges once it has. The guest dirties more meanwhile: the dirty log is read
    /// again (still running) and those pages are discarded too, until few are left, so the
    /// switch-over drops only the pages dirtied in the last moments. Every page collected
    /// here joins `pendingDirty` (the summary owes it).
    func discardBeforePause(_ dirty: [Int]) throws {
        // The missed-dirty-page injection needs a stale copy left at the destination: it picks
        // from the whole final dirty set, which an early discard would have emptied.
        guard accepted.contains(.earlyDiscard), accepted.contains(.roundAcks), !dirty.isEmpty,
              !options.missOneDirtyPage else { return }
        let t0 = MonotonicClock.nanoseconds()
        let owed = PageBitmap(count: layout.totalPages)
        for page in dirty { _ = owed.insert(page) }
        var batch = dirty
        for _ in 0..<Self.discardPasses {
            try bulk.send(.discard(Self.ranges(of: batch, from: layout.lowPages)))
            try awaitRoundStored()
            let again = PageBitmap(count: layout.totalPages)
            try machine.collectDirty(into: again)
            batch = []
            again.forEachSetPage { if owed.insert($0) { batch.append($0) } }  // already discarded: owed anyway
            if batch.count <= Self.switchoverDropPages { break }
        }
        pendingDirty = []
        owed.forEachSetPage { pendingDirty.append($0) }
        report.precopyDiscardSeconds = Double(MonotonicClock.nanoseconds() - t0) / 1e9
    }

    /// At most this many discard passes before the pause.
    static let discardPasses = 4
    /// Few enough pages to drop at the switch-over (about a millisecond).
    static let switchoverDropPages = 1024

    /// Ascending pages (at or above `first`) as ascending, disjoint ranges.
    static func ranges(of pages: [Int], from first: Int) -> [Range<UInt64>] {
        var ranges: [Range<UInt64>] = []
        for page in pages where page >= first {
            let p = UInt64(page)
            if let last = ranges.last, last.upperBound == p { ranges[ranges.count - 1] = last.lowerBound..<(p + 1) }
            else { ranges.append(p..<(p + 1)) }
        }
        return ranges
    }
}

extension MigrationSource {
    /// From the pause to the commit the migration thread runs SCHED_FIFO (best effort): it
    /// only sends, reads the dirty log and waits for the destination, and on a busy machine
    /// every time slice it waited for would count as downtime.
    func setPausedWindowPriority(_ realtime: Bool) {
        try? ThreadScheduling.setRealtimeFIFO(realtime, ofThread: ThreadScheduling.currentThreadID())
    }
}
