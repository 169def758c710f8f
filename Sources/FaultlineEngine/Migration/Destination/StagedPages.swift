import Atomics
import FaultlineCore

/// Where each post-copy page waits between the bulk receiver and the installer: which scratch
/// holds it, in which staging slot, and its checksum. A vCPU that faults on a page still
/// staged is then resolved from the staged bytes at once, instead of asking the source for
/// a page it already sent (in a fault storm most requests are for such pages, and each
/// costs a round trip).
///
/// One entry per page, written by the receiver, read by the fault path; nothing is allocated
/// per fault. An entry names the scratch's generation: a scratch that has been mapped is
/// retired (its generation advances) before it is refilled, so an entry read late no longer
/// matches and is ignored. A reader pins the scratch while it copies, and retiring waits for
/// the pins (see ``PageInstaller/Scratch/retire()``).
final class StagedPages: @unchecked Sendable {
    let count: Int
    private let entries: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    private let checksums: UnsafeMutablePointer<UInt32>

    /// A decoded entry.
    struct Entry: Equatable {
        var scratch: Int
        var generation: UInt32
        /// Staging slot of the page's bytes (meaningless for a zero page).
        var slot: Int
        var zero: Bool
    }

    static let maxScratches = 4095
    static let maxSlots = 1 << 19

    /// Entries and checksums in zero-filled memory (0: nothing staged).
    private let tables: (ZeroedTable<UnsafeAtomic<UInt64>.Storage>, ZeroedTable<UInt32>)

    init(pages: Int, allocator: ZeroFilledAllocator? = nil) {
        count = pages
        tables = (ZeroedTable(count: pages, allocator: allocator), ZeroedTable(count: pages, allocator: allocator))
        entries = tables.0.base
        checksums = tables.1.base
    }

    static func encode(_ e: Entry) -> UInt64 {
        precondition(e.scratch >= 0 && e.scratch < maxScratches && e.slot >= 0 && e.slot < maxSlots)
        return UInt64(e.generation) << 32 | UInt64(e.scratch + 1) << 20 | (e.zero ? 1 << 19 : 0) | UInt64(e.slot)
    }

    static func decode(_ raw: UInt64) -> Entry? {
        let scratch = Int((raw >> 20) & 0xFFF)
        guard scratch != 0 else { return nil }
        return Entry(scratch: scratch - 1, generation: UInt32(truncatingIfNeeded: raw >> 32), slot: Int(raw & 0x7FFFF),
                     zero: raw & (1 << 19) != 0)
    }

    /// The receiver: `page` is staged as `entry`, its bytes verified with `crc`.
    func publish(_ page: Int, _ entry: Entry, crc: UInt32) {
        checksums[page] = crc
        UnsafeAtomic<UInt64>(at: entries + page).store(Self.encode(entry), ordering: .releasing)
    }

    /// Where `page` was last staged (it may have been mapped and its scratch reused since:
    /// check the generation under a pin).
    func lookup(_ page: Int) -> (entry: Entry, crc: UInt32)? {
        guard page >= 0 && page < count,
              let e = Self.decode(UnsafeAtomic<UInt64>(at: entries + page).load(ordering: .acquiring)) else { return nil }
        return (e, checksums[page])
    }

    // Exclusive installs (MINOR): a staged page is written by exactly one thread, so the
    // fault path and the bulk installer race for it with one compare-and-swap on its entry.
    // Neither value decodes as an entry.
    static let sealedByInstaller: UInt64 = 1
    static let takenByFault: UInt64 = 2

    /// The fault path: takes `page` (staged as `entry`) from the bulk installer; false when
    /// the installer sealed it first (the fault then waits for the installer's run).
    func take(_ page: Int, _ entry: Entry) -> Bool {
        UnsafeAtomic<UInt64>(at: entries + page).compareExchange(expected: Self.encode(entry), desired: Self.takenByFault,
                                                                 ordering: .acquiringAndReleasing).exchanged
    }

    /// The bulk installer sealed `page` for its run (the run may have been mapped since).
    func isSealed(_ page: Int) -> Bool {
        page >= 0 && page < count && UnsafeAtomic<UInt64>(at: entries + page).load(ordering: .acquiring) == Self.sealedByInstaller
    }

    /// The bulk installer, just before writing `page` (staged as `entry`): false when the
    /// fault path took it first (the run then leaves it out).
    func seal(_ page: Int, _ entry: Entry) -> Bool {
        let raw = UnsafeAtomic<UInt64>(at: entries + page)
        if raw.compareExchange(expected: Self.encode(entry), desired: Self.sealedByInstaller, ordering: .acquiringAndReleasing).exchanged {
            return true
        }
        return raw.load(ordering: .acquiring) != Self.takenByFault
    }
}
