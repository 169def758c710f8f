import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Testing

@Suite("vCPU registers and state blobs", .gate(.vcpuStateBlobs))
struct VcpuStateTests {
    @Test func registersRoundTrip() throws {
        let t = try TinyVM { a in a.hlt() }
        let v = try t.vcpu { r in
            r.rax = 1; r.rbx = 2; r.rcx = 3; r.rdx = 4; r.rsi = 5; r.rdi = 6; r.rbp = 7; r.r8 = 8; r.r15 = 15
        }
        let r = try v.registers()
        #expect([r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r15] == [1, 2, 3, 4, 5, 6, 7, 8, 15])
        #expect(r.rip == 0x1000 && r.rflags == 2)
    }

    @Test func aStateBlobMovesTheVcpu() throws {
        let t = try TinyVM { a in
            a.mov(.eax, imm: 0x1234)
            a.hlt()
        }
        let from = try t.vcpu { $0.rdx = 0xD0D0 }
        #expect(try runOnce(from) == .hlt)
        let blob = try from.stateBlob()
        #expect(blob.count == Vcpu.stateBlobSize)

        let other = try TinyVM { a in a.hlt() }
        let to = try other.vm.createVcpu(id: 0)
        try to.loadStateBlob(blob)
        let r = try to.registers()
        let original = try from.registers()
        #expect(r.rax == 0x1234 && r.rdx == 0xD0D0 && r.rip == original.rip)
        #expect(try to.stateBlob() == blob)
    }

    @Test func aBlobOfTheWrongSizeIsRefused() throws {
        let t = try TinyVM { a in a.hlt() }
        let v = try t.vcpu()
        #expect {
            try v.loadStateBlob([0, 1, 2])
        } throws: { error in (error as? SystemError)?.code == .invalidArgument }
    }
}
