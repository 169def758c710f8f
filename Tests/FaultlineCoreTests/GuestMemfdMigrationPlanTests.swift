import FaultlineCore
import Testing

@Suite("guest_memfd migration planner")
struct GuestMemfdMigrationPlanTests {
    /// The plain rig: Linux 6.12 with TDP and CONFIG_KVM_SW_PROTECTED_VM.
    static var linux612: GuestMemfdKernelFeatures {
        var k = GuestMemfdKernelFeatures()
        k.swProtectedVM = true
        k.privateAttribute = true
        k.userfaultfdWriteProtect = true
        return k
    }

    static var linux612Userfault: GuestMemfdKernelFeatures {
        var k = linux612
        k.kvmUserfault = true
        return k
    }

    static let shared = GuestMemfdMemoryState(ramPages: 4096, privatePages: 0)

    func plan(_ k: GuestMemfdKernelFeatures, _ m: GuestMemfdMemoryState = shared, rounds: Int = 0,
              postcopy: PostcopyPolicy = .auto, mode: FaultMode = .uffdMissing) throws(GuestMemfdMigrationRefusal) -> GuestMemfdMigrationPlan {
        try GuestMemfdMigrationPlanner.plan(kernel: k, memory: m,
                                            request: GuestMemfdMigrationRequest(precopyRounds: rounds, postcopy: postcopy, faultMode: mode))
    }

    func refusal(_ body: () throws(GuestMemfdMigrationRefusal) -> GuestMemfdMigrationPlan) -> GuestMemfdMigrationRefusal? {
        do { _ = try body(); return nil } catch { return error }
    }

    @Test func noSWProtectedVMsIsRefused() {
        let r = refusal { () throws(GuestMemfdMigrationRefusal) in try plan(GuestMemfdKernelFeatures()) }
        #expect(r?.missing == "KVM_X86_SW_PROTECTED_VM")
    }

    @Test func sharedMemoryOn612StopAndCopyOrUserfaultfdPostcopy() throws {
        let stop = try plan(Self.linux612, postcopy: .never)
        #expect(stop.path == .stopAndCopy)
        let post = try plan(Self.linux612)
        #expect(post.path == .postcopyUserfaultfd)
        #expect(post.paths.first { $0.path == .precopy }?.missing == GuestMemfdMigrationPlanner.dirtyLog)
        #expect(post.paths.first { $0.path == .precopyWriteProtect }?.missing == nil)
        #expect(post.paths.first { $0.path == .postcopyKVMUserfault }?.missing == GuestMemfdMigrationPlanner.kvmUserfault)
        #expect(post.paths.first { $0.path == .postcopyUserfaultfd }?.missing == nil)
    }

    @Test func precopyOn612UsesWriteProtectAsTheDirtyLog() throws {
        let never = try plan(Self.linux612, rounds: 2, postcopy: .never)
        #expect(never.path == .precopyWriteProtect)
        #expect(never.reason.contains("then stop-and-copy"))
        let auto = try plan(Self.linux612, rounds: 2)
        #expect(auto.path == .postcopyUserfaultfd)
        #expect(auto.reason.contains("pre-copy round(s) with userfaultfd write-protect"))
    }

    @Test func precopyWithoutAnyDirtyLogIsRefusedNamingBoth() throws {
        var k = Self.linux612
        k.userfaultfdWriteProtect = false
        let r = refusal { () throws(GuestMemfdMigrationRefusal) in try plan(k, rounds: 2) }
        #expect(r?.missing == "\(GuestMemfdMigrationPlanner.dirtyLog) or \(GuestMemfdMigrationPlanner.writeProtect)")
        #expect(r?.description.contains("check_memory_region_flags") == true)
        #expect(try plan(k, postcopy: .never).path == .stopAndCopy)
    }

    @Test func precopyWhereTheKernelLogsGuestMemfdSlots() throws {
        var k = Self.linux612
        k.dirtyLogOnGuestMemfdSlot = true
        let p = try plan(k, rounds: 3, postcopy: .never)
        #expect(p.path == .precopyWriteProtect)
        #expect(p.paths.first { $0.path == .precopy }?.missing == nil)
        k.userfaultfdWriteProtect = false
        let r = refusal { () throws(GuestMemfdMigrationRefusal) in try plan(k, rounds: 3) }
        #expect(r?.missing == GuestMemfdMigrationPlanner.writeProtect)
    }

    @Test func vcpuExitNeedsKVMUserfault() throws {
        let r = refusal { () throws(GuestMemfdMigrationRefusal) in try plan(Self.linux612, mode: .vcpuExit) }
        #expect(r?.missing == "KVM_CAP_USERFAULT (KVM_MEM_USERFAULT)")
        #expect(try plan(Self.linux612Userfault, mode: .vcpuExit).path == .postcopyKVMUserfault)
    }

    @Test func uffdMinorIsRefusedForWriteTracking() {
        let r = refusal { () throws(GuestMemfdMigrationRefusal) in try plan(Self.linux612, mode: .uffdMinor) }
        #expect(r?.description.contains("uffd-missing") == true)
    }

    @Test func privatePagesAreRefusedNamingEveryMissingFeature() {
        let m = GuestMemfdMemoryState(ramPages: 4096, privatePages: 16)
        let plain = refusal { () throws(GuestMemfdMigrationRefusal) in try plan(Self.linux612, m, postcopy: .never) }
        #expect(plain?.missing == "guest_memfd mmap (GUEST_MEMFD_FLAG_MMAP); userfaultfd on guest_memfd or KVM_CAP_USERFAULT (KVM_MEM_USERFAULT)")
        #expect(plain?.description.contains("16 of 4096 RAM pages are private") == true)
        let userfault = refusal { () throws(GuestMemfdMigrationRefusal) in try plan(Self.linux612Userfault, m) }
        #expect(userfault?.missing == "guest_memfd mmap (GUEST_MEMFD_FLAG_MMAP)")
        var future = Self.linux612Userfault
        future.guestMemfdMmap = true
        let f = refusal { () throws(GuestMemfdMigrationRefusal) in try plan(future, m) }
        #expect(f?.missing == "private-page transfer in Faultline")
    }
}
