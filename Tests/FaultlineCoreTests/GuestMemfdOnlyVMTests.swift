import FaultlineCore
import Testing

/// The guest_memfd flag names and what a guest_memfd-only VM can do, from made-up probe
/// answers (no kernel is asked).
@Suite("guest_memfd-only VM: flag names, fault and migration paths (pure)")
struct GuestMemfdOnlyVMTests {
    @Test(arguments: [
        (UInt64(0), "none"), (0x1, "MMAP"), (0x3, "MMAP|INIT_SHARED"), (0xb, "MMAP|INIT_SHARED|WRITE"),
        (0x8, "WRITE"), (0x4, "0x4"), (0xf, "MMAP|INIT_SHARED|WRITE|0x4"), (0x8000_0000_0000_0001, "MMAP|0x8000000000000000"),
    ])
    func flagNames(value: UInt64, names: String) {
        #expect(GuestMemfdFlagNames.describe(value) == names)
    }

    @Test func aCapabilityAnswerIsDecodedAndANegativeOneIsNothing() {
        #expect(GuestMemfdFlagNames.describe(capability: 11) == "MMAP|INIT_SHARED|WRITE")
        #expect(GuestMemfdFlagNames.describe(capability: 1) == "MMAP")
        #expect(GuestMemfdFlagNames.describe(capability: -1) == "none")
        #expect(GuestMemfdFlagNames.describe(capability: Int32.max) == "MMAP|INIT_SHARED|WRITE|" + (2...30).filter { $0 != 3 }
            .map { "0x" + String(UInt64(1) << UInt64($0), radix: 16) }.joined(separator: "|"))
    }

    /// Everything worked (the 7.3 rig kernel, measured: dirty logging refused).
    static var kernel73: GuestMemfdOnlyFeatures {
        var f = GuestMemfdOnlyFeatures()
        f.vmFlags = 0xb
        for keyPath in [\GuestMemfdOnlyFeatures.mmap, \.uffdMissing, \.uffdMinor, \.write, \.kvmUserfault, \.uffdWriteProtect] {
            f[keyPath: keyPath] = .works("made up")
        }
        f.dirtyLog = .missing("KVM_SET_USER_MEMORY_REGION2 slot 1: EINVAL (Invalid argument)")
        return f
    }

    @Test func everythingButTheDirtyLogAllowsEveryPathButKVMPrecopy() {
        let f = Self.kernel73
        #expect(GuestMemfdOnlyPlanner.faultPaths(f).allSatisfy { $0.missing == nil })
        #expect(GuestMemfdOnlyPlanner.faultPaths(f).map(\.how)
                == ["UFFDIO_COPY", "populate by write(), then UFFDIO_CONTINUE", "KVM Userfault exits, populate by write()"])
        let paths = GuestMemfdOnlyPlanner.migrationPaths(f)
        #expect(paths.map(\.path) == GuestMemfdMigrationPath.allCases)
        #expect(paths.filter { $0.missing != nil }.map(\.path) == [.precopy])
        #expect(paths.first?.missing == GuestMemfdOnlyPlanner.dirtyLog)
    }

    @Test func withoutWriteMinorPopulatesThroughASecondMapping() {
        var f = Self.kernel73
        f.write = .missing("KVM_CREATE_GUEST_MEMFD size 4096 flags 0xb: EINVAL (Invalid argument)")
        #expect(GuestMemfdOnlyPlanner.faultPaths(f).map(\.how)[1] == "populate by a store through a second mapping, then UFFDIO_CONTINUE")
        #expect(GuestMemfdOnlyPlanner.faultPaths(f).allSatisfy { $0.missing == nil })
    }

    @Test func withoutMmapNothingRunsAndEachPathNamesMmap() {
        var f = GuestMemfdOnlyFeatures()
        f.mmap = .missing("KVM_CREATE_GUEST_MEMFD size 20480 flags 0x3: ENOTTY (Inappropriate ioctl for device)")
        #expect(GuestMemfdOnlyPlanner.faultPaths(f).allSatisfy { $0.missing == GuestMemfdOnlyPlanner.mmap })
        #expect(GuestMemfdOnlyPlanner.migrationPaths(f).allSatisfy { $0.missing == GuestMemfdOnlyPlanner.mmap })
        #expect(f.rows.first?.outcome.line == "no (KVM_CREATE_GUEST_MEMFD size 20480 flags 0x3: ENOTTY (Inappropriate ioctl for device))")
    }

    @Test func postcopyThroughUserfaultfdTakesEitherRegistrationMode() {
        var f = Self.kernel73
        f.uffdMissing = .missing("UFFDIO_REGISTER: EINVAL")
        let path = { (f: GuestMemfdOnlyFeatures) in
            GuestMemfdOnlyPlanner.migrationPaths(f).first { $0.path == .postcopyUserfaultfd }!.missing
        }
        #expect(path(f) == nil)
        f.uffdMinor = .missing("UFFDIO_REGISTER: EINVAL")
        #expect(path(f) == "\(GuestMemfdOnlyPlanner.uffdMissing) or MINOR")
        #expect(GuestMemfdOnlyPlanner.faultPaths(f).map(\.missing)
                == [GuestMemfdOnlyPlanner.uffdMissing, GuestMemfdOnlyPlanner.uffdMinor, nil])
    }

    @Test func probeLinesSayYesOrNoWithWhatWasSeen() {
        #expect(ProbeOutcome.works("a store read back").line == "yes (a store read back)")
        #expect(ProbeOutcome.missing("").line == "no")
        #expect(GuestMemfdOnlyFeatures().rows.map(\.name) == [
            "guest_memfd mmap", "userfaultfd MISSING", "userfaultfd MINOR", "write() populates (WRITE)",
            "KVM_MEM_USERFAULT memslot", "KVM_MEM_LOG_DIRTY_PAGES memslot", "userfaultfd write-protect",
        ])
    }
}
