import FaultlineCore
import FaultlineLinux

/// A guest_memfd VM (KVM_X86_SW_PROTECTED_VM, RAM in a KVM_MEM_GUEST_MEMFD memslot): KVM
/// takes a shared gfn from the slot's userspace_addr mapping (`ram`) and a private one from
/// the guest_memfd (`privateRAM`, a PrivateMemoryVM), as KVM_SET_MEMORY_ATTRIBUTES says.
/// RAM starts shared.
extension MigratableVM {
    public var isGuestMemfdVM: Bool { privateRAM != nil }

    /// RAM pages whose attributes are private (their contents exist only in the guest_memfd).
    public var privatePageCount: Int { Int(privateRanges.coverage(of: true)) }

    /// Sets RAM pages `pages` (indices into RAM) private or shared with KVM_SET_MEMORY_ATTRIBUTES.
    public func setPrivate(ramPages pages: Range<Int>, _ isPrivate: Bool = true) throws {
        guard let privateRAM else {
            throw InvalidSetting(.vmType, "must be a guest_memfd VM (KVM_X86_SW_PROTECTED_VM) for private memory")
        }
        guard pages.lowerBound >= 0, pages.upperBound <= layout.ramPages, !pages.isEmpty else {
            throw MachineLayout.Invalid(description: "private pages \(pages) outside RAM's \(layout.ramPages) pages")
        }
        let range = GuestMemoryRange(start: GuestPhysicalAddress(layout.ramBase + UInt64(pages.lowerBound) * 4096),
                                     size: UInt64(pages.count) * 4096)!
        try privateRAM.setAttributes(range, private: isPrivate)
        privateRanges.set(UInt64(pages.lowerBound)..<UInt64(pages.upperBound), to: isPrivate ? true : nil)
    }

    /// The memory state the migration planner judges.
    public var guestMemfdMemoryState: GuestMemfdMemoryState {
        GuestMemfdMemoryState(ramPages: layout.ramPages, privatePages: privatePageCount)
    }
}
