import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// KVM Userfault on a real kernel: only where a store to a page marked in a KVM_MEM_USERFAULT
/// memslot's bitmap comes back as a userfault exit (the rig's bzImage-6.12-userfault; run
/// there: rig/tests --kernel ../shared/rig/bzImage-6.12-userfault KVMUserfault).
@Suite("KVMUserfault on a real kernel", .gate(.kvmUserfaultOnTheRealKernel), .timeLimit(.minutes(2)))
struct KVMUserfaultKernelTests {
    @Test("bench demand-paging in vcpu-exit resolves every fault through KVM Userfault exits, every page verified")
    func demandPaging() throws {
        var c = DemandPagingConfig()
        c.mode = .vcpuExit
        c.vcpus = 2
        c.bytesPerVcpu = 1 << 20
        c.backend = .kvm
        let bench = try DemandPagingBenchmark(config: c)
        #expect(bench.vcpuExitMechanism == .kvmUserfault)
        let r = try bench.run()
        #expect(r.verified, "\(r.badPages) bad pages")
        #expect(r.resolved + r.raced == r.pages)
        #expect(r.uffdFallbackFaults == 0)
    }

    @Test("KVM_MEM_USERFAULT is never toggled on an existing guest_memfd memslot", .gate(.kvmUserfaultNeverToggledOnGuestMemfd))
    func noToggleOnGuestMemfdSlot() throws {
        let kvm = try KVM()
        let vm = try kvm.createVM(type: .swProtected)
        let gmem = try vm.createGuestMemfd(size: 0x10000, flags: [])
        let shared = try GuestMemoryRegion(backing: .anonymous, size: 0x10000, label: "shared")
        let bitmap = PageBitmap(count: 16, polarity: .setMeansMissing)
        try vm.setMemoryRegion(slot: 1, flags: [.guestMemfd, .userfault], guestPhysicalAddress: GuestPhysicalAddress(0x10_0000),
                               memory: shared, guestMemfd: gmem, userfaultBitmap: UnsafeRawPointer(bitmap.words))
        #expect {
            try vm.setMemoryRegion(slot: 1, flags: [.guestMemfd], guestPhysicalAddress: GuestPhysicalAddress(0x10_0000),
                                   memory: shared, guestMemfd: gmem)
        } throws: { "\($0)".contains("refusing to toggle KVM_MEM_USERFAULT on an existing guest_memfd memslot") }
        withExtendedLifetime(bitmap) {}
    }
}

/// KVM_PRE_FAULT_MEMORY on a real kernel: only with TDP (KVM_CAP_PRE_FAULT_MEMORY != 0; run
/// inside the rig: rig/tests PreFault).
@Suite("PreFault on a real kernel", .gate(.preFaultOnTheRealKernel), .timeLimit(.minutes(2)))
struct PreFaultKernelTests {
    @Test("maps a whole real region, then the guest's writes to it all land")
    func mapsARegion() throws {
        let run = try PreFaultBenchmark.run(bytes: 1 << 20, preFault: true)
        #expect(run.preFaultCalls >= 1)
        #expect(run.verified)
    }

    @Test("a range past the memslots stops with ENOENT, naming the address, after mapping what is there")
    func stopsAtTheEndOfTheMemslot() throws {
        let kvm = try KVM()
        let vm = try kvm.createVM()
        let ram = try GuestMemoryRegion(backing: .anonymous, size: 0x10000, label: "ram")
        try vm.setMemoryRegion(slot: 0, guestPhysicalAddress: GuestPhysicalAddress(0), memory: ram)
        let vcpu = try vm.createVcpu(id: 0)
        let outcome = vcpu.preFault(GuestMemoryRange(start: GuestPhysicalAddress(0), size: 0x20000)!)
        #expect(outcome.bytesMapped == 0x10000)
        #expect(outcome.error?.code == .noSuchFileOrDirectory)
        #expect(outcome.error?.description.contains("gpa 0x10000") == true)
    }
}
