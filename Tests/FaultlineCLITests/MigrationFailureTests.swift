import FaultlineCore
import FaultlineTestSupport
import Foundation
import Testing

/// Failures in each phase, end to end: before the switch-over the source guest survives and
/// a retry can succeed; after it, failures are named by both sides.
@Suite("Migration failures", .serialized, .gate(.migrationFailures))
struct MigrationFailureTests {
    let demo = ["demo", "--memory", "64M", "--json", "--migrate-after", "0.5", "--run-after", "0.5"]

    @Test func aDestinationKilledDuringPrecopyLeavesTheSourceGuestRunning() throws {
        let (receiver, port) = try startReceiver(["--inject-exit-during-precopy-after-pages", "2000"])
        let r = try run(["run", "--memory", "64M", "--migrate-to", "127.0.0.1:\(port)", "--migrate-after", "0.3",
                         "--precopy-rounds", "2", "--postcopy", "always", "--json"], timeout: 120)
        _ = receiver.finish(timeout: 30)
        #expect(r.status == 3, "\(r.stdout) \(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect(j?["outcome"] as? String == "failed_before_switchover")
        #expect(j?["guest_running"] as? Bool == true)
        #expect((j?["passes_after_failure"] as? Int ?? 0) > (j?["passes_at_failure"] as? Int ?? Int.max))
    }

    @Test(arguments: [["--inject-corrupt-precopy-page"], ["--inject-precopy-disconnect-after-pages", "3000"]])
    func aFailedPrecopyIsRetriedAndTheRetryCompletes(injection: [String]) throws {
        let r = try run(demo + ["--precopy-rounds", "2", "--postcopy", "always", "--retries", "1"] + injection, timeout: 240)
        #expect(r.status == 0, "\(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect((j?["failed_attempts"] as? [String])?.count == 1)
        #expect((j?["abandoned_attempts"] as? [String])?.count == 1)
        #expect(j?["digest_match"] as? Bool == true)
        #expect(j?["guest_check"] as? Bool == true)
    }

    @Test func withoutRetriesAFailedPrecopyIsACleanFailure() throws {
        let r = try run(demo + ["--precopy-rounds", "1", "--postcopy", "always", "--inject-corrupt-precopy-page"], timeout: 240)
        #expect(r.status == 3, "\(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect(j?["guest_running"] as? Bool == true)
    }

    @Test func aPageDamagedOnTheDestinationAfterInstallationFailsTheMigration() throws {
        // The dirtier rewrites only 16 pages per vCPU, so the damaged page (the last RAM page)
        // is not rewritten by the guest and its digest entry is read back from memory.
        let r = try run(["demo", "--memory", "64M", "--json", "--migrate-after", "0.5", "--run-after", "0.2",
                         "--workload", "dirtier", "--working-set", "16", "--precopy-rounds", "0", "--inject-damage-installed-page", String(16 + 16383)],
                        timeout: 240)
        #expect(r.status != 0)
        #expect(r.stderr.contains("memory digest mismatch"), "\(r.stderr)")
        #expect(lastJSON(r.stdout)?["outcome"] as? String == "failed_after_switchover")
    }

    @Test func aFailingFaultPathThreadIsReportedByBothSides() throws {
        // The corrupt page makes a reply on the fault connection certain.
        let r = try run(demo + ["--precopy-rounds", "0", "--inject-fault-thread-failure", "--inject-corrupt-page"], timeout: 240)
        #expect(r.status == 4, "\(r.stderr)")
        #expect(r.stderr.contains("fault receiver"), "\(r.stderr)")
        #expect(r.stderr.contains("injected"), "\(r.stderr)")
    }

    @Test func aProtocolViolationAfterTheSwitchoverIsNotRetried() throws {
        let r = try run(demo + ["--precopy-rounds", "0", "--inject-protocol-violation"], timeout: 240)
        #expect(r.status == 4, "\(r.stderr)")
        #expect(r.stderr.contains("outside guest memory"), "\(r.stderr)")
        #expect(!r.stderr.contains("reconnecting"), "a protocol violation must not be retried as a lost connection")
    }
}
