/// What a long-mode guest needs in its low memory before its first instruction: a GDT and
/// page tables that identity-map guest-physical `[0, mappedEnd)` with 2 MiB pages. Pure:
/// it computes the bytes; the VMM copies them to GPA 0 (``write(into:)``) and points CR3
/// and GDTR at them.
///
/// Low memory (GPA 0, ``GuestMode/lowSize`` bytes in long mode):
///
/// | GPA | contents |
/// | --- | --- |
/// | `0x1000` | the guest program (``GuestWorkload/codeAddress``) |
/// | `0x2000` | GDT: null, 64-bit code (selector 8), data (selector 16) |
/// | `0x3000` | PML4: entry 0 -> the PDPT |
/// | `0x4000` | PDPT: entry `g` -> the page directory of GiB `g` |
/// | `0x5000 + 0x1000 g` | page directory of GiB `g`: 512 2 MiB pages |
///
/// 2 MiB pages work on every x86-64 CPU; 1 GiB pages would need CPUID's pdpe1gb and save only
/// the directories (at most 64 pages, 256 KiB, for the 64 GiB a long-mode guest may address).
/// Every entry is written with its accessed bit (and the leaves with their dirty bit) already
/// set, so the CPU's page walks never write to the tables: they stay clean for the dirty log.
public struct LongModePageTables: Sendable, Equatable {
    public static let gdtAddress: UInt64 = 0x2000
    public static let pml4Address: UInt64 = 0x3000
    public static let pdptAddress: UInt64 = 0x4000
    public static let firstDirectoryAddress: UInt64 = 0x5000
    public static let codeSelector: UInt16 = 8
    public static let dataSelector: UInt16 = 16
    /// Null, code (L=1, D=0, present, DPL 0, execute/read), data (present, read/write).
    public static let gdt: [UInt64] = [0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF]
    /// GDTR.limit: the table's size minus one.
    public static var gdtLimit: UInt16 { UInt16(gdt.count * 8 - 1) }

    static let present: UInt64 = 1 << 0, writable: UInt64 = 1 << 1, accessed: UInt64 = 1 << 5
    static let dirty: UInt64 = 1 << 6, largePage: UInt64 = 1 << 7
    static let gib: UInt64 = 1 << 30, largePageSize: UInt64 = 2 << 20

    /// How many page directories (one per GiB of `[0, mappedEnd)`).
    public let directories: Int

    public struct Invalid: Error, CustomStringConvertible, Equatable {
        public let description: String
    }

    /// Tables mapping at least `[0, end)`; `lowSize` is the low memory they must fit in.
    public init(mapping end: UInt64, lowSize: UInt64 = GuestMode.long64.lowSize) throws(Invalid) {
        guard end > 0, end <= 512 * Self.gib else {
            throw Invalid(description: "long-mode page tables: cannot map up to 0x\(String(end, radix: 16)) "
                          + "(one PDPT maps 1...512 GiB)")
        }
        let directories = Int((end + Self.gib - 1) / Self.gib)
        let tablesEnd = Self.firstDirectoryAddress + UInt64(directories) * 4096
        guard tablesEnd <= lowSize else {
            throw Invalid(description: "long-mode page tables: \(directories) page directories end at "
                          + "0x\(String(tablesEnd, radix: 16)), beyond the 0x\(String(lowSize, radix: 16)) bytes of low memory")
        }
        self.directories = directories
    }

    /// Every guest-physical address below this is mapped (a multiple of 1 GiB).
    public var mappedEnd: UInt64 { UInt64(directories) * Self.gib }
    /// CR3: the PML4's address (no PCID, caching on).
    public var cr3: UInt64 { Self.pml4Address }
    /// The first byte after the tables.
    public var end: UInt64 { Self.firstDirectoryAddress + UInt64(directories) * 4096 }

    /// The 64-bit words of the GDT and the tables, with their guest-physical addresses (in
    /// ascending order; every other word of `[gdtAddress, end)` is zero).
    public func entries() -> [(address: UInt64, value: UInt64)] {
        var words: [(UInt64, UInt64)] = []
        words.reserveCapacity(3 + 1 + directories * 513)
        for (i, descriptor) in Self.gdt.enumerated() { words.append((Self.gdtAddress + UInt64(i) * 8, descriptor)) }
        let table = Self.present | Self.writable | Self.accessed
        words.append((Self.pml4Address, Self.pdptAddress | table))
        for g in 0..<UInt64(directories) {
            words.append((Self.pdptAddress + g * 8, (Self.firstDirectoryAddress + g * 4096) | table))
        }
        let leaf = table | Self.dirty | Self.largePage
        for g in 0..<UInt64(directories) {
            for i in 0..<UInt64(512) {
                words.append((Self.firstDirectoryAddress + g * 4096 + i * 8, (g * Self.gib + i * Self.largePageSize) | leaf))
            }
        }
        return words
    }

    /// Writes the GDT and the tables into `low`, guest memory from GPA 0 (zeroing the rest
    /// of `[gdtAddress, end)`).
    public func write(into low: UnsafeMutableRawBufferPointer) {
        precondition(UInt64(low.count) >= end, "low memory of \(low.count) bytes cannot hold tables up to \(end)")
        let start = Int(Self.gdtAddress)
        low.baseAddress!.advanced(by: start).initializeMemory(as: UInt8.self, repeating: 0, count: Int(end) - start)
        for (address, value) in entries() {
            low.storeBytes(of: value.littleEndian, toByteOffset: Int(address), as: UInt64.self)
        }
    }
}
