/// The CPU mode a migration guest runs in, and the machine layout that goes with it.
///
/// The mode is a function of the layout - RAM at ``protected32``'s base (0x1000_0000) or at
/// ``long64``'s (0x1_0000_0000, 4 GiB) - so a destination that receives the layout in the
/// hello builds the matching machine without anything else on the wire. The vCPU state
/// (CR0/CR3/CR4/EFER and the segments) travels in the state blob; the page tables are
/// ordinary low memory and travel with it.
public enum GuestMode: String, CaseIterable, Sendable, CustomStringConvertible {
    /// 32-bit protected mode, paging off: RAM at 0x1000_0000, ending below 0xF000_0000.
    case protected32 = "protected"
    /// 64-bit long mode, identity-mapped with 2 MiB pages: RAM from 4 GiB, so every RAM
    /// address needs more than 32 bits.
    case long64 = "long"

    public var description: String { rawValue }

    /// Guest-physical address of RAM.
    public var ramBase: UInt64 {
        switch self {
        case .protected32: DemandPagingConfig.ramBase
        case .long64: 1 << 32
        }
    }

    /// RAM must end at or below this address. Protected mode: below 0xF000_0000 (no paging,
    /// 32-bit registers). Long mode: 64 GiB, the guest-physical width (MAXPHYADDR 36) KVM
    /// gives a vCPU whose CPUID was never set - a page-table entry naming a frame above it
    /// has reserved bits set and faults.
    public var ramLimit: UInt64 {
        switch self {
        case .protected32: DemandPagingConfig.ramLimit
        case .long64: 1 << 36
        }
    }

    /// The most RAM a guest of this mode can have.
    public var maxRAM: UInt64 { ramLimit - ramBase }

    /// Bytes of low memory at GPA 0: the code page at 0x1000, and in long mode the GDT and
    /// the page tables (``LongModePageTables``) below 1 MiB.
    public var lowSize: UInt64 {
        switch self {
        case .protected32: 0x1_0000
        case .long64: 0x10_0000
        }
    }

    /// The mode a guest of `ramSize` bytes gets by default: protected mode while RAM fits it
    /// (every existing layout stays as it was), long mode above that.
    public static func natural(forRAM ramSize: UInt64) -> GuestMode {
        ramSize <= GuestMode.protected32.maxRAM ? .protected32 : .long64
    }

    /// The mode whose RAM starts at `ramBase`, if any (a layout received from a peer).
    public init?(ramBase: UInt64) {
        guard let mode = Self.allCases.first(where: { $0.ramBase == ramBase }) else { return nil }
        self = mode
    }
}
