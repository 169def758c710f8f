@testable import FaultlineEngine
import FaultlineCore
import FaultlineLinux
import Testing

@Suite("Install pipeline and batched pre-copy stores (no kernel)", .timeLimit(.minutes(10)))
struct InstallPipelineTests {
    /// A decoded batch of `pages` (index, first byte; nil byte: a zero marker).
    func batch(_ pages: [(Int, UInt8?)]) throws -> PageBatch {
        var e = WireEncoder(reservingCapacity: pages.count * 4200)
        e.beginPages(pageSize: 4096)
        var bytes = [UInt8](repeating: 0, count: 4096)
        for (p, tag) in pages {
            guard let tag else { e.appendZeroPage(index: UInt64(p)); continue }
            bytes[0] = tag; bytes[4095] = 0xEE
            _ = bytes.withUnsafeBytes { e.appendPage(index: UInt64(p), bytes: $0) }
        }
        e.endPages()
        return try decodedBatch(e.bytes)
    }

    func tag(_ p: Int) -> UInt8 { UInt8(truncatingIfNeeded: p &* 7 &+ 1) }

    func setUp(pages: Int, exclusiveInstalls: Bool = false) throws -> (DestinationPageTable, MemoryPageMapper, PageInstaller) {
        let table = DestinationPageTable(count: pages)
        _ = table.switchOver(owed: [16..<pages])
        let mapper = MemoryPageMapper(pages: pages)
        try mapper.armFaults()
        let installer = PageInstaller(table: table, mapper: mapper, book: FaultBook(pages: pages, vcpus: 1, vcpusAccountOwnStall: false),
                                      lowPages: 16, exclusiveInstalls: exclusiveInstalls)
        return (table, mapper, installer)
    }

    @Test func thePipelineMapsEveryPageOnceWhileDemandRepliesRace() throws {
        let pages = 16 + 3000
        let (table, mapper, installer) = try setUp(pages: pages)
        let failures = Locked<[String]>([])
        let pipeline = try InstallPipeline(installer: installer, depth: 3, scratchPages: 256, runPages: 64, installers: 2,
                                           onFailure: { e in failures.withLock { $0.append("\(e)") } })
        // Batches larger than a scratch, zero markers inside runs, and the same pages as demand replies.
        let stream = try stride(from: 16, to: pages, by: 700).map { start in
            try batch((start..<min(start + 700, pages)).map { ($0, $0 % 5 == 0 ? nil : tag($0)) })
        }
        let demand = try OSThread(name: "demand") {
            let scratch = PageInstaller.Scratch(pages: 64)
            for start in stride(from: pages - 64, to: 16, by: -128) {
                let b = try? batch((start..<start + 64).map { ($0, $0 % 5 == 0 ? nil : tag($0)) })
                if let b { try? installer.install(b, demand: true, scratch: scratch, runPages: 64) }
            }
        }
        for b in stream { try pipeline.submit(b) }
        try pipeline.drain()
        demand.join()
        pipeline.stop()
        #expect(failures.withLock { $0 }.isEmpty)
        #expect(table.installedCount == pages - 16)
        for p in 16..<pages {
            #expect(mapper.mapCount[p] == 1, "page \(p) mapped \(mapper.mapCount[p]) times")
            let first = mapper.bytes(of: p).load(as: UInt8.self)
            #expect(first == (p % 5 == 0 ? 0 : tag(p)), "page \(p)")
        }
    }

    @Test func aFailedMappingStopsThePipelineAndGivesBackTheClaims() throws {
        let pages = 16 + 1024
        let (table, mapper, installer) = try setUp(pages: pages)
        mapper.failMapCall = 3
        let failures = Locked<[String]>([])
        let pipeline = try InstallPipeline(installer: installer, depth: 2, scratchPages: 64, runPages: 64, installers: 1,
                                           onFailure: { e in failures.withLock { $0.append("\(e)") } })
        var thrown = false
        do {
            for start in stride(from: 16, to: pages, by: 64) {
                try pipeline.submit(try batch((start..<start + 64).map { ($0, tag($0)) }))
            }
            try pipeline.drain()
        } catch {
            thrown = true
        }
        pipeline.stop()
        #expect(thrown)
        #expect(failures.withLock { $0 }.count == 1)
        for p in 16..<pages where !table.installed.contains(p) {
            #expect(!table.claimed.contains(p), "page \(p) is left claimed but not installed")
        }
        #expect(table.installedCount == 128)  // the two runs before the failing call
    }

