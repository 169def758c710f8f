import CFaultlineShim
import FaultlineCore

/// Long mode for Faultline's 64-bit guest programs, set up in one KVM_SET_SREGS as a
/// bootloader would leave it: paging on with the identity map of ``LongModePageTables``
/// (already written to guest memory), PAE, EFER.LME|LMA, a 64-bit code segment.
extension Vcpu {
    static let cr0ProtectionEnable: UInt64 = 1 << 0, cr0Paging: UInt64 = 1 << 31
    static let cr4PAE: UInt64 = 1 << 5
    static let eferLME: UInt64 = 1 << 8, eferLMA: UInt64 = 1 << 10

    /// Enters 64-bit mode with CR3 = `tables.cr3` and the GDT at
    /// ``LongModePageTables/gdtAddress``; the segment registers are loaded from the same
    /// descriptors the GDT holds (KVM takes them from here, the guest never reloads them).
    public func enterLongMode(_ tables: LongModePageTables) throws(SystemError) {
        var s = try specialRegisters()
        s.cs = Self.flatSegment(selector: LongModePageTables.codeSelector, type: 11, db: 0, l: 1)   // 64-bit code: D = 0
        let data = Self.flatSegment(selector: LongModePageTables.dataSelector, type: 3, db: 1)
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.gdt.base = LongModePageTables.gdtAddress
        s.gdt.limit = LongModePageTables.gdtLimit
        s.cr3 = tables.cr3
        s.cr4 |= Self.cr4PAE
        s.efer |= Self.eferLME | Self.eferLMA
        s.cr0 |= Self.cr0ProtectionEnable | Self.cr0Paging
        try setSpecialRegisters(s)
    }

    /// CR0, CR3, CR4 and EFER as KVM_GET_SREGS reports them (to check a vCPU's mode).
    public func controlRegisters() throws(SystemError) -> (cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64) {
        let s = try specialRegisters()
        return (s.cr0, s.cr3, s.cr4, s.efer)
    }
}
