import FaultlineCore
import Testing

@Suite("Convergence policy, page states, failure table")
struct MigrationPolicyTests {
    func round(_ dirty: Int, mb: Double = 100, seconds: Double = 1) -> PrecopyRound {
        PrecopyRound(pagesSent: 1000, bytesSent: UInt64(mb * 1e6), seconds: seconds, dirtyAfter: dirty)
    }

    @Test func aRoundIsCutShortAtTheTimeLimitOnlyWherePostcopyCanTakeTheRest() {
        for postcopy in [PostcopyPolicy.auto, .always] {
            let p = ConvergencePolicy(postcopy: postcopy, maxRounds: 5, maxSeconds: 2)
            #expect(!p.cutsRoundShort(elapsed: 1.999))
            #expect(p.cutsRoundShort(elapsed: 2))
        }
        #expect(!ConvergencePolicy(postcopy: .never, maxRounds: 5, maxSeconds: 2).cutsRoundShort(elapsed: 60))
    }

    @Test func noRoundsMeansPostcopyRightAway() {
        #expect(ConvergencePolicy(postcopy: .auto, maxRounds: 0).decide(rounds: [], elapsed: 0) == .postcopy(.roundLimit(0)))
        #expect(ConvergencePolicy(postcopy: .never, maxRounds: 0).decide(rounds: [], elapsed: 0) == .fail(.roundLimit(0)))
        #expect(ConvergencePolicy(postcopy: .auto, maxRounds: 3).decide(rounds: [], elapsed: 0) == .nextRound)
    }

    @Test func stopsAndCopiesWhenTheRestFitsTheTarget() {
        // 100 MB/s; 1000 pages = 4.096 MB = 41 ms.
        let p = ConvergencePolicy(postcopy: .auto, maxRounds: 10, maxDowntimeMilliseconds: 50)
        guard case .stopAndCopy(.fitsDowntime(let ms)) = p.decide(rounds: [round(1000)], elapsed: 1) else {
            Issue.record("expected stop-and-copy"); return
        }
        #expect(abs(ms - 40.96) < 0.01)
        #expect(p.decide(rounds: [round(2000)], elapsed: 1) == .nextRound)  // 82 ms > 50 ms
    }

    @Test func autoSwitchesToPostcopyWhenTheDirtySetStopsShrinking() {
        let p = ConvergencePolicy(postcopy: .auto, maxRounds: 10, maxDowntimeMilliseconds: 1)
        #expect(p.decide(rounds: [round(5000), round(4000)], elapsed: 2) == .nextRound)
        #expect(p.decide(rounds: [round(5000), round(5000)], elapsed: 2) == .postcopy(.notShrinking(previous: 5000, now: 5000)))
    }

    @Test func neverKeepsTryingThenFails() {
        let p = ConvergencePolicy(postcopy: .never, maxRounds: 3, maxSeconds: 100, maxDowntimeMilliseconds: 1)
        #expect(p.decide(rounds: [round(5000), round(5000)], elapsed: 2) == .nextRound)
        #expect(p.decide(rounds: [round(5000), round(5000), round(5000)], elapsed: 3) == .fail(.roundLimit(3)))
    }

    @Test func alwaysRunsTheRoundsAskedForThenPostcopy() {
        let p = ConvergencePolicy(postcopy: .always, maxRounds: 3, maxDowntimeMilliseconds: 1e9)
        #expect(p.decide(rounds: [round(10), round(10)], elapsed: 1) == .nextRound)
        #expect(p.decide(rounds: [round(10), round(10), round(10)], elapsed: 1) == .postcopy(.roundLimit(3)))
        #expect(ConvergencePolicy(postcopy: .always, maxRounds: 9, maxSeconds: 1).decide(rounds: [round(1)], elapsed: 2)
                == .postcopy(.timeLimit(1)))
    }

    @Test func pageStatesFollowTheSwitchover() {
        let t = DestinationPageTable(count: 10)
        t.recordPrecopy(1, crc: 11)
        t.recordPrecopy(2, crc: 22)
        t.recordPrecopy(2, crc: 23)  // sent again: replaces
        t.recordPrecopy(3, crc: 33)
        #expect(t.state(0) == .absent && t.state(2) == .precopied)
        #expect(t.receivedCRC[2] == 23)
        let dropped = t.switchOver(owed: [2..<4, 5..<6])
        #expect(dropped == [2..<4])
        #expect(t.state(1) == .installed && t.state(2) == .stale && t.state(3) == .stale && t.state(5) == .absent)
        #expect(t.claim(2) && !t.claim(2) && !t.claim(1))
        #expect(t.markInstalled(2, crc: 24) && !t.markInstalled(2, crc: 24))
        #expect(t.state(2) == .installed)
    }

    @Test func anEarlyDiscardLeavesOnlyLaterDirtyPagesForTheSwitchover() {
        let t = DestinationPageTable(count: 10)
        for page in 1..<8 { t.recordPrecopy(page, crc: UInt32(page)) }
        #expect(t.dropPrecopied([2..<5, 9..<10]) == [2..<5])  // page 9 never had a copy
        #expect(t.state(2) == .stale && t.state(5) == .precopied)
        // The summary owes the discarded pages again, plus page 6 dirtied after the last round:
        // only page 6 is left to drop at the switch-over.
        #expect(t.switchOver(owed: [2..<5, 6..<7, 9..<10]) == [6..<7])
        #expect(t.state(3) == .stale && t.state(6) == .stale && t.state(5) == .installed && t.state(7) == .installed)
    }

    @Test(arguments: MigrationPhase.allCases)
    func failuresBeforeTheCommitAbandonTheAttempt(phase: MigrationPhase) {
        for kind in FailureKind.allCases {
            let action = FailurePolicy.action(phase: phase, kind: kind)
            if phase.isBeforeCommit { #expect(action == .abandonAttempt) }
            else if kind == .connectionLost || kind == .corruptTransport { #expect(action == .reconnect) }
            else { #expect(action == .unrecoverable) }
        }
    }
}
