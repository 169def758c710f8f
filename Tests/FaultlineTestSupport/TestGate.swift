import Testing

/// Every test or suite that depends on the machine, by name, with what it needs: the one table
/// of gates. A test declares its gate with `.gate(.name)`; each entry gates exactly one test
/// or suite (a test inside a gated suite lists only what it needs beyond the suite's).
/// GatingTests hides every capability in turn and checks no entry stays enabled without it,
/// and reads Tests/ to check no test gates on the machine any other way.
public enum TestGate: String, CaseIterable, Sendable {
    // FaultlineLinuxTests
    case kvmOnTheRealKernel
    case guestMemfdSlotSharedWithItsMapping
    case userfaultfdOnTheRealKernel
    case uffdMoveStepsOverMappedPages
    case writeProtectDirtyLog
    case receivedUserfaultfd
    case pageServerProtocol
    case pageServerBadInput
    case pageServerRace
    case pageServerSupervisor
    case pageServerHugePages
    case uffdServeCLI
    case uffdMinorWriteThenContinue
    case sigbusResolver
    case vmKeepsItsMemoryAlive
    case longModeVcpus
    case vcpuStateBlobs
    case cpuLatencyRequest
    case threadKeepsOffACPU
    case privateMemoryRefusedWithoutIt
    case privateMemoryVMOnTheRig
    case guestMemfdMissingFaults
    case guestMemfdMinorFaultsAfterWrite

    // FaultlineEngineTests
    case kvmDemandPaging
    case everyModeOnKVM
    case patternsUnderEachResolverOnKVM
    case perVcpuUffdsAndReadersOnKVM
    case injectedDelayOnKVM
    case guestMemfdBaselines
    case twoHundredFiftySixVcpus
    case softDemandPaging
    case recycledPages
    case vcpuFaultProbeOnTheRealKernel
    case longModeGuests
    case installerLentRealTime
    case postcopyCPULatencyHeld
    case kvmUserfaultOnTheRealKernel
    case kvmUserfaultNeverToggledOnGuestMemfd
    case preFaultOnTheRealKernel
    case privateMemoryRunOnTheRig
    case privateMemoryRunRefusedWithoutIt
    case privateMemoryFaultOnTheRig
    case cloneRestoreOnKVM
    case guestMemfdOnlyProbeWithoutIt

    // FaultlineCLITests
    case hugetlbRefusedWithoutReservedPages
    case hugetlbWithReservedPages
    case softBackendCLI
    case benchJSON
    case kvmRefusedToOtherUsers
    case probeShowsTheFaultVerdict
    case liveMigration
    case snapshotAndRestore
    case remoteRestore
    case uffdServeFromServer
    case everyFaultModeMigrates
    case cpuLatencyHeldDuringPostcopy
    case netnsMigration
    case migrationMatrix
    case everyModeRoundsAndWorkload
    case chaos
    case migrationFailures
    case longModeMigration
    case guestMemoryLimits
    case guestMemfdMigration
    case privateMemoryCLIRefusedWithoutIt
    case kernelRig
    case clonesCLI

