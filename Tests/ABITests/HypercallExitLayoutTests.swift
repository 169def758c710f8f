import CFaultlineShim
import Testing

/// kvm_run.hypercall (KVM_EXIT_HYPERCALL, include/uapi/linux/kvm.h): nr, args[6], ret, then
/// the flags word (the old __u32 longmode + pad) - 72 bytes at offset 32 of kvm_run.
@Suite("ABI: the hypercall exit")
struct HypercallExitLayoutTests {
    @Test func layout() {
        #expect(MemoryLayout<fl_kvm_run_hypercall>.size == 72)
        #expect(MemoryLayout<fl_kvm_run_hypercall>.offset(of: \.args) == 8)
        #expect(MemoryLayout<fl_kvm_run_hypercall>.offset(of: \.ret) == 56)
        #expect(MemoryLayout<fl_kvm_run_hypercall>.offset(of: \.flags) == 64)
        var run = fl_kvm_run()
        withUnsafeMutableBytes(of: &run) { raw in
            raw.storeBytes(of: UInt32(3), toByteOffset: 8, as: UInt32.self)  // KVM_EXIT_HYPERCALL
            raw.storeBytes(of: UInt64(12), toByteOffset: 32, as: UInt64.self)  // nr
            raw.storeBytes(of: UInt64(0x10_0000), toByteOffset: 40, as: UInt64.self)  // args[0]: gpa
            raw.storeBytes(of: UInt64(0x10), toByteOffset: 56, as: UInt64.self)  // args[2]: attributes
            raw.storeBytes(of: UInt64(1), toByteOffset: 96, as: UInt64.self)  // flags: long mode
        }
        #expect(run.u.hypercall.nr == 12 && run.u.hypercall.args.0 == 0x10_0000 && run.u.hypercall.args.2 == 0x10)
        #expect(run.u.hypercall.flags == 1)
        run.u.hypercall.ret = UInt64(bitPattern: -22)
        let ret = withUnsafeBytes(of: &run) { $0.load(fromByteOffset: 88, as: UInt64.self) }
        #expect(ret == UInt64(bitPattern: -22))
    }
}
