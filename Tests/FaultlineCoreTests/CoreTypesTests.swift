import FaultlineCore
import Testing

@Suite("Addresses and layout")
struct AddressTests {
    @Test func checkedArithmetic() {
        #expect(GuestPhysicalAddress(UInt64.max - 1).adding(1) == GuestPhysicalAddress(UInt64.max))
        #expect(GuestPhysicalAddress(UInt64.max).adding(1) == nil)
        #expect(GuestPhysicalAddress(0x1234).alignedDown(to: 0x1000) == GuestPhysicalAddress(0x1000))
        #expect(GuestPhysicalAddress(0x2000).isAligned(to: 4096))
        #expect(GuestMemoryRange(start: GuestPhysicalAddress(UInt64.max - 10), size: 100) == nil)
        #expect(GuestMemoryRange(start: GuestPhysicalAddress(0), size: 0) == nil)
    }

    @Test func layoutTranslatesBothWays() throws {
        let layout = try GuestMemoryLayout(regions: [
            GuestMemoryRange(start: GuestPhysicalAddress(0), size: 0x10000)!,
            GuestMemoryRange(start: GuestPhysicalAddress(0x1000_0000), size: 0x4000)!,
        ])
        #expect(layout.pageCount == 20)
        #expect(layout.page(containing: GuestPhysicalAddress(0xFFFF)) == PageIndex(15))
        #expect(layout.page(containing: GuestPhysicalAddress(0x1000_0000)) == PageIndex(16))
        #expect(layout.page(containing: GuestPhysicalAddress(0x1000_3FFF)) == PageIndex(19))
        #expect(layout.page(containing: GuestPhysicalAddress(0x1000_4000)) == nil)
        #expect(layout.page(containing: GuestPhysicalAddress(0x20000)) == nil)
        #expect(layout.address(of: PageIndex(17)) == GuestPhysicalAddress(0x1000_1000))
        #expect(layout.address(of: PageIndex(20)) == nil)
        #expect(layout.address(of: PageIndex(-1)) == nil)
    }

    @Test func layoutRejectsBadRegions() {
        let a = GuestMemoryRange(start: GuestPhysicalAddress(0), size: 0x2000)!
        let b = GuestMemoryRange(start: GuestPhysicalAddress(0x1000), size: 0x2000)!
        #expect(throws: GuestMemoryLayout.LayoutError.overlapping(a, b)) { try GuestMemoryLayout(regions: [a, b]) }
        let odd = GuestMemoryRange(start: GuestPhysicalAddress(0x800), size: 0x1000)!
        #expect(throws: GuestMemoryLayout.LayoutError.unaligned(odd)) { try GuestMemoryLayout(regions: [odd]) }
        #expect(throws: GuestMemoryLayout.LayoutError.badPageSize(1000)) { try GuestMemoryLayout(pageSize: 1000, regions: [a]) }
        #expect(throws: GuestMemoryLayout.LayoutError.empty) { try GuestMemoryLayout(regions: []) }
    }
}

@Suite("Page bitmap")
struct PageBitmapTests {
    @Test func insertRemoveAndCount() {
        let b = PageBitmap(count: 130)
        #expect(!b.contains(0))
        #expect(b.insert(0))
        #expect(!b.insert(0))
        #expect(b.insert(64))
        #expect(b.insert(129))
        #expect(b.contains(129) && b.contains(64) && !b.contains(65))
        #expect(b.populationCount == 3)
        #expect(b.remove(64))
        #expect(!b.remove(64))
        #expect(b.populationCount == 2)
    }

    @Test func firstClearWrapsAndStopsWhenFull() {
        let b = PageBitmap(count: 70)
        b.insert(0..<65)
        #expect(b.firstClear(from: 0) == 65)
        #expect(b.firstClear(from: 66) == 66)
        b.insert(65..<70)
        #expect(b.firstClear(from: 10) == nil)
        #expect(b.isFull)
        b.remove(3)
        #expect(b.firstClear(from: 50) == 3)
    }

    @Test func clearRanges() {
        let b = PageBitmap(count: 200)
        b.insert(10..<20)
        b.insert(100..<200)
        var ranges: [Range<Int>] = []
        b.forEachClearRange { ranges.append($0) }
        #expect(ranges == [0..<10, 20..<100])
    }

    @Test func visitsSetPagesInOrder() {
        let b = PageBitmap(count: 200)
        for p in [199, 0, 64, 63, 130] { b.insert(p) }
        var seen: [Int] = []
        b.forEachSetPage { seen.append($0) }
        #expect(seen == [0, 63, 64, 130, 199])
    }