    @Test func thePrecopyPipelineStoresInArrivalOrder() throws {
        let pages = 16 + 1024
        let table = DestinationPageTable(count: pages)
        let mapper = MemoryPageMapper(pages: pages)
        let installer = PageInstaller(table: table, mapper: mapper, book: FaultBook(pages: pages, vcpus: 1, vcpusAccountOwnStall: false),
                                      lowPages: 16, exclusiveInstalls: false)
        let pipeline = try InstallPipeline(.precopy, installer: installer, depth: 2, scratchPages: 64, runPages: 64, installers: 4,
                                           onFailure: { _ in })
        // Eight rounds over the same pages, each with its own content: the last one must win.
        for round in 0..<8 {
            try pipeline.submit(try batch((0..<pages).map { ($0, round == 5 && $0 % 3 == 0 ? nil : UInt8(round + 1)) }))
        }
        try pipeline.drain()
        pipeline.stop()
        for p in 0..<pages {
            #expect(mapper.bytes(of: p).load(as: UInt8.self) == 8, "page \(p)")
            #expect(table.state(p) == .precopied)
        }
        #expect(installer.precopyCount.load(ordering: .relaxed) == 8 * pages)
    }

    @Test func precopyStoresKeepTheLastCopyOfEveryPage() throws {
        let pages = 16 + 512
        let table = DestinationPageTable(count: pages)
        let mapper = MemoryPageMapper(pages: pages)
        let installer = PageInstaller(table: table, mapper: mapper, book: FaultBook(pages: pages, vcpus: 1, vcpusAccountOwnStall: false),
                                      lowPages: 16, exclusiveInstalls: false)
        let scratch = PageInstaller.Scratch(pages: 64)
        // A first round (low pages too, longer than the scratch), then a second one that re-sends
        // some pages, makes one zero, and repeats a page within its batch (the later copy wins).
        try installer.storePrecopy(try batch((0..<pages).map { ($0, tag($0)) }), scratch: scratch)
        try installer.storePrecopy(try batch([(100, 0xA1), (101, nil), (102, 0xA2), (400, 0xB1), (102, 0xA3), (103, 0xA4)]),
                                   scratch: scratch)
        // Dropped (stale) pages are stored again as first copies, in one run; a page repeated
        // after the run keeps its later copy.
        for r in table.dropPrecopied([200..<203]) { try mapper.discard(r) }
        try installer.storePrecopy(try batch([(200, 0xC1), (201, 0xC2), (202, nil), (200, 0xC9)]), scratch: scratch)
        let expected: [Int: UInt8] = [100: 0xA1, 101: 0, 102: 0xA3, 103: 0xA4, 400: 0xB1, 200: 0xC9, 201: 0xC2, 202: 0]
        for p in 0..<pages {
            #expect(mapper.bytes(of: p).load(as: UInt8.self) == expected[p] ?? tag(p), "page \(p)")
            #expect(table.state(p) == .precopied)
        }
        #expect(installer.precopyCount.load(ordering: .relaxed) == pages + 6 + 4)
    }
}

/// The one `pages` batch that `encoded` holds, decoded (a view into the decoder's buffer).
func decodedBatch(_ encoded: [UInt8]) throws -> PageBatch {
    var d = WireDecoder()
    _ = d.append(upTo: encoded.count) { buf in
        encoded.withUnsafeBytes { buf.copyMemory(from: $0) }
        return encoded.count
    }
    guard case .pages(let b)? = try d.nextMessage() else { throw MigrationError.protocolViolation("no batch") }
    return b
}
