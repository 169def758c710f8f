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
        book.noteInstalled(3, now: t0 + 200_000)  // 200 us: not slow
        #expect(book.noteRequest(9, vcpu: 1, at: t0 + 10_000_000))
        book.noteInstalled(9, now: t0 + 12_500_000)  // 2.5 ms, 10 ms after the first fault
        #expect(book.slowCount.load(ordering: .relaxed) == 1)
        let slow = book.slowFaults
        #expect(slow.count == 1)
        #expect(slow.first?.page == 9)
        #expect(slow.first?.vcpu == 1)
        #expect(slow.first?.waited == 2_500_000)
        #expect(slow.first?.sinceFirstFault == 10_000_000)
        #expect(book.stallMilliseconds == [0.2, 2.5])
    }

    @Test func onlyTheFirstSlowFaultsAreKept() {
        let book = FaultBook(pages: 64, vcpus: 1, vcpusAccountOwnStall: false)
        for page in 0..<40 {
            _ = book.noteRequest(page, vcpu: 0, at: 1_000)
            book.noteInstalled(page, now: 1_000 + 3_000_000)
        }
        #expect(book.slowCount.load(ordering: .relaxed) == 40)
        #expect(book.slowFaults.count == FaultBook.slowKept)
        #expect(book.slowFaults.map(\.page) == Array(0..<FaultBook.slowKept))
    }
}
