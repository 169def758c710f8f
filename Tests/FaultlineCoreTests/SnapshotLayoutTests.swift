import FaultlineCore
import Testing

@Suite("Snapshot layouts and latency buckets (no kernel)")
struct SnapshotLayoutTests {
    func region(_ base: UInt64, _ size: UInt64, _ offset: UInt64, page: UInt64? = 4096, kib: UInt64? = nil) -> SnapshotRegionFields {
        SnapshotRegionFields(base: base, size: size, offset: offset, pageSize: page, pageSizeKib: kib)
    }

    @Test("regions are sorted by address and numbered page by page")
    func numbering() throws {
        let layout = try SnapshotLayout.validate([region(0x40_0000, 0x20_0000, 0x1000, page: 2 << 20, kib: 2 << 20),
                                                  region(0x1_0000, 0x3000, 0)], fileSize: 0x30_0000)
        #expect(layout.regions.map(\.base) == [0x1_0000, 0x40_0000])
        #expect(layout.regions.map(\.firstPage) == [0, 3])
        #expect(layout.totalPages == 4)
        #expect(layout.regionIndex(containing: 0x1_0000) == 0)
        #expect(layout.regionIndex(containing: 0x1_2FFF) == 0)
        #expect(layout.regionIndex(containing: 0x1_3000) == nil)
        #expect(layout.regionIndex(containing: 0x5F_FFFF) == 1)
        #expect(layout.regionIndex(containing: 0x60_0000) == nil)
        #expect(layout.regionIndex(containing: 0) == nil)
    }

    @Test("only page_size_kib (older Firecracker) is read as bytes")
    func deprecatedField() throws {
        let layout = try SnapshotLayout.validate([region(0x1000, 0x1000, 0, page: nil, kib: 4096)], fileSize: 4096)
        #expect(layout.regions[0].pageSize == 4096)
    }

    @Test("a removed range covers only whole pages, split per region")
    func removedPages() throws {
        let layout = try SnapshotLayout.validate([region(0x10000, 0x4000, 0), region(0x20000, 0x2000, 0x4000)], fileSize: 0x6000)
        var seen: [Range<UInt64>] = []
        layout.forEachPageRange(in: 0x11000, 0x21000) { seen.append($0) }
        #expect(seen == [1..<4, 4..<5])
        seen = []
        layout.forEachPageRange(in: 0x10800, 0x11800) { seen.append($0) }
        #expect(seen.isEmpty)
    }

    @Test("every bad layout is refused, naming the region")
    func refusals() {
        func refused(_ fields: [SnapshotRegionFields], file: UInt64 = 1 << 30, _ expected: SnapshotLayoutError) {
            #expect(throws: expected) { try SnapshotLayout.validate(fields, fileSize: file) }
        }
        refused([], .noRegions)
        refused([SnapshotRegionFields(base: nil, size: 4096, offset: 0, pageSize: 4096)], .missingField(index: 0, field: "base_host_virt_addr"))
        refused([region(0x1000, 0x1000, 0, page: nil)], .missingField(index: 0, field: "page_size"))
        refused([region(0x1000, 0x1000, 0, page: 4096, kib: 4)], .conflictingPageSizes(index: 0, pageSize: 4096, pageSizeKib: 4))
        refused([region(0x1000, 0x1000, 0, page: 65536)], .unsupportedPageSize(index: 0, 65536))
        refused([region(0x1000, 0, 0)], .emptyRegion(index: 0))
        refused([region(0x1800, 0x1000, 0)], .misaligned(index: 0, field: "base_host_virt_addr", value: 0x1800, alignment: 4096))
        refused([region(0x20_0000, 0x1000, 0, page: 2 << 20)], .misaligned(index: 0, field: "size", value: 0x1000, alignment: 2 << 20))
        refused([region(0x1000, 0x1000, 0x800)], .misaligned(index: 0, field: "offset", value: 0x800, alignment: 4096))
        refused([region(0xFFFF_FFFF_FFFF_F000, 0x2000, 0)], .addressOverflow(index: 0))
        refused([region(0x1000, 0x2000, 0), region(0x5000, 0x1000, 0), region(0x2000, 0x1000, 0)], .overlap(0, 2))
        refused([region(0x1000, 0x1000, 0x2000)], file: 0x2000, .startsPastEndOfFile(index: 0, offset: 0x2000, fileSize: 0x2000))
        refused([region(0x1000, 0x2000, 0x1000)], file: 0x2000, .endsPastEndOfFile(index: 0, end: 0x3000, fileSize: 0x2000))
    }

    @Test("latency buckets: exact below 16, within 1/16 above, percentiles capped at the maximum")
    func latencyBuckets() {
        for v: UInt64 in [0, 1, 15, 16, 17, 31, 32, 33, 1000, 123_456, 1 << 40, (1 << 41) - 1] {
            let i = LatencyBuckets.index(of: v)
            #expect(LatencyBuckets.lowerBound(of: i) <= v && v < LatencyBuckets.lowerBound(of: i) + LatencyBuckets.width(of: i), "\(v)")
        }
        #expect(LatencyBuckets.index(of: .max) == LatencyBuckets.count - 1)
        var counts = [UInt64](repeating: 0, count: LatencyBuckets.count)
        for v: UInt64 in 1...100 { counts[LatencyBuckets.index(of: v * 1000)] += 1 }
        let p50 = LatencyBuckets.value(atPercentile: 50, counts: counts, max: 100_000)
        #expect(abs(Double(p50) - 50_000) / 50_000 < 1.0 / 16)
        #expect(LatencyBuckets.value(atPercentile: 100, counts: counts, max: 100_000) <= 100_000)
        #expect(LatencyBuckets.value(atPercentile: 50, counts: [UInt64](repeating: 0, count: 4), max: 0) == 0)
    }
}
