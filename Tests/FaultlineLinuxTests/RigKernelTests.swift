import FaultlineTestSupport
import Foundation
import Testing

/// Runs only inside the kernel rig (rig/tests sets FAULTLINE_INSIDE_RIG=1): the rig's KVM has
/// what the rig-only suites rely on. A rig that lost one of these would make those suites skip
/// for the wrong reason; this fails instead, asking the same probes their gates ask.
@Suite("RigKernel: the rig's KVM offers TDP-only features",
       .enabled(if: ProcessInfo.processInfo.environment["FAULTLINE_INSIDE_RIG"] == "1",
                "runs inside the kernel rig only (rig/tests RigKernel)"))
struct RigKernelTests {
    @Test("SW-protected VMs, private memory attributes, guest_memfd and KVM_PRE_FAULT_MEMORY are offered",
          arguments: [Capability.swProtectedVM, .memoryAttributes, .guestMemfd, .preFault])
    func tdpFeature(capability: Capability) {
        let m = capability.measured
        #expect(m.present, "\(capability.rawValue): \(m.saw)")
    }
}
