@testable import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("The CPU latency request held during post-copy")
struct PostcopyCPULatencyTests {
    @Test func offMakesNoRequestAndReportsNone() {
        let hold = PostcopyCPULatency()
        hold.hold(microseconds: nil)
        #expect(hold.outcome == nil)
        #expect(!hold.isHeld)
    }

    @Test func aRequestThatCannotBeMadeIsReportedNotFatal() {
        let hold = PostcopyCPULatency()
        hold.hold(microseconds: 0, path: "/nonexistent/cpu_dma_latency")
        #expect(!hold.isHeld)
        #expect(hold.outcome?.held == false)
        #expect(hold.outcome?.requestedMicroseconds == 0)
        #expect(hold.outcome?.error?.contains("open /nonexistent/cpu_dma_latency: ENOENT") == true, "\(String(describing: hold.outcome))")
    }

    @Test(.gate(.postcopyCPULatencyHeld))
    func theRequestIsHeldUntilReleasedAndTheOutcomeStays() throws {
        let hold = PostcopyCPULatency()
        hold.hold(microseconds: 0)
        #expect(hold.isHeld)
        #expect(try CPULatencyRequest.current() == 0)
        hold.release()
        #expect(!hold.isHeld)
        #expect(hold.outcome == CPULatencyOutcome(requestedMicroseconds: 0, held: true, error: nil))
        hold.release()  // idempotent
    }
}