    /// What must be there (each measured present and not hidden, with its prerequisites).
    public var needs: [Capability] {
        switch self {
        case .kvmOnTheRealKernel, .vmKeepsItsMemoryAlive, .longModeVcpus, .vcpuStateBlobs, .kvmDemandPaging,
             .longModeGuests, .guestMemoryLimits:
            [.kvm]
        // A clone's RAM is a private file mapping: no userfaultfd, only a VM.
        case .cloneRestoreOnKVM, .clonesCLI: [.kvm]
        case .guestMemfdSlotSharedWithItsMapping, .guestMemfdBaselines: [.kvm, .guestMemfdInitShared]
        case .guestMemfdMissingFaults: [.guestMemfdUffdMissing]
        case .guestMemfdMinorFaultsAfterWrite: [.guestMemfdUffdMinor, .guestMemfdWrite]
        case .guestMemfdOnlyProbeWithoutIt: [.kvm]
        case .userfaultfdOnTheRealKernel: [.uffdKernel]
        case .uffdMoveStepsOverMappedPages: [.uffdKernel, .uffdMove]
        case .writeProtectDirtyLog: [.uffdUser, .uffdWP]
        case .receivedUserfaultfd: [.uffdUser, .uffdEventRemove]
        // Firecracker's userfaultfd catches kernel-mode faults too (KVM's, a read() into guest memory).
        case .pageServerProtocol, .pageServerBadInput, .pageServerRace, .pageServerSupervisor: [.uffdKernel, .uffdMissing, .uffdEventRemove]
        case .pageServerHugePages: [.uffdKernel, .uffdEventRemove, .uffdHugetlbfs, .hugetlbReserved]
        case .uffdServeCLI: [.uffdKernel, .uffdMissing, .uffdEventRemove]
        case .uffdMinorWriteThenContinue: [.uffdKernel, .uffdMinor]
        case .sigbusResolver: [.uffdKernel, .uffdSigbus]
        case .cpuLatencyRequest, .postcopyCPULatencyHeld: [.cpuDMALatency]
        case .threadKeepsOffACPU: [.twoCPUs]
        case .privateMemoryRefusedWithoutIt, .privateMemoryRunRefusedWithoutIt, .privateMemoryCLIRefusedWithoutIt: [.kvm]
        case .privateMemoryVMOnTheRig, .privateMemoryRunOnTheRig, .privateMemoryFaultOnTheRig:
            [.swProtectedVM, .memoryAttributes, .guestMemfd]
        // Tests of every fault mode need what each mode needs.
        case .everyModeOnKVM, .patternsUnderEachResolverOnKVM, .everyFaultModeMigrates, .everyModeRoundsAndWorkload:
            [.kvm, .uffdKernel, .uffdMissing, .uffdMinor, .vcpuExit]
        case .perVcpuUffdsAndReadersOnKVM: [.kvm, .uffdKernel, .uffdMissing, .uffdMinor]
        case .injectedDelayOnKVM, .twoHundredFiftySixVcpus, .benchJSON: [.kvm, .uffdKernel, .vcpuExit]
        // The software vCPUs fault in user mode; vcpu-exit there is uffd SIGBUS.
        case .softDemandPaging: [.uffdUser, .uffdMissing, .uffdMinor, .uffdSigbus]
        case .recycledPages: [.uffdUser, .uffdMove]
        case .vcpuFaultProbeOnTheRealKernel: [.kvm, .uffdKernel, .uffdMissing, .uffdSigbus]
        case .installerLentRealTime: [.schedFIFO]
        case .kvmUserfaultOnTheRealKernel: [.kvmUserfault, .uffdKernel]
        case .kvmUserfaultNeverToggledOnGuestMemfd: [.kvmUserfault, .swProtectedVM, .guestMemfd]
        case .preFaultOnTheRealKernel: [.preFault]
        case .hugetlbRefusedWithoutReservedPages: []
        case .hugetlbWithReservedPages: [.hugetlbReservable, .kvm, .uffdKernel, .uffdHugetlbfs]
        case .softBackendCLI: [.uffdUser, .uffdMissing]
        // Runs as nobody: /dev/kvm must exist (and refuse), the fallback pages in user mode.
        case .kvmRefusedToOtherUsers: [.root, .setpriv, .kvm, .uffdUser, .uffdMissing]
        case .probeShowsTheFaultVerdict: [.kvm, .uffdKernel, .uffdMissing]
        // A destination's userfaultfd catches KVM's own (kernel-mode) accesses to guest memory.
        case .liveMigration, .migrationMatrix, .chaos, .migrationFailures: [.kvm, .uffdKernel]
        // The bad-snapshot test restores lazily in uffd-missing; the others pick the modes offered.
        case .snapshotAndRestore: [.kvm, .uffdKernel, .uffdMissing]
        // serve-snapshot and restore --from in the fault mode `auto` picks.
        case .remoteRestore: [.kvm, .uffdKernel]
        case .uffdServeFromServer: [.kvm, .uffdKernel, .uffdMissing, .uffdEventRemove]
        case .cpuLatencyHeldDuringPostcopy: [.kvm, .uffdKernel, .cpuDMALatency]
        case .netnsMigration: [.kvm, .uffdKernel, .netNamespaces]
        case .longModeMigration: [.kvm, .uffdKernel, .uffdMissing]
        case .guestMemfdMigration: [.swProtectedVM, .guestMemfd, .uffdKernel]
        // rig/test boots QEMU (software emulation) as root.
        case .kernelRig: [.root]
        }
    }

    /// What the machine must really lack: the test checks the refusal where a feature is
    /// missing (hiding it does not count).
    public var lacking: [Capability] {
        switch self {
        case .privateMemoryRefusedWithoutIt: [.memoryAttributes]
        case .privateMemoryRunRefusedWithoutIt, .privateMemoryCLIRefusedWithoutIt: [.swProtectedVM, .memoryAttributes]
        case .hugetlbRefusedWithoutReservedPages: [.hugetlbReserved]
        case .guestMemfdOnlyProbeWithoutIt: [.guestMemfdInitShared]
        default: []
        }
    }

    /// Where the test can run when this machine cannot run it: the kernel rig's command.
    public var rigCommand: String? {
        switch self {
        case .privateMemoryVMOnTheRig, .privateMemoryRunOnTheRig, .privateMemoryFaultOnTheRig: "rig/tests PrivateMemory"
        case .guestMemfdMigration: "rig/tests GuestMemfdMigration"
        case .preFaultOnTheRealKernel: "rig/tests PreFault"
        case .guestMemfdMissingFaults, .guestMemfdMinorFaultsAfterWrite:
            "rig/tests --kernel ../shared/rig/bzImage-7.3-gmem-uffd GuestMemfdUffd"
        case .kvmUserfaultOnTheRealKernel, .kvmUserfaultNeverToggledOnGuestMemfd:
            "rig/tests --kernel ../shared/rig/bzImage-6.12-userfault KVMUserfault"
        default: nil
        }
    }

    /// Whether the entry's test runs on `machine`, and the reason shown when it is skipped.
    public func verdict(on machine: Machine = .current) -> (enabled: Bool, reason: String) {
        var why = needs.compactMap { machine.missing($0).map { "needs \($0)" } }
        for capability in lacking where !machine.reallyLacks(capability) {
            let hidden = machine.hidden.contains(capability) ? ", only hidden" : ""
            why.append("runs only without \(capability.rawValue) (here: \(machine.measurement(of: capability).saw)\(hidden))")
        }
        if why.isEmpty {
            let parts = [needs.isEmpty ? nil : "needs " + needs.map(\.rawValue).joined(separator: ", "),
                         lacking.isEmpty ? nil : "runs only without " + lacking.map(\.rawValue).joined(separator: ", ")]
            return (true, parts.compactMap { $0 }.joined(separator: "; "))
        }
        if let rigCommand { why.append("run inside the rig: \(rigCommand)") }
        return (false, why.joined(separator: "; "))
    }
}

extension Trait where Self == ConditionTrait {
    /// Runs the test or suite only where the machine has what `entry` needs; elsewhere it is
    /// reported skipped with what is missing and what the probe saw.
    public static func gate(_ entry: TestGate, sourceLocation: SourceLocation = #_sourceLocation) -> Self {
        let (enabled, reason) = entry.verdict()
        return .enabled(if: enabled, Comment(rawValue: reason), sourceLocation: sourceLocation)
    }
}
