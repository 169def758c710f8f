/// The general registers a vCPU running a ``RunningWorkload`` starts with, at full width:
/// what the VMM loads with `KVM_SET_REGS` in either ``GuestMode`` (`r8`-`r15` are 0; `rsp` is
/// the scattered dirtier's page counter, else 0).
public struct RunningWorkloadStart: Equatable, Sendable {
    public var rax: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0, rbx: UInt64 = 0
    public var rsp: UInt64 = 0, rbp: UInt64 = 0, rsi: UInt64 = 0, rdi: UInt64 = 0

    public init(rax: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0, rbx: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0,
                rsi: UInt64 = 0, rdi: UInt64 = 0) {
        (self.rax, self.rcx, self.rdx, self.rbx) = (rax, rcx, rdx, rbx)
        (self.rsp, self.rbp, self.rsi, self.rdi) = (rsp, rbp, rsi, rdi)
    }
}

extension RunningWorkload {
    /// vCPU `id`'s start when its chunk starts at guest-physical `chunkBase`: pass 1, cursor at
    /// page 0, as ``initialRegisters(vcpu:chunkBase:)`` - whose 32-bit convention (the chunk
    /// below 4 GiB) binds in protected mode. In long mode the chunk must be page aligned and
    /// end at or below ``GuestMode/ramLimit``; `rsi`, `rdi`, `rdx` hold its 64-bit bounds.
    public func startRegisters(vcpu id: Int, chunkBase: UInt64) -> RunningWorkloadStart {
        switch mode {
        case .protected32:
            let r = initialRegisters(vcpu: id, chunkBase: chunkBase)
            return RunningWorkloadStart(rax: UInt64(r.eax), rcx: UInt64(r.ecx), rdx: UInt64(r.edx), rbx: UInt64(r.ebx),
                                        rsp: UInt64(r.esp), rbp: UInt64(r.ebp), rsi: UInt64(r.esi), rdi: UInt64(r.edi))
        case .long64:
            precondition(chunkBase % UInt64(GuestWorkload.pageSize) == 0 && chunkBase <= mode.ramLimit
                         && chunkSize <= mode.ramLimit - chunkBase,
                         "chunk at \(chunkBase) must be page aligned and end at or below \(mode.ramLimit)")
            let ecx = kind == .dirtier ? UInt32(Self.dirtierSecondWordOffset(pass: 1)) : Self.tag(vcpu: id, pass: 0)
            return RunningWorkloadStart(rcx: UInt64(ecx), rdx: chunkBase, rbx: UInt64(Self.tag(vcpu: id, pass: 1)),
                                        rsp: order == .scattered ? UInt64(workingSetPages) : 0, rbp: 1,
                                        rsi: chunkBase, rdi: chunkBase + chunkSize)
        }
    }
}
