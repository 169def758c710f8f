import Testing
@testable import FaultlineCore

/// Low memory with the tables written into it, and a page walk over it as the CPU does one.
private struct LowMemory {
    var bytes: [UInt8]

    init(_ tables: LongModePageTables, size: Int = Int(GuestMode.long64.lowSize)) {
        bytes = [UInt8](repeating: 0xEE, count: size)   // garbage the writer must clear
        bytes.withUnsafeMutableBytes { tables.write(into: $0) }
    }

    func word(_ address: UInt64) -> UInt64 {
        bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: Int(address), as: UInt64.self) }
    }

    /// The physical address `virtual` translates to through CR3 = `cr3`, or nil where a
    /// level is not present (4-level paging, 2 MiB leaves at the PD level).
    func translate(_ virtual: UInt64, cr3: UInt64) -> UInt64? {
        let frame: UInt64 = 0x000F_FFFF_FFFF_F000
        let pml4e = word((cr3 & frame) + (virtual >> 39 & 511) * 8)
        guard pml4e & 1 == 1 else { return nil }
        let pdpte = word((pml4e & frame) + (virtual >> 30 & 511) * 8)
        guard pdpte & 1 == 1, pdpte & 0x80 == 0 else { return nil }
        let pde = word((pdpte & frame) + (virtual >> 21 & 511) * 8)
        guard pde & 1 == 1, pde & 0x80 != 0 else { return nil }
        return (pde & 0x000F_FFFF_FFE0_0000) | (virtual & 0x1F_FFFF)
    }
}

@Suite("Long-mode page tables")
struct LongModePageTablesTests {
    @Test func identityMapsEverythingBelowTheEnd() throws {
        let end: UInt64 = (1 << 32) + (16 << 20)   // RAM of 16 MiB at 4 GiB
        let tables = try LongModePageTables(mapping: end)
        #expect(tables.directories == 5)
        #expect(tables.mappedEnd == 5 << 30)
        #expect(tables.cr3 == 0x3000)
        #expect(tables.end == 0xA000)
        let low = LowMemory(tables)
        for address: UInt64 in [0, 0x1000, 0x1FFF, 0x1F_FFFF, 0x20_0000, 0xFFFF_FFFF, 1 << 32, (1 << 32) + 0x1234_5678,
                                end - 4, tables.mappedEnd - 1] {
            #expect(low.translate(address, cr3: tables.cr3) == address, "0x\(String(address, radix: 16))")
        }
        #expect(low.translate(tables.mappedEnd, cr3: tables.cr3) == nil)
        #expect(low.translate(1 << 39, cr3: tables.cr3) == nil)   // PML4 entry 1: not present
    }

    /// Accessed (and, on leaves, dirty) already set: page walks never write the tables.
    @Test func entriesNeedNoWritesFromTheWalker() throws {
        let tables = try LongModePageTables(mapping: 1 << 30)
        let low = LowMemory(tables)
        #expect(low.word(LongModePageTables.pml4Address) == 0x4000 | 0x23)
        #expect(low.word(LongModePageTables.pdptAddress) == 0x5000 | 0x23)
        #expect(low.word(LongModePageTables.firstDirectoryAddress + 8) == 0x20_0000 | 0xE3)
        #expect(low.word(LongModePageTables.pdptAddress + 8) == 0)    // GiB 1: not mapped
        #expect(low.bytes[0x1000] == 0xEE)                          // the code page is left alone
        #expect(low.bytes[Int(tables.end)] == 0xEE)
    }

    /// The GDT: a null descriptor, then 64-bit code (L = 1, D = 0) and data, at the selectors
    /// the vCPU's segment registers name.
    @Test func gdtHasALongModeCodeSegment() throws {
        let low = LowMemory(try LongModePageTables(mapping: 1 << 30))
        let base = LongModePageTables.gdtAddress
        #expect(low.word(base) == 0)
        let code = low.word(base + UInt64(LongModePageTables.codeSelector))
        #expect(code >> 53 & 1 == 1 && code >> 54 & 1 == 0 && code >> 47 & 1 == 1 && code >> 43 & 1 == 1)
        let data = low.word(base + UInt64(LongModePageTables.dataSelector))
        #expect(data >> 47 & 1 == 1 && data >> 43 & 1 == 0 && data >> 41 & 1 == 1)
        #expect(LongModePageTables.gdtLimit == 23)
    }

    @Test func sizesBeyondTheTablesAreRefused() throws {
        #expect(throws: LongModePageTables.Invalid.self) { try LongModePageTables(mapping: 0) }
        #expect(throws: LongModePageTables.Invalid.self) { try LongModePageTables(mapping: (512 << 30) + 1) }
        // 64 GiB (the long-mode RAM limit) fits 1 MiB of low memory; 20 GiB does not fit 64 KiB.
        #expect(try LongModePageTables(mapping: GuestMode.long64.ramLimit).end <= GuestMode.long64.lowSize)
        #expect(throws: LongModePageTables.Invalid.self) { try LongModePageTables(mapping: 20 << 30, lowSize: 0x1_0000) }
    }
}
