import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// The test gates' probes on this machine, whatever it offers: they agree with what
/// `faultline probe` finds, and a capability is never measured present without its
/// prerequisites (which would let a hidden prerequisite hide less than it should).
@Suite("Capability probes on this machine")
struct CapabilityProbeTests {
    @Test(arguments: Capability.allCases)
    func aPresentCapabilityHasItsPrerequisites(capability: Capability) {
        let m = capability.measured
        #expect(!m.saw.isEmpty)
        guard m.present else { return }
        for prerequisite in capability.prerequisites {
            #expect(prerequisite.measured.present, "\(capability.rawValue) (\(m.saw)) without \(prerequisite.rawValue)")
        }
    }

    @Test func theProbesAgreeWithFaultlineProbe() {
        let probe = SystemProbe.collect()
        let obstacle = Dictionary(probe.modes.map { ($0.0, $0.1) }, uniquingKeysWith: { a, _ in a })
        #expect(Capability.kvm.measured.present == (probe.kvmError == nil), "\(Capability.kvm.measured.saw)")
        #expect(Capability.uffdKernel.measured.present == (probe.uffdError == nil), "\(Capability.uffdKernel.measured.saw)")
        #expect(Capability.hugetlbReserved.measured.present == (probe.hugePages > 0))
        #expect(Capability.root.measured.present == (HostProcess.effectiveUserID == 0))
        if probe.uffdError == nil {
            for (capability, feature) in [(Capability.uffdMove, UffdFeatures.move), (.uffdSigbus, .sigbus)] {
                #expect(capability.measured.present == probe.uffdFeatures.contains(feature), "\(capability.measured.saw)")
            }
        }
        if probe.kvmError == nil {
            #expect(Capability.vcpuExit.measured.present == (obstacle["vcpu-exit (kvm)"] == .some(nil)),
                    "\(Capability.vcpuExit.measured.saw)")
            #expect(Capability.guestMemfdMmap.measured.present == (probe.guestMemfdFlags & 1 != 0),
                    "\(Capability.guestMemfdMmap.measured.saw)")
            #expect(Capability.guestMemfdInitShared.measured.present == probe.guestMemfdOnly.mmap.works,
                    "\(Capability.guestMemfdInitShared.measured.saw) / \(probe.guestMemfdOnly.mmap.detail)")
            let privateMemory = [Capability.swProtectedVM, .memoryAttributes, .guestMemfd].allSatisfy(\.measured.present)
            #expect(privateMemory == (obstacle["private memory (faultline private)"] == .some(nil)))
        }
    }
}
