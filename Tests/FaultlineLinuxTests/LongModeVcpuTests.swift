import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// A VM with long mode's 1 MiB of low memory at GPA 0: the program at 0x1000, the GDT and
/// the page tables of ``LongModePageTables`` (mapping the first GiB).
private final class LongModeVM {
    let vm: VirtualMachine
    let low: GuestMemoryRegion
    let tables: LongModePageTables

    init(_ build: (inout X86Assembler) -> Void) throws {
        vm = try KVM().createVM()
        low = try GuestMemoryRegion(backing: .anonymous, size: GuestMode.long64.lowSize)
        tables = try LongModePageTables(mapping: 1 << 30)
        tables.write(into: UnsafeMutableRawBufferPointer(start: low.base, count: Int(low.size)))
        var asm = X86Assembler(mode: .long64)
        build(&asm)
        let code = try asm.assemble()
        code.withUnsafeBytes { (low.base + 0x1000).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        try vm.setMemoryRegion(slot: 0, guestPhysicalAddress: GuestPhysicalAddress(0), memory: low)
    }

    func vcpu() throws -> Vcpu {
        let v = try vm.createVcpu(id: 0)
        try v.enterLongMode(tables)
        var r = VcpuRegisters()
        r.rip = 0x1000
        r.rflags = 2
        try v.setRegisters(r)
        return v
    }
}

@Suite("vCPUs in long mode", .gate(.longModeVcpus))
struct LongModeVcpuTests {
    /// `48 B8 imm64` is `movabs rax` only in 64-bit mode (in 32-bit mode it would be `dec eax;
    /// mov eax, imm32` and leave the upper half alone), and the store goes through the page
    /// tables to the word the host reads.
    @Test func aVcpuRuns64BitCode() throws {
        let t = try LongModeVM { a in
            a.mov(.rax, imm: 0x1_2345_6789_ABCD)
            a.mov(.rdx, imm: 0x8_0000)
            a.mov(.ecx, imm: 0xCAFE_F00D)
            a.store(.ecx, to: .rdx)
            a.hlt()
        }
        let v = try t.vcpu()
        #expect(try runOnce(v) == .hlt)
        #expect(try v.registers().rax == 0x1_2345_6789_ABCD)
        #expect((t.low.base + 0x8_0000).load(as: UInt32.self) == 0xCAFE_F00D)
        let control = try v.controlRegisters()
        #expect(control.cr3 == 0x3000 && control.efer & 0x500 == 0x500 && control.cr0 >> 31 == 1 && control.cr4 & 0x20 != 0)
    }

    /// The state blob (kvm_regs + kvm_sregs) carries CR0/CR3/CR4/EFER, the segments and the
    /// GDTR: a vCPU loaded from it on another VM is in the same long mode.
    @Test func aStateBlobCarriesLongMode() throws {
        let t = try LongModeVM { a in
            a.mov(.rsi, imm: 0x1_0000_2000)
            a.hlt()
        }
        let from = try t.vcpu()
        #expect(try runOnce(from) == .hlt)
        let other = try LongModeVM { a in a.hlt() }
        let to = try other.vm.createVcpu(id: 0)
        try to.loadStateBlob(try from.stateBlob())
        #expect(try to.controlRegisters() == from.controlRegisters())
        #expect(try to.registers() == from.registers())
        #expect(try to.registers().rsi == 0x1_0000_2000)
        #expect(try to.stateBlob() == from.stateBlob())
    }
}
