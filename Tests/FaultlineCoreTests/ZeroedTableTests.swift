import FaultlineCore
import Testing

/// Zero-filled memory made by hand, as the Linux layer's mappings are.
private final class HeapZeroes: ZeroFilledMemory, @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let size: Int
    init(size: Int) {
        self.size = size
        base = .allocate(byteCount: size, alignment: 4096)
        base.initializeMemory(as: UInt8.self, repeating: 0, count: size)
    }
    deinit { base.deallocate() }
}

/// What an allocator handed out (it is called on the caller's thread, inside the table's init).
private final class Made: @unchecked Sendable { var memory: [HeapZeroes] = [] }

@Suite("Zeroed per-page tables (no kernel)")
struct ZeroedTableTests {
    @Test func withoutAnAllocatorTheTableZeroesItsOwnMemory() {
        let table = ZeroedTable<UInt64>(count: 1000, allocator: nil)
        #expect((0..<1000).allSatisfy { table[$0] == 0 })
        table[999] = 7
        #expect(table[999] == 7)
    }

    @Test func theTableLivesInTheAllocatorsMemoryAndKeepsItAlive() {
        let made = Made()
        let table = ZeroedTable<UInt32>(count: 4096, allocator: { bytes in
            let m = HeapZeroes(size: bytes)
            made.memory.append(m)
            return m
        })
        let memory = made.memory
        #expect(memory.count == 1 && memory[0].size >= 4096 * 4)
        #expect(UnsafeMutableRawPointer(table.base) == memory[0].base)
        table[4095] = 0xDEAD_BEEF
        #expect(memory[0].base.load(fromByteOffset: 4095 * 4, as: UInt32.self) == 0xDEAD_BEEF)
    }

    @Test func tooSmallMemoryFromTheAllocatorIsNotUsed() {
        let table = ZeroedTable<UInt64>(count: 512, allocator: { _ in HeapZeroes(size: 8) })
        table[511] = 1  // on the heap: writing past 8 bytes of the allocator's memory would corrupt it
        #expect(table[511] == 1 && table[0] == 0)
    }
}