    @Test func mergesKernelBitmaps() {
        let b = PageBitmap(count: 200)
        var words: [UInt64] = [0b1011, 1 << 63]
        let added = words.withUnsafeMutableBytes { b.merge(kernelBitmap: $0.baseAddress!, pages: 128, firstPage: 50) }
        #expect(added == 4)
        #expect(b.contains(50) && b.contains(51) && !b.contains(52) && b.contains(53) && b.contains(50 + 127))
        #expect(b.populationCount == 4)
    }

    @Test func concurrentInsertsCountEachPageOnce() async {
        let b = PageBitmap(count: 4096)
        await withTaskGroup(of: Int.self) { group in
            for _ in 0..<4 {
                group.addTask { (0..<4096).reduce(0) { $0 + (b.insert($1) ? 1 : 0) } }
            }
            var total = 0
            for await n in group { total += n }
            #expect(total == 4096)
        }
        #expect(b.isFull)
    }
}

@Suite("Range map")
struct RangeMapTests {
    enum Kind: Equatable, Sendable { case shared, `private` }

    @Test func setSplitsAndMerges() {
        var m = RangeMap<Kind>()
        m.set(0..<100, to: .shared)
        m.set(40..<60, to: .private)
        #expect(m.entries.map(\.range) == [0..<40, 40..<60, 60..<100])
        #expect(m.value(at: 39) == .shared && m.value(at: 40) == .private && m.value(at: 60) == .shared)
        m.set(40..<60, to: .shared)
        #expect(m.entries.count == 1 && m.entries[0].range == 0..<100)
        m.set(90..<120, to: nil)
        #expect(m.value(at: 95) == nil && m.value(at: 89) == .shared)
        #expect(m.coverage(of: .shared) == 90)
    }

    @Test func disjointInsertsStaySorted() {
        var m = RangeMap<Int>()
        m.set(50..<60, to: 1)
        m.set(10..<20, to: 2)
        m.set(30..<40, to: 3)
        m.set(20..<30, to: 2)
        #expect(m.entries.map(\.range) == [10..<30, 30..<40, 50..<60])
        #expect(m.value(at: 45) == nil)
        #expect(m.value(at: 25) == 2)
    }
}

@Suite("Demand-paging configuration")
struct ConfigTests {
    func config(_ edit: (inout DemandPagingConfig) -> Void) -> DemandPagingConfig {
        var c = DemandPagingConfig()
        c.bytesPerVcpu = 4 << 20
        edit(&c)
        return c
    }

    @Test func acceptsTheDefaults() throws {
        try config { _ in }.validate()
        try config { $0.mode = .uffdMinor }.validate()
        #expect(config { $0.mode = .uffdMinor }.effectiveBacking == .memfd)
    }

    @Test func refusesBadInputWithAReason() {
        let cases: [(DemandPagingConfig, String)] = [
            (config { $0.vcpus = 0 }, "at least 1"),
            (config { $0.vcpus = 2000 }, "exceeds"),
            (config { $0.vcpus = 64; $0.bytesPerVcpu = 64 << 20 }, "does not fit"),
            (config { $0.readers = 0 }, "--readers"),
            (config { $0.mode = .uffdMinor; $0.backing = .anonymous }, "page cache"),
            (config { $0.mode = .uffdMissing; $0.backing = .guestMemfd }, "guest_memfd"),
            (config { $0.mode = .vcpuExit; $0.backing = .guestMemfd }, "no guest_memfd mmap"),
            (config { $0.bytesPerVcpu = 1000 }, "multiple"),
            (config { $0.mode = .none; $0.backing = .guestMemfd; $0.backend = .soft }, "soft"),
            (config { $0.delayMicroseconds = -1 }, "--delay-us"),
        ]
        for (c, fragment) in cases {
            do {
                try c.validate()
                Issue.record("accepted \(c)")
            } catch {
                #expect(error.description.contains(fragment), "\(error.description)")
            }
        }
    }

    @Test func sourcePatternIsPerPage() {
        #expect(SourcePattern.word(page: 0, word: 5) == 5)
        #expect(SourcePattern.word(page: 1, word: 0) == 2_654_435_761)
        var page = [UInt32](repeating: 0, count: 1024)
        page.withUnsafeMutableBytes { SourcePattern.fill(page: 7, at: $0.baseAddress!) }
        #expect(page[0] == SourcePattern.word(page: 7, word: 0))
        #expect(page[1023] == SourcePattern.word(page: 7, word: 1023))
    }
}

