import FaultlineCore
import FaultlineEngine
import FaultlineTestSupport
import Testing

/// `faultline probe`'s guest_memfd-only section on a kernel that cannot map a guest_memfd
/// (this machine: KVM_CREATE_GUEST_MEMFD is ENOTTY): every answer is no, and says why.
/// Inside the 7.3 rig the same section says yes; RigTests checks that through the CLI.
@Suite("guest_memfd-only probe without guest_memfd mmap", .gate(.guestMemfdOnlyProbeWithoutIt))
struct GuestMemfdOnlyProbeTests {
    @Test func everyAnswerIsNoAndNamesWhatFailed() {
        let f = GuestMemfdOnlyProbe.collect()
        #expect(!f.mmap.works)
        // The operation that failed, and its errno by name.
        #expect(f.mmap.detail.hasPrefix("KVM_CREATE_GUEST_MEMFD") || f.mmap.detail.hasPrefix("mmap"), "\(f.mmap.detail)")
        #expect(f.mmap.detail.contains(": E"), "\(f.mmap.detail)")
        for row in f.rows.dropFirst() {
            #expect(row.outcome == .missing("not tried: guest_memfd mmap failed"), "\(row.name): \(row.outcome.line)")
        }
        #expect(GuestMemfdOnlyPlanner.faultPaths(f).allSatisfy { $0.missing == GuestMemfdOnlyPlanner.mmap })
        #expect(GuestMemfdOnlyPlanner.migrationPaths(f).allSatisfy { $0.missing == GuestMemfdOnlyPlanner.mmap })
    }

    @Test func theBackingModeIsRefusedWithTheSameReason() {
        let p = SystemProbe.collect()
        let why = p.modes.first { $0.0 == "backing guest-memfd" }?.1
        #expect(why == "needs \(GuestMemfdOnlyPlanner.mmap): \(p.guestMemfdOnly.mmap.detail)")
    }
}
