import FaultlineCore
import FaultlineLinux

extension DestinationAttempt {
    /// Pre-copy pages are stored by an installer thread while the next batch is received and
    /// checked (in order: one thread, a FIFO of scratches).
    func precopyStores() throws -> InstallPipeline {
        if let precopyPipeline { return precopyPipeline }
        let p = try InstallPipeline(.precopy, installer: installer, depth: 4, scratchPages: 256, runPages: 256, installers: 1,
                                    onFailure: { [failures] in failures.record("pre-copy installer", $0) })
        precopyPipeline = p
        return p
    }

    /// The switch-over begins: every pre-copy page is stored. (The idle installer thread is
    /// joined at the tear-down, not inside the downtime.)
    func finishPrecopyStores() throws {
        try precopyPipeline?.drain()
    }

    /// `roundAcks`: every page the source sent before `roundSent` has been stored (the bulk
    /// connection is read in order, so they all are by now).
    func acknowledgeRound() throws {
        try bulk.send(.ack(SessionAck.roundStored))
    }

    /// Closes one part of the switch-over breakdown (`switchover_parts_ms`).
    func switchPart(_ name: String) {
        switchParts.close(name, at: MonotonicClock.nanoseconds())
    }
}

extension DestinationAttempt {
    /// `earlyDiscard`: drop out-of-date pre-copied pages now, while the source's guest still
    /// runs, so that the switch-over drops only what was dirtied after the last round.
    func dropStaleEarly(_ discarded: [Range<UInt64>]) throws {
        for stale in table.dropPrecopied(try ramRanges(discarded, named: "discarded")) { try mapper.discard(stale) }
    }

    /// Page ranges from the wire, checked to lie in guest RAM (low memory is never owed).
    func ramRanges(_ wire: [Range<UInt64>], named what: String) throws -> [Range<Int>] {
        var ranges: [Range<Int>] = []
        ranges.reserveCapacity(wire.count)
        for r in wire {
            guard r.upperBound <= UInt64(layout.totalPages), r.lowerBound >= UInt64(layout.lowPages) else {
                throw MigrationError.protocolViolation("\(what) range \(r) is outside guest RAM")
            }
            ranges.append(Int(r.lowerBound)..<Int(r.upperBound))
        }
        return ranges
    }
}
