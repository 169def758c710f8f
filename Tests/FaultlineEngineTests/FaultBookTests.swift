@testable import FaultlineEngine
import Testing

/// The destination's fault bookkeeping: latency, and the slow faults it keeps for the report.
@Suite("FaultBook (no kernel)")
struct FaultBookTests {
    @Test func slowFaultsAreCountedAndTheFirstAreKept() {
        let book = FaultBook(pages: 64, vcpus: 2, vcpusAccountOwnStall: false)
        let t0: UInt64 = 1_000_000_000
        #expect(book.noteRequest(3, vcpu: 0, at: t0))
        #expect(!book.noteRequest(3, vcpu: 1, at: t0 + 5), "one request per page")
        book.noteInstalled(3, now: t0 + 200_000, byReply: true)  // 200 us: not slow
        #expect(book.noteRequest(9, vcpu: 1, at: t0 + 10_000_000))
        book.noteInstalled(9, now: t0 + 12_500_000, byReply: true)  // 2.5 ms, 10 ms after the first fault
        #expect(book.slowCount.load(ordering: .relaxed) == 1)
        let slow = book.slowFaults
        #expect(slow.count == 1)
        #expect(slow.first?.page == 9)
        #expect(slow.first?.vcpu == 1)
        #expect(slow.first?.waited == 2_500_000)
        #expect(slow.first?.sinceFirstFault == 10_000_000)
        #expect(book.stallMilliseconds == [0.2, 2.5])
    }

    @Test func aSlowFaultSaysWhereItsWaitWent() {
        let book = FaultBook(pages: 64, vcpus: 1, vcpusAccountOwnStall: false)
        let t0: UInt64 = 5_000_000
        #expect(book.noteRequest(7, vcpu: 0, at: t0))
        book.noteSent(7, at: t0 + 20_000)              // the request left after 20 us
        book.noteReply(7, at: t0 + 1_800_000)          // the source's reply came after 1.8 ms
        book.noteReply(7, at: t0 + 1_900_000)          // a second reply does not move the first
        book.noteReply(99, at: t0)                     // outside the book: ignored
        book.noteInstalled(7, now: t0 + 1_900_000, byReply: true)
        #expect(book.noteRequest(8, vcpu: 0, at: t0))
        book.noteSent(8, at: t0 + 10_000)
        book.noteInstalled(8, now: t0 + 2_000_000, byReply: false)  // the stream got there first, no reply yet
        let slow = book.slowFaults
        #expect(slow.count == 2)
        #expect(slow[0].untilSent == 20_000 && slow[0].untilReply == 1_800_000 && slow[0].byReply)
        #expect(slow[1].untilSent == 10_000 && slow[1].untilReply == nil && !slow[1].byReply)
    }

    @Test func onlyTheFirstSlowFaultsAreKept() {
        let book = FaultBook(pages: 64, vcpus: 1, vcpusAccountOwnStall: false)
        for page in 0..<40 {
            _ = book.noteRequest(page, vcpu: 0, at: 1_000)
            book.noteInstalled(page, now: 1_000 + 3_000_000, byReply: false)
        }
        #expect(book.slowCount.load(ordering: .relaxed) == 40)
        #expect(book.slowFaults.count == FaultBook.slowKept)
        #expect(book.slowFaults.map(\.page) == Array(0..<FaultBook.slowKept))
    }
}
