import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// FaultModeSelection's decision table, with the probe's verdict injected (no kernel needed).
@Suite("Fault mode selection")
struct FaultModeSelectionTests {
    static let shadowPaging = VcpuFaultProbe(sigbusFault: .mmioExit(gpa: 0x10_0000))
    static let tdp = VcpuFaultProbe(sigbusFault: .bareEFAULT)
    static let tdpWithKVMUserfault = VcpuFaultProbe(
        sigbusFault: .bareEFAULT, kvmUserfault: .memoryFault(gpa: 0x10_0000, flags: VcpuExit.memoryFaultFlagUserfault))
    static let memoryFaultExit = VcpuFaultProbe(sigbusFault: .memoryFault(gpa: 0x10_0000, flags: 0))

    @Test("auto picks the best mode that works, and says why", arguments: [
        (shadowPaging, FaultMode.vcpuExit, "MMIO exit naming the page (shadow paging)"),
        (memoryFaultExit, .vcpuExit, "memory-fault exit naming the page"),
        (tdp, .uffdMissing, "vcpu-exit cannot work here (a vCPU fault on missing RAM returns a bare EFAULT from KVM_RUN (TDP without KVM Userfault))"),
        (tdpWithKVMUserfault, .vcpuExit, "KVM Userfault: a vCPU touching a page marked in the memslot's userfault bitmap"),
        (VcpuFaultProbe(sigbusFault: .bareEFAULT, kvmUserfault: .bareEFAULT), .uffdMissing,
         "KVM_MEM_USERFAULT memslot gave no userfault exit either (bare EFAULT"),
        (VcpuFaultProbe(sigbusFault: .failed("/dev/kvm: ENOENT")), .uffdMissing, "the vCPU fault probe could not run (/dev/kvm: ENOENT)"),
        (VcpuFaultProbe(sigbusFault: .other("the guest's store completed without an exit (HLT)")), .uffdMissing, "(HLT)"),
        (VcpuFaultProbe(sigbusFault: .bareEFAULT, uffdMissingObstacle: "UFFDIO_API: EINVAL"), .uffdMinor,
         "uffd-minor handler threads"),
    ])
    func autoPicks(probe: VcpuFaultProbe, mode: FaultMode, why: String) throws {
        let (picked, reason) = try FaultModeSelection.resolve(requested: .auto, probe: probe)
        #expect(picked == mode)
        #expect(reason.hasPrefix("auto: "))
        #expect(reason.contains(why), "\(reason)")
    }

