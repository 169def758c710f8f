import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Testing

@Suite("Owned memory: anonymous mappings and their residency")
struct AnonymousMappingTests {
    @Test func populatedPagesAreResidentAndOthersAreNot() throws {
        let populated = try AnonymousMapping(size: 4 * 4096, populate: true, label: "populated")
        var resident = [UInt8](repeating: 0, count: 4)
        try resident.withUnsafeMutableBufferPointer { try populated.residency(into: $0.baseAddress!) }
        #expect(resident.allSatisfy { $0 & 1 == 1 })

        let lazy = try AnonymousMapping(size: 4 * 4096, label: "lazy")
        lazy.base.advanced(by: 2 * 4096).storeBytes(of: 7, as: UInt8.self)
        try resident.withUnsafeMutableBufferPointer { try lazy.residency(into: $0.baseAddress!) }
        #expect(resident.map { $0 & 1 } == [0, 0, 1, 0])
    }

    @Test func aBadSizeNamesTheMapping() {
        #expect {
            try AnonymousMapping(size: 0, label: "empty pool")
        } throws: { error in
            guard let e = error as? SystemError else { return false }
            return e.code == .invalidArgument && e.operation.contains("empty pool")
        }
    }

    @Test func guestMemoryReportsResidencyToo() throws {
        let region = try GuestMemoryRegion(backing: .memfd, size: 2 * 4096)
        region.base.storeBytes(of: 1, as: UInt8.self)
        var resident = [UInt8](repeating: 0, count: 2)
        try resident.withUnsafeMutableBufferPointer { try region.residency(into: $0.baseAddress!) }
        #expect(resident.map { $0 & 1 } == [1, 0])
    }
}

@Suite("VirtualMachine and Vcpu keep what they use alive",
       .gate(.vmKeepsItsMemoryAlive))
struct MemslotOwnershipTests {
    @Test func aRegisteredRegionLivesAsLongAsItsSlot() throws {
        let vm = try KVM().createVM()
        weak var weakRegion: GuestMemoryRegion?
        do {
            let region = try GuestMemoryRegion(backing: .anonymous, size: 4 * 4096)
            weakRegion = region
            try vm.setMemoryRegion(slot: 3, guestPhysicalAddress: GuestPhysicalAddress(0x10_0000), memory: region)
        }
        #expect(weakRegion != nil, "the VM holds the memory of slot 3")
        try vm.deleteMemoryRegion(slot: 3)
        #expect(weakRegion == nil, "deleting the slot lets go of it")
    }

    @Test func aVcpuKeepsItsVMAlive() throws {
        weak var weakVM: VirtualMachine?
        let vcpu: Vcpu
        do {
            let vm = try KVM().createVM()
            weakVM = vm
            vcpu = try vm.createVcpu(id: 0)
        }
        #expect(weakVM != nil)
        withExtendedLifetime(vcpu) {}
    }

    @Test func theDirtyLogBufferHoldsTheWrittenPages() throws {
        let t = try TinyVM { a in
            a.store(.eax, to: .esi)
            a.add(.esi, imm: 0x3000)
            a.store(.eax, to: .esi)
            a.hlt()
        }
        let ram = try GuestMemoryRegion(backing: .anonymous, size: 8 * 4096)
        try t.vm.setMemoryRegion(slot: 1, flags: .logDirtyPages, guestPhysicalAddress: GuestPhysicalAddress(0x1000_0000),
                                 memory: ram)
        let v = try t.vcpu { $0.rsi = 0x1000_1000; $0.rax = 1 }
        #expect(try runOnce(v) == .hlt)
        let log = DirtyLogBuffer(pages: 8)
        try t.vm.getDirtyLog(slot: 1, into: log)
        #expect((0..<8).filter { log.contains($0) } == [1, 4])
        try t.vm.getDirtyLog(slot: 1, into: log)
        #expect((0..<8).allSatisfy { !log.contains($0) }, "fetched again: the log was reset, the buffer cleared")
    }
}
