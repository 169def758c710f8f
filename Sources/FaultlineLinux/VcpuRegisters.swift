import CFaultlineShim

/// A vCPU's general-purpose registers, instruction pointer and flags (KVM_GET/SET_REGS),
/// as a Swift value: callers never name the kernel's struct.
public struct VcpuRegisters: Equatable, Sendable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0, rflags: UInt64 = 0

    public init() {}

    init(_ r: fl_kvm_regs) {
        rax = r.rax; rbx = r.rbx; rcx = r.rcx; rdx = r.rdx
        rsi = r.rsi; rdi = r.rdi; rsp = r.rsp; rbp = r.rbp
        r8 = r.r8; r9 = r.r9; r10 = r.r10; r11 = r.r11
        r12 = r.r12; r13 = r.r13; r14 = r.r14; r15 = r.r15
        rip = r.rip; rflags = r.rflags
    }

    var abi: fl_kvm_regs {
        fl_kvm_regs(rax: rax, rbx: rbx, rcx: rcx, rdx: rdx, rsi: rsi, rdi: rdi, rsp: rsp, rbp: rbp,
                    r8: r8, r9: r9, r10: r10, r11: r11, r12: r12, r13: r13, r14: r14, r15: r15,
                    rip: rip, rflags: rflags)
    }
}

extension Vcpu {
    public func registers() throws(SystemError) -> VcpuRegisters { VcpuRegisters(try abiRegisters()) }

    public func setRegisters(_ regs: VcpuRegisters) throws(SystemError) { try setABIRegisters(regs.abi) }

    func abiRegisters() throws(SystemError) -> fl_kvm_regs { try get(FL_KVM_GET_REGS, "KVM_GET_REGS", fl_kvm_regs()) }

    func setABIRegisters(_ regs: fl_kvm_regs) throws(SystemError) { try set(FL_KVM_SET_REGS, "KVM_SET_REGS", regs) }

    func specialRegisters() throws(SystemError) -> fl_kvm_sregs { try get(FL_KVM_GET_SREGS, "KVM_GET_SREGS", fl_kvm_sregs()) }

    func setSpecialRegisters(_ sregs: fl_kvm_sregs) throws(SystemError) { try set(FL_KVM_SET_SREGS, "KVM_SET_SREGS", sregs) }

    /// One register-block ioctl that fills `empty`.
    private func get<Block: BitwiseCopyable>(_ request: UInt, _ name: String, _ empty: Block) throws(SystemError) -> Block {
        var block = empty
        try systemCall("\(name) vcpu \(id)") { withUnsafeMutableBytes(of: &block) { fd.ioctl(request, $0.baseAddress) } }
        return block
    }

    /// One register-block ioctl that loads `block`.
    private func set<Block: BitwiseCopyable>(_ request: UInt, _ name: String, _ block: Block) throws(SystemError) {
        var copy = block
        try systemCall("\(name) vcpu \(id)") { withUnsafeMutableBytes(of: &copy) { fd.ioctl(request, $0.baseAddress) } }
    }
}