    @Test("auto refuses when nothing works, naming every mode's obstacle")
    func autoRefusesWhenNothingWorks() {
        let probe = VcpuFaultProbe(sigbusFault: .bareEFAULT, uffdMissingObstacle: "no uffd", uffdMinorObstacle: "no minor")
        #expect {
            try FaultModeSelection.resolve(requested: .auto, probe: probe)
        } throws: { error in
            let text = "\(error)"
            return text.hasPrefix("no fault mode can work on this kernel") && text.contains("vcpu-exit: a vCPU fault")
                && text.contains("uffd-missing: a userfaultfd MISSING registration fails (no uffd)")
                && text.contains("uffd-minor: a userfaultfd MINOR registration on shmem fails (no minor)")
        }
    }

    @Test("an explicit mode that works is kept", arguments: [
        (shadowPaging, FaultMode.vcpuExit), (shadowPaging, .uffdMissing), (shadowPaging, .uffdMinor),
        (tdp, .uffdMissing), (tdp, .uffdMinor), (memoryFaultExit, .vcpuExit), (tdpWithKVMUserfault, .vcpuExit),
    ])
    func explicitModeKept(probe: VcpuFaultProbe, mode: FaultMode) throws {
        let (picked, reason) = try FaultModeSelection.resolve(requested: .explicit(mode), probe: probe)
        #expect(picked == mode)
        #expect(reason.hasPrefix("requested"))
    }

    @Test("vcpu-exit is refused up front on TDP, with the reason and what to use instead")
    func vcpuExitRefusedOnTDP() {
        #expect(throws: FaultModeSelection.Refusal(
            "fault mode vcpu-exit cannot work on this kernel: a vCPU fault on missing RAM returns a bare EFAULT "
                + "from KVM_RUN (TDP without KVM Userfault); use uffd-missing or auto")) {
            try FaultModeSelection.resolve(requested: .explicit(.vcpuExit), probe: Self.tdp)
        }
        // Named as a front end spells it, without auto (bench has no auto).
        #expect(throws: FaultModeSelection.Refusal(
            "--mode vcpu-exit cannot work on this kernel: a vCPU fault on missing RAM returns a bare EFAULT "
                + "from KVM_RUN (TDP without KVM Userfault); use uffd-missing")) {
            try FaultModeSelection.resolve(requested: .explicit(.vcpuExit), option: "--mode", offerAuto: false, probe: Self.tdp)
        }
    }

    @Test("a uffd mode whose registration fails is refused with the kernel's error")
    func uffdModeRefused() {
        let probe = VcpuFaultProbe(sigbusFault: .mmioExit(gpa: 0x10_0000), uffdMinorObstacle: "UFFDIO_API: the kernel lacks UFFD_FEATURE_MINOR_SHMEM")
        #expect(throws: FaultModeSelection.Refusal(
            "--fault-mode uffd-minor cannot work on this kernel: a userfaultfd MINOR registration on shmem fails "
                + "(UFFDIO_API: the kernel lacks UFFD_FEATURE_MINOR_SHMEM); use vcpu-exit or auto")) {
            try FaultModeSelection.resolve(requested: .explicit(.uffdMinor), option: "--fault-mode", probe: probe)
        }
    }

    @Test("--fault-mode spellings", arguments: [
        ("auto", FaultModeChoice.auto), ("vcpu-exit", .explicit(.vcpuExit)), ("uffd-missing", .explicit(.uffdMissing)),
        ("uffd-minor", .explicit(.uffdMinor)),
    ])
    func spellings(text: String, choice: FaultModeChoice) {
        #expect(FaultModeChoice(argument: text) == choice)
        #expect(choice.argument == text)
    }

    @Test("modes without a migration fault path are not --fault-mode choices", arguments: ["none", "prefilled", "Auto", ""])
    func notChoices(text: String) {
        #expect(FaultModeChoice(argument: text) == nil)
    }

    @Test("vcpu-exit's mechanism follows the probe: SIGBUS exits where they name the page, else KVM Userfault")
    func mechanism() {
        #expect(FaultModeSelection.vcpuExitMechanism(probe: Self.shadowPaging) == .sigbusExit)
        #expect(FaultModeSelection.vcpuExitMechanism(probe: Self.memoryFaultExit) == .sigbusExit)
        #expect(FaultModeSelection.vcpuExitMechanism(probe: Self.tdpWithKVMUserfault) == .kvmUserfault)
        #expect(FaultModeSelection.vcpuExitMechanism(probe: Self.tdp) == nil)
        // A memory-fault exit without the userfault flag, or at another page, is not KVM Userfault.
        #expect(FaultModeSelection.vcpuExitMechanism(probe: VcpuFaultProbe(
            sigbusFault: .bareEFAULT, kvmUserfault: .memoryFault(gpa: 0x10_0000, flags: VcpuExit.memoryFaultFlagPrivate))) == nil)
        #expect(FaultModeSelection.vcpuExitMechanism(probe: VcpuFaultProbe(
            sigbusFault: .bareEFAULT, kvmUserfault: .memoryFault(gpa: 0x20_0000, flags: VcpuExit.memoryFaultFlagUserfault))) == nil)
    }

    @Test("only exits naming the page count for vcpu-exit")
    func namesFaultingPage() {
        #expect(VcpuFaultOutcome.mmioExit(gpa: 1).namesFaultingPage)
        #expect(VcpuFaultOutcome.memoryFault(gpa: 1, flags: 0).namesFaultingPage)
        #expect(!VcpuFaultOutcome.bareEFAULT.namesFaultingPage)
        #expect(!VcpuFaultOutcome.other("x").namesFaultingPage)
        #expect(!VcpuFaultOutcome.failed("x").namesFaultingPage)
    }
}

/// The real probe on this machine's kernel: quick, bounded, and a verdict of one of the known kinds.
@Suite("vCPU fault probe (real kernel)", .gate(.vcpuFaultProbeOnTheRealKernel))
struct VcpuFaultProbeKernelTests {
    @Test("the probe finishes quickly with a classified verdict")
    func probeRuns() {
        let p = VcpuFaultProbe.run()
        #expect(p.milliseconds < 200, "probe took \(p.milliseconds) ms")
        if case .failed(let why) = p.sigbusFault { Issue.record("probe failed: \(why)") }
        #expect(p.uffdMissingObstacle == nil)
        // Whatever the kernel does, the selection agrees with the verdict.
        let (mode, _) = (try? FaultModeSelection.resolve(requested: .auto, probe: p)) ?? (.none, "")
        #expect(mode == (p.sigbusFault.namesFaultingPage || p.hasKVMUserfault ? .vcpuExit : .uffdMissing))
    }
}
