import FaultlineTestSupport
import Foundation
import Testing

/// Migrations of small long-mode guests (`--guest-mode long`: RAM at 4 GiB, so every page
/// the guest touches has a GPA above 4 GiB), pre-copy and post-copy, between two processes.
/// The destination never boots anything: it builds its machine from the announced layout,
/// takes the page tables with low memory and CR3/CR4/EFER with the vCPU state.
@Suite("Long-mode migration", .serialized, .gate(.longModeMigration))
struct LongModeMigrationTests {
    @Test(arguments: [
        ["--precopy-rounds", "2"],                                            // pre-copy, then stop-and-copy or post-copy
        ["--precopy-rounds", "0", "--workload", "dirtier"],                   // post-copy only, fault mode auto
        ["--precopy-rounds", "0", "--fault-mode", "uffd-missing", "--vcpus", "1"],
        ["--precopy-rounds", "1", "--postcopy", "always", "--fault-mode", "uffd-missing"],
    ])
    func aLongModeGuestMigratesWithMatchingDigests(args: [String]) throws {
        let r = try run(["demo", "--guest-mode", "long", "--memory", "16M", "--json", "--migrate-after", "0.5", "--run-after", "0.5"]
                        + args, timeout: 300)
        #expect(r.status == 0, "\(args): \(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect(j?["guest_mode"] as? String == "long", "\(args): the destination read long mode from the layout")
        #expect(j?["digest_match"] as? Bool == true, "\(args)")
        #expect(j?["guest_check"] as? Bool == true, "\(args)")
        #expect(j?["guest_mismatches"] as? Int == 0)
        #expect((j?["passes_after_migration"] as? Int ?? 0) > 0, "the guest kept running on the destination")
        if args.contains("--postcopy") || args.contains("0") { #expect(j?["mode"] as? String == "postcopy", "\(args)") }
    }

    @Test func theDefaultModeStaysProtectedWhereRAMFits() throws {
        let r = try run(["demo", "--memory", "16M", "--json", "--migrate-after", "0.3", "--run-after", "0.3"], timeout: 300)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(lastJSON(r.stdout)?["guest_mode"] as? String == "protected")
    }
}

/// Memory sizes no guest can have are refused with the limit, before anything starts
/// (`demo` checks for KVM first).
@Suite("Guest memory limits", .gate(.guestMemoryLimits))
struct GuestMemoryLimitTests {
    @Test(arguments: [
        (["--memory", "61G"], "at most 61440 MiB"),
        (["--memory", "4G", "--guest-mode", "protected"], "at most 3584 MiB"),
        (["--memory", "99999999999999G"], "cannot read --memory"),
        (["--memory", "4G", "--guest-mode", "sideways"], "guest-mode"),
    ])
    func refused(args: [String], message: String) throws {
        for command in ["demo", "run"] {
            let r = try run([command] + args, timeout: 60)
            #expect(r.status != 0 && r.status < 128, "\(command) \(args): exit \(r.status)")
            #expect((r.stderr + r.stdout).contains(message), "\(command) \(args): \(r.stderr)")
        }
    }
}