@Suite("CRC32C hardware path")
struct CRCHardwareTests {
    @Test func hardwareAndSoftwareAgree() {
        var rng = SystemRandomNumberGenerator()
        // Around the four-lane blocks (4 KiB), from aligned and unaligned starts.
        for length in [0, 1, 7, 8, 9, 63, 4095, 4096, 4097, 8192, 12_291, 10_000] {
            let bytes = (0..<length + 3).map { _ in UInt8.random(in: 0...255, using: &rng) }
            bytes.withUnsafeBytes { all in
                for offset in 0..<3 {
                    let raw = UnsafeRawBufferPointer(rebasing: all[offset..<offset + length])
                    #expect(CRC32C.checksum(raw) == CRC32C.softwareChecksum(raw), "length \(length) at +\(offset)")
                }
            }
        }
        // Fed in pieces that split the blocks.
        let long = (0..<20_000).map { _ in UInt8.random(in: 0...255, using: &rng) }
        var pieces = CRC32C()
        pieces.update(long[..<5000])
        pieces.update(long[5000...])
        #expect(pieces.value == long.withUnsafeBytes { CRC32C.softwareChecksum($0) })
        #expect(Array("123456789".utf8).withUnsafeBytes { CRC32C.checksum($0) } == 0xE306_9283)
    }

    /// The folding path (AVX-512 VPCLMULQDQ, inputs of 256 bytes and more) against the crc32
    /// instruction and the tables: every length from 240 to 600 (each step of its tail: 256-
    /// byte blocks, 64- and 16-byte folds, 8-byte and single-byte ends), pages, and lengths
    /// past several blocks, from unaligned starts, on random bytes and on runs of zeros and
    /// ones (carry-less products of all-zero and all-one lanes).
    @Test(.enabled(if: CRC32C.usesHardware, "the CPU has no SSE4.2 crc32 instruction"))
    func foldingAgreesWithTheInstructionAndTheTables() {
        var rng = SystemRandomNumberGenerator()
        let lengths = Array(240...600) + [1023, 1024, 1025, 4095, 4096, 4097, 8191, 65_536 + 77]
        let random = (0..<65_536 + 77 + 64).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let patterns: [[UInt8]] = [random, [UInt8](repeating: 0, count: random.count), [UInt8](repeating: 0xFF, count: random.count)]
        for bytes in patterns {
            bytes.withUnsafeBytes { all in
                for length in lengths {
                    for offset in [0, 1, 13, 63] {
                        let raw = UnsafeRawBufferPointer(rebasing: all[offset..<offset + length])
                        let soft = CRC32C.softwareChecksum(raw)
                        #expect(CRC32C.checksum(raw) == soft, "length \(length) at +\(offset)")
                        #expect(CRC32C.instructionChecksum(raw) == soft, "length \(length) at +\(offset)")
                    }
                }
            }
        }
        // A running register that is not the initial one enters the first block.
        var pieces = CRC32C()
        pieces.update(random[..<300])
        pieces.update(random[300..<5000])
        #expect(pieces.value == random[..<5000].withUnsafeBytes { CRC32C.softwareChecksum($0) })
    }
}

@Suite struct Log2HistogramTests {
    @Test func bucketsArePowersOfTwoInMicroseconds() {
        #expect(Log2Histogram.bucket(microseconds: 0) == 0)
        #expect(Log2Histogram.bucket(microseconds: 1) == 0)
        #expect(Log2Histogram.bucket(microseconds: 2) == 1)
        #expect(Log2Histogram.bucket(microseconds: 3) == 1)
        #expect(Log2Histogram.bucket(microseconds: 4) == 2)
        #expect(Log2Histogram.bucket(microseconds: 1023) == 9)
        #expect(Log2Histogram.bucket(microseconds: 1024) == 10)
        #expect(Log2Histogram.bucket(microseconds: .max) == Log2Histogram.bucketCount - 1)
    }

    @Test func recordsOverallAndPerVcpu() {
        let h = Log2Histogram(vcpus: 2)
        h.record(nanoseconds: 500, vcpu: 0)        // < 1 us: bucket 0
        h.record(nanoseconds: 17_000, vcpu: 1)     // 17 us: [16, 32)
        h.record(nanoseconds: 16_000, vcpu: 1)
        h.record(nanoseconds: 3_000_000, vcpu: -1) // 3 ms, no vCPU: the total only
        #expect(h.buckets(vcpu: 0) == [1])
        #expect(h.buckets(vcpu: 1) == [0, 0, 0, 0, 2])
        var total = [UInt64](repeating: 0, count: 12)
        total[0] = 1; total[4] = 2; total[11] = 1  // 3000 us: [2048, 4096)
        #expect(h.buckets() == total)
    }
}

@Suite struct PageBitmapWordTests {
    @Test func clearRangesSpanWholeWordsAndCopiesAreExact() {
        let b = PageBitmap(count: 300)
        b.insert(0..<3)
        b.insert(200..<201)
        b.insert(299..<300)
        var ranges: [Range<Int>] = []
        b.forEachClearRange { ranges.append($0) }
        #expect(ranges == [3..<200, 201..<299])
        let c = PageBitmap(count: 300)
        c.copyBits(from: b)
        #expect(c.populationCount == 5 && c.contains(200) && !c.contains(201))
    }
}
