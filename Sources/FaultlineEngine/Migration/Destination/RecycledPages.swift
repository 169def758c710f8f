import Atomics
import FaultlineCore
import FaultlineLinux

/// Stale pages kept for their replacements (MISSING-based modes, UFFDIO_MOVE). Dropping a
/// stale pre-copied page frees it, and its new copy then needs a freshly allocated page; on
/// this machine that first touch is most of what installing a page costs (the host takes
/// freed memory back within seconds). Instead, a dropped page is moved out of guest RAM into
/// the same offset of a private area, and when its new copy arrives the bytes are written
/// there and the page is moved back: no allocation, no first touch.
///
/// The area mirrors guest RAM (NORESERVE address space; it only ever holds moved pages) and
/// is registered with the same userfaultfd as the RAM slice it mirrors, as UFFDIO_MOVE
/// requires of its destination. A slot whose page was not moved out is never touched (it
/// would fault into that userfaultfd): `available` says which slots hold a page, and a
/// slot is taken (its bit cleared) before its page is written.
final class RecycledPages: @unchecked Sendable {
    private let area: AnonymousMapping
    private let ramPages: Int
    /// RAM page indices whose slot holds a page nobody has taken.
    private let available: PageBitmap
    private let residency: UnsafeMutablePointer<UInt8>
    let recycled = ManagedAtomic<Int>(0)
    let reused = ManagedAtomic<Int>(0)

    /// nil when the address space cannot be had (pages are then dropped, as without MOVE).
    init?(ramPages: Int) {
        guard ramPages > 0, let area = try? AnonymousMapping(size: ramPages * 4096, reserve: false, label: "recycled pages")
        else { return nil }
        self.area = area
        self.ramPages = ramPages
        available = PageBitmap(count: ramPages)
        residency = .allocate(capacity: ramPages)
    }

    deinit { residency.deallocate() }

    func slot(_ ramPage: Int) -> HostAddress { HostAddress(area.base + ramPage * 4096) }

    /// Registers the slots of RAM pages `first..<first+count` with `uffd` (MISSING).
    func register(first: Int, count: Int, with uffd: Userfaultfd) throws {
        _ = try uffd.register(start: slot(first), length: UInt64(count) * 4096, mode: .missing)
    }

    /// Moves the pages of `ram` (RAM page indices, within one userfaultfd's slice) out of
    /// guest RAM at `ramBase` into their slots, best effort: the caller drops the range
    /// afterwards whatever happened here, so a page left behind (a hole, a slot still
    /// holding an earlier page, a pinned page) is dropped as before.
    func recycle(_ ram: Range<Int>, ramBase: HostAddress, uffd: Userfaultfd) {
        guard !ram.isEmpty, ram.upperBound <= ramPages else { return }
        let offset = UInt64(ram.lowerBound) * 4096
        _ = try? uffd.move(to: slot(ram.lowerBound), from: HostAddress(rawValue: ramBase.rawValue + offset),
                           length: UInt64(ram.count) * 4096, allowSourceHoles: true)
        // Which slots hold a page now: mincore, not the move's count (holes are skipped).
        guard (try? area.residency(offset: ram.lowerBound * 4096, length: ram.count * 4096, into: residency)) != nil else { return }
        var moved = 0
        for i in 0..<ram.count where residency[i] & 1 != 0 {
            if available.insert(ram.lowerBound + i) { moved += 1 }
        }
        recycled.wrappingIncrement(by: moved, ordering: .relaxed)
    }

    /// Takes the slots of RAM pages `first..<first+count` if every one holds a page (all or
    /// none): their address, to be written and moved back. nil otherwise.
    func take(first: Int, count: Int) -> UnsafeMutableRawPointer? {
        guard first >= 0, count > 0, first + count <= ramPages else { return nil }
        for i in 0..<count where !available.contains(first + i) { return nil }
        for i in 0..<count where !available.remove(first + i) {
            for j in 0..<i { _ = available.insert(first + j) }  // raced: give back what was taken
            return nil
        }
        reused.wrappingIncrement(by: count, ordering: .relaxed)
        return area.base + first * 4096
    }
}
