@testable import FaultlineEngine
import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// Stale pages moved out of "guest RAM" (a plain registered mapping here) and back with
/// UFFDIO_MOVE: which slots count as kept, all-or-none taking, and the bytes that land.
@Suite("Recycled stale pages (userfaultfd MOVE)", .timeLimit(.minutes(2)), .gate(.recycledPages))
struct RecycledPagesTests {
    /// "Guest RAM" of `pages` registered MISSING with a MOVE-capable userfaultfd, and its recycler.
    func registered(pages: Int) throws -> (AnonymousMapping, Userfaultfd, RecycledPages) {
        let ram = try AnonymousMapping(size: pages * 4096, label: "test ram")
        let uffd = try Userfaultfd(required: [.move], flags: [.nonBlocking, .userModeOnly], label: "test uffd")
        try uffd.register(start: ram.hostAddress, length: UInt64(pages * 4096), mode: .missing)
        let recycler = try #require(RecycledPages(ramPages: pages))
        try recycler.register(first: 0, count: pages, with: uffd)
        return (ram, uffd, recycler)
    }

    @Test func keepsMovedPagesSkipsHolesAndMovesThemBack() throws {
        let pages = 32
        let (ram, uffd, recycler) = try registered(pages: pages)
        let zeros = [UInt8](repeating: 0, count: 4096)
        // Pages 0..<24 hold their index; 24..<32 are holes (never installed).
        for p in 0..<24 {
            var bytes = zeros
            bytes[0] = UInt8(p + 1)
            bytes[4095] = UInt8(p + 101)
            _ = try bytes.withUnsafeBytes {
                try uffd.copy(to: ram.hostAddress.adding(UInt64(p * 4096))!, from: $0.baseAddress!, length: 4096)
            }
        }
        recycler.recycle(8..<32, ramBase: ram.hostAddress, uffd: uffd)
        #expect(recycler.recycled.load(ordering: .relaxed) == 16, "pages 8..<24 were kept; 24..<32 were holes")

        // A run reaching into a hole is refused whole, and refusing takes nothing.
        #expect(recycler.take(first: 20, count: 8) == nil)
        #expect(recycler.take(first: 0, count: 4) == nil, "pages never dropped were never kept")
        let slot = try #require(recycler.take(first: 8, count: 16))
        #expect(slot.load(fromByteOffset: 5 * 4096, as: UInt8.self) == 14, "the kept page holds its old bytes")
        #expect(recycler.take(first: 8, count: 1) == nil, "a taken slot cannot be taken twice")

        // The new bytes go into the kept pages, which move back into RAM.
        for i in 0..<16 { slot.storeBytes(of: UInt8(200 + i), toByteOffset: i * 4096, as: UInt8.self) }
        let back = try uffd.move(to: ram.hostAddress.adding(8 * 4096)!, from: HostAddress(slot), length: 16 * 4096)
        #expect(back == .installed)
        for i in 0..<16 {
            #expect(ram.base.load(fromByteOffset: (8 + i) * 4096, as: UInt8.self) == UInt8(200 + i))
            #expect(ram.base.load(fromByteOffset: (8 + i) * 4096 + 4095, as: UInt8.self) == UInt8(8 + i + 101),
                    "the rest of the page is the kept page's")
        }
        #expect(recycler.reused.load(ordering: .relaxed) == 16)
        // Pages 0..<8 were never touched by the move.
        for p in 0..<8 { #expect(ram.base.load(fromByteOffset: p * 4096, as: UInt8.self) == UInt8(p + 1)) }
    }

    @Test func aSlotStillHoldingAPageIsNotOverwritten() throws {
        let pages = 8
        let (ram, uffd, recycler) = try registered(pages: pages)
        var bytes = [UInt8](repeating: 7, count: 4096)
        _ = try bytes.withUnsafeBytes { try uffd.copy(to: ram.hostAddress, from: $0.baseAddress!, length: 4096) }
        recycler.recycle(0..<1, ramBase: ram.hostAddress, uffd: uffd)
        // The page comes back (as a new copy would have it) and is dropped again before its
        // slot was taken: the move stops at the occupied slot, the page stays in RAM (the
        // mapper drops it after), and the slot keeps the first page.
        bytes = [UInt8](repeating: 9, count: 4096)
        _ = try bytes.withUnsafeBytes { try uffd.copy(to: ram.hostAddress, from: $0.baseAddress!, length: 4096) }
        recycler.recycle(0..<1, ramBase: ram.hostAddress, uffd: uffd)
        #expect(recycler.recycled.load(ordering: .relaxed) == 1, "counted once")
        #expect(ram.base.load(as: UInt8.self) == 9, "not moved: the caller's drop removes it")
        let slot = try #require(recycler.take(first: 0, count: 1))
        #expect(slot.load(as: UInt8.self) == 7)
    }
}
