import FaultlineCore
import FaultlineTestSupport
import Foundation
import Testing

/// Every fault mode x pre-copy rounds {0, 1, 2, 5} x workloads {selfcheck, dirtier}, at
/// 64 MiB. `--postcopy always` makes pre-copy run exactly the rounds asked for (the test
/// checks the count), so each case covers the path it names.
@Suite("Migration matrix", .serialized, .gate(.migrationMatrix))
struct MigrationMatrixTests {
    static let cases: [(mode: String, rounds: Int, workload: String)] = ["vcpu-exit", "uffd-missing", "uffd-minor"].flatMap { mode in
        [0, 1, 2, 5].flatMap { rounds in ["selfcheck", "dirtier"].map { (mode, rounds, $0) } }
    }

    /// Whether the destination keeps dropped stale pages (it asks the kernel for UFFDIO_MOVE).
    static let uffdMove = Capability.uffdMove.measured.present

    @Test(.gate(.everyModeRoundsAndWorkload), arguments: cases)
    func migratesWithMatchingDigestAndAGreenGuest(mode: String, rounds: Int, workload: String) throws {
        let r = try run(["demo", "--memory", "64M", "--json", "--migrate-after", "0.5", "--run-after", "1",
                         "--fault-mode", mode, "--workload", workload, "--precopy-rounds", String(rounds),
                         "--postcopy", "always", "--precopy-seconds", "60"], timeout: 240)
        #expect(r.status == 0, "\(mode) \(rounds) \(workload): \(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect(j?["precopy_rounds"] as? Int == rounds, "pre-copy must run the \(rounds) round(s) asked for")
        #expect(j?["digest_match"] as? Bool == true)
        #expect(j?["guest_check"] as? Bool == true)
        #expect((j?["digest_pages_from_memory"] as? Int ?? 0) > 0, "the digest is read back from destination memory")
        #expect((j?["passes_after_migration"] as? Int ?? 0) > 0, "the guest kept running on the destination")
        // The dirtier rewrites pages after each round: their stale copies are dropped and
        // sent again. MISSING-based modes keep the dropped pages (UFFDIO_MOVE) and reuse them.
        let kept = j?["recycled_pages"] as? Int ?? -1, reused = j?["recycled_pages_reused"] as? Int ?? -1
        if mode != "uffd-minor" && rounds > 0 && workload == "dirtier" && Self.uffdMove {
            #expect(kept > 0 && reused > 0, "stale pages kept \(kept), reused \(reused)")
        } else if mode == "uffd-minor" || !Self.uffdMove {
            #expect(kept == 0 && reused == 0, "no page is kept without MOVE on anonymous memory")
        }
        #expect(reused <= kept)
    }

    @Test(arguments: ["selfcheck", "dirtier"])
    func pureStopAndCopyMigrates(workload: String) throws {
        // --postcopy never with a generous downtime target: the rest is copied while paused.
        let r = try run(["demo", "--memory", "64M", "--json", "--migrate-after", "0.5", "--run-after", "0.5",
                         "--workload", workload, "--precopy-rounds", "5", "--postcopy", "never", "--max-downtime-ms", "5000"],
                        timeout: 240)
        #expect(r.status == 0, "\(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect(j?["mode"] as? String == "precopy")
        #expect(j?["postcopy"] as? Bool == false)
        #expect(j?["digest_match"] as? Bool == true)
        #expect(j?["guest_check"] as? Bool == true)
    }
}
