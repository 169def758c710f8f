import FaultlineCore
import FaultlineLinux
import Testing

@Suite("Zero-filled memory for per-page tables")
struct ZeroFilledArenaTests {
    @Test func tablesAreCarvedFromTheReservationPageAlignedAndApart() throws {
        let arena = ZeroFilledArena()
        try arena.reserve(bytes: 5 * 4096)
        #expect(arena.reserved)
        let a = ZeroedTable<UInt32>(count: 1025, allocator: arena.allocator)  // 4100 bytes: two pages
        let b = ZeroedTable<UInt64>(count: 512, allocator: arena.allocator)   // one page
        let distance = UnsafeMutableRawPointer(b.base) - UnsafeMutableRawPointer(a.base)
        #expect(distance == 2 * 4096, "b follows a's two pages")
        #expect(Int(bitPattern: a.base) % 4096 == 0)
        arena.finishPopulating()
        #expect((0..<1025).allSatisfy { a[$0] == 0 } && (0..<512).allSatisfy { b[$0] == 0 })
        a[1024] = 9
        b[0] = 10
        #expect(a[1024] == 9 && b[0] == 10)
    }

    @Test func beyondTheReservationTablesGetTheirOwnZeroPages() throws {
        let arena = ZeroFilledArena()
        try arena.reserve(bytes: 4096)
        let inside = ZeroedTable<UInt8>(count: 4096, allocator: arena.allocator)
        let beyond = ZeroedTable<UInt8>(count: 4096, allocator: arena.allocator)
        #expect((0..<4096).allSatisfy { beyond[$0] == 0 })
        beyond[4095] = 1
        inside[4095] = 2
        #expect(beyond[4095] == 1 && inside[4095] == 2)
    }

    @Test func populatingKeepsWhatIsAlreadyWritten() throws {
        let mapping = try AnonymousMapping(size: 64 * 4096, label: "populate test")
        let words = mapping.base.assumingMemoryBound(to: UInt64.self)
        words[0] = 0x1234
        words[64 * 512 - 1] = 0x5678
        _ = mapping.populateForWriting()  // false only on a kernel before 5.14; either way nothing changes
        #expect(words[0] == 0x1234 && words[64 * 512 - 1] == 0x5678 && words[512] == 0)
    }

    @Test func anArenaWithoutAReservationStillGivesZeroedTables() {
        let arena = ZeroFilledArena()
        #expect(!arena.reserved)
        let t = ZeroedTable<UInt32>(count: 10_000, allocator: arena.allocator)
        #expect((0..<10_000).allSatisfy { t[$0] == 0 })
    }
}
