import FaultlineCore
import FaultlineTestSupport
import Foundation
import Testing

/// Chaos end to end: a frame-aware proxy between the two sides flips bits and cuts
/// connections. Each run must end in one of the two allowed ways (completed with matching
/// digests and a green guest, or a clean failure before the switch-over with the source guest
/// still running); `bench chaos` judges every run and exits non-zero otherwise.
@Suite("Chaos", .serialized, .gate(.chaos))
struct ChaosCLITests {
    let demo = ["demo", "--memory", "32M", "--json", "--migrate-after", "0.5", "--run-after", "0.5",
                "--precopy-rounds", "1", "--postcopy", "always"]

    /// A seeded batch as CI runs it: every fault mode, both workloads, events in every phase.
    @Test func seededSchedulesEndCorrectly() throws {
        let r = try run(["bench", "chaos", "--schedules", "12", "--seed", "7001", "--memory", "32M", "--timeout", "120",
                         "--json"], timeout: 1500)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr.suffix(4000))")
        let summary = lastJSON(r.stdout)
        #expect(summary?["schedules"] as? Int == 12)
        #expect(summary?["wrong"] as? Int == 0, "\(r.stdout)")
        // The batch reaches both outcomes and fires events in every phase.
        #expect((summary?["completed"] as? Int ?? 0) > 0)
        #expect((summary?["failed_before_switchover"] as? Int ?? 0) > 0)
        let phases = summary?["events_fired_by_phase"] as? [String: Int] ?? [:]
        for phase in ["precopy", "switchover", "postcopy", "completion"] {
            #expect((phases[phase] ?? 0) > 0, "no event fired in \(phase): \(phases)")
        }
    }

    /// The restore path: serve-snapshot and `restore --from` through the proxy. Every run ends
    /// completed and verified, or cleanly before the restored guest started; the server outlives them all.
    @Test func seededRestoreSchedulesEndCorrectly() throws {
        let r = try run(["bench", "chaos", "--path", "restore", "--schedules", "8", "--seed", "9001", "--memory", "16M",
                         "--timeout", "120", "--json"], timeout: 1200)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr.suffix(4000))")
        let summary = lastJSON(r.stdout)
        #expect(summary?["path"] as? String == "restore")
        #expect(summary?["schedules"] as? Int == 8)
        #expect(summary?["wrong"] as? Int == 0, "\(r.stdout)")
        #expect(summary?["server_alive"] as? Bool == true)
        #expect((summary?["completed"] as? Int ?? 0) > 0)
        #expect((summary?["failed_before_start"] as? Int ?? 0) > 0)
        let phases = summary?["events_fired_by_phase"] as? [String: Int] ?? [:]
        #expect(phases["precopy"] == nil, "a restore has no pre-copy: \(phases)")
        for phase in ["switchover", "postcopy", "completion"] { #expect((phases[phase] ?? 0) > 0, "no event fired in \(phase): \(phases)") }
    }

    /// Forced paths (comma-separated events): the run must end as the table in docs/design.md says.
    @Test(arguments: [
        // Before the commit without retries: a clean failure, the source guest runs on.
        ("precopy:bulk:to_destination:3:flip_page_data_bit", 0, 3),
        ("precopy:bulk:to_destination:2:flip_header_bit", 0, 3),
        ("switchover:bulk:to_source:0:flip_payload_bit", 0, 3),  // the ready ack damaged
        // ... and with one retry the second attempt completes.
        ("precopy:bulk:to_destination:1:cut_both", 1, 0),
        ("switchover:bulk:to_destination:0:cut", 1, 0),
        // After the commit: resumed, completed.
        ("postcopy:bulk:to_destination:0:cut", 0, 0),  // the commit itself is lost
        ("postcopy:bulk:to_destination:3:flip_header_bit", 0, 0),
        ("postcopy:bulk:to_destination:2:flip_page_data_bit", 0, 0),
        ("postcopy:fault:to_source:0:cut_both", 0, 0),
        ("completion:bulk:to_source:0:cut", 0, 0),  // the verdict is lost: asked for again
        ("completion:bulk:to_source:0:flip_header_bit", 0, 0),
        ("completion:bulk:to_destination:1:cut_both", 0, 0),  // `complete` is lost
        // A cut, then the reconnect's hello damaged: the destination turns it away, the source
        // tries again (a damaged hello is the transport, not the destination's refusal).
        ("postcopy:bulk:to_destination:3:cut,postcopy:bulk:to_destination:4:flip_header_bit", 0, 0),
        ("postcopy:bulk:to_destination:3:cut,postcopy:bulk:to_destination:4:flip_payload_bit", 0, 0),
        // ... and the reconnect's helloAck with a flipped magic (chaos seed 606).
        ("postcopy:bulk:to_destination:3:cut,postcopy:bulk:to_source:0:flip_header_bit:5", 0, 0),
        ("precopy:bulk:to_source:0:flip_header_bit", 0, 3),  // the first round's `roundStored` damaged
    ])
    func aForcedEventEndsAsTheTableSays(events: String, retries: Int, expected: Int32) throws {
        let list = events.split(separator: ",").map(String.init)
        let r = try run(demo + list.flatMap { ["--chaos-event", $0] } + ["--retries", String(retries)], timeout: 240)
        let lines = r.stdout.split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
        let chaos = lines.compactMap { $0["chaos"] as? [String: Any] }.first
        #expect((chaos?["fired"] as? [String])?.count == list.count, "not every event fired: \(r.stdout)")
        #expect(r.status == expected, "\(events): exit \(r.status)\n\(r.stdout)\n\(r.stderr.suffix(3000))")
        let report = lines.last { $0["chaos"] == nil }
        if expected == 0 {
            #expect(report?["digest_match"] as? Bool == true)
            #expect(report?["guest_check"] as? Bool == true)
        } else {
            #expect(report?["outcome"] as? String == "failed_before_switchover")
            #expect(report?["guest_running"] as? Bool == true)
            #expect((report?["passes_after_failure"] as? Int ?? 0) > (report?["passes_at_failure"] as? Int ?? Int.max))
        }
    }
}
