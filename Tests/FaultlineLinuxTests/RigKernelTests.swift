import FaultlineCore
import FaultlineLinux
import Foundation
import Testing

/// Runs only inside the kernel rig (rig/tests sets FAULTLINE_INSIDE_RIG=1): the rig's KVM has
/// what the rig-only suites rely on. A rig that lost one of these would make those suites skip
/// for the wrong reason; this fails instead.
@Suite("RigKernel: the rig's KVM offers TDP-only features",
       .enabled(if: ProcessInfo.processInfo.environment["FAULTLINE_INSIDE_RIG"] == "1",
                "runs inside the kernel rig only (rig/tests RigKernel)"))
struct RigKernelTests {
    @Test("SW-protected VMs, private memory attributes and KVM_PRE_FAULT_MEMORY are offered")
    func tdpFeatures() throws {
        let kvm = try KVM()
        let types = kvm.check(.vmTypes)
        #expect(types & (1 << Int32(VMType.swProtected.rawValue)) != 0, "KVM_CAP_VM_TYPES = \(types)")
        let vm = try kvm.createVM(type: .swProtected)
        #expect(vm.check(.memoryAttributes) & 8 != 0, "KVM_CAP_MEMORY_ATTRIBUTES lacks PRIVATE")
        #expect(vm.check(.guestMemfd) != 0, "no KVM_CAP_GUEST_MEMFD on a SW-protected VM")
        #expect(kvm.check(.preFaultMemory) != 0, "no KVM_CAP_PRE_FAULT_MEMORY")
    }
}
