import Foundation
import FaultlineEngine
import Testing
@testable import faultline

/// The reports' JSON encoding, without a kernel: any string survives a round trip through
/// JSONSerialization, and a report decodes back into its own type.
@Suite struct ReportEncodingTests {
    /// Every control character (and quotes, backslash, slash, non-ASCII) in an error message.
    static let awkward = "attempt 1:\tcut\u{1} at \"frame\" \\ 3/4\r\n\u{0}\u{1F}\u{7F} é ✓"

    @Test func controlCharactersInAFailureReportParseBack() throws {
        let line = try jsonLine(FailureReport(side: "source", outcome: "failed_after_switchover", error: Self.awkward))
        #expect(!line.contains("\n"), "a report is one line")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["error"] as? String == Self.awkward)
        #expect(object["side"] as? String == "source")
        #expect(object["outcome"] as? String == "failed_after_switchover")
        #expect(object["mode"] == nil, "an absent optional key is left out")
    }

    @Test func controlCharactersInNestedStringsParseBack() throws {
        let schedule = ChaosProxyReport.Schedule(seed: 7, retries: 1, attempts: 2, disturbedAttemptsBeforeCommit: 1,
                                                 fired: [Self.awkward], firedPhases: ["precopy"], unfired: ["\u{1}\t"])
        let line = try jsonLine(ChaosProxyReport(chaos: schedule))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        let chaos = try #require(object["chaos"] as? [String: Any])
        #expect(chaos["fired"] as? [String] == [Self.awkward])
        #expect(chaos["unfired"] as? [String] == ["\u{1}\t"])
        #expect(chaos["disturbed_attempts_before_commit"] as? Int == 1)
        #expect(try decodeJSONLine(ChaosProxyReport.self, from: line).chaos == schedule)
    }

    @Test func absentValuesThatMeanSomethingAreNull() throws {
        let run = ChaosRunReport(seed: 3, faultMode: "uffd-missing", workload: "selfcheck", outcome: "completed", correct: true,
                                 wrong: nil, seconds: 1.25, retries: 0, disturbedAttemptsBeforeCommit: 0, fired: [])
        let line = try jsonLine(run)
        #expect(line.contains("\"wrong\":null"))
        #expect(try decodeJSONLine(ChaosRunReport.self, from: line) == run)
    }

    @Test func figuresAreRoundedAndNeverNonFinite() throws {
        #expect(rounded(0.123456789, 6) == 0.123457)
        #expect(rounded(.infinity, 3) == 0)
        #expect(rounded(.nan, 3) == 0)
        let parts = NamedMilliseconds([(name: "pause", milliseconds: 1.23456), (name: "commit", milliseconds: .nan)])
        let object = try #require(try JSONSerialization.jsonObject(with: Data(try jsonLine(parts).utf8)) as? [String: Double])
        #expect(object == ["pause": 1.235, "commit": 0])
    }

    @Test func aDemoReportHoldsBothSidesAndDecodesBack() throws {
        var sourceSide = SourceReport()
        sourceSide.failedAttempts = [Self.awkward]
        sourceSide.downtimeParts = [(name: "pause", milliseconds: 0.5), (name: "commit", milliseconds: 0.25)]
        sourceSide.digest = 0xabc
        var destinationSide = DestinationReport()
        destinationSide.digestMatch = true
        destinationSide.destinationDigest = 0xabc
        destinationSide.faultLatencyMicroseconds = (12.345, 20, 30, 40)
        destinationSide.vcpuStallMilliseconds = [1.5, 2]
        var preFault = PreFaultSummary()
        preFault.error = "EINVAL\u{2}"
        destinationSide.preFaultAfterPostcopy = preFault
        let demo = DemoReport(source: SourceMigrationReport(sourceSide, standalone: false), guestMemfdPlan: nil,
                              destination: DestinationMigrationReport(destinationSide, faultModeReason: Self.awkward, standalone: false))
        let line = try jsonLine(demo)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["side"] == nil)
        #expect(object["failed_attempts"] as? [String] == [Self.awkward])
        #expect(object["fault_mode_reason"] as? String == Self.awkward)
        #expect(object["digest"] as? String == "0xabc")
        #expect(object["destination_digest"] as? String == "0xabc")
        #expect(object["digest_match"] as? Bool == true)
        #expect(object["vcpu_exit_via"] is NSNull)
        #expect((object["fault_latency_us"] as? [String: Double])?["p50"] == 12.35)
        #expect(object["downtime_parts_ms"] as? [String: Double] == ["pause": 0.5, "commit": 0.25])
        let preFaults = try #require(object["pre_fault"] as? [String: Any])
        #expect(preFaults["switchover"] is NSNull)
        #expect((preFaults["after_postcopy"] as? [String: Any])?["error"] as? String == "EINVAL\u{2}")
        let back = try decodeJSONLine(DemoReport.self, from: line)
        #expect(back.destination == demo.destination)
        #expect(back.source.failedAttempts == [Self.awkward])
        #expect(back.guestMemfdPlan == nil)
    }
}
