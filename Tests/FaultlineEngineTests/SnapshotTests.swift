import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation
import Testing

/// A snapshot folder under /tmp, removed when the test ends.
final class SnapshotFolder {
    let path: String
    init(_ name: String = #function) {
        let clean = name.filter { $0.isLetter || $0.isNumber }
        path = NSTemporaryDirectory() + "faultline-snap-\(clean)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    var manifest: String { path + "/manifest.json" }
    var memory: String { path + "/memory.bin" }

    func editManifest(_ edit: (inout [String: Any]) -> Void) throws {
        var object = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: manifest))) as! [String: Any]
        edit(&object)
        try JSONSerialization.data(withJSONObject: object).write(to: URL(fileURLWithPath: manifest))
    }

    func flipByte(at offset: UInt64) throws {
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: memory))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        var byte = try handle.read(upToCount: 1)!
        byte[0] ^= 0x40
        try handle.seek(toOffset: offset)
        try handle.write(contentsOf: byte)
    }
}

/// A fake guest whose RAM holds a pattern, every third page zero.
func patternedMachine(ramPages: Int = 512, vcpus: Int = 2) throws -> MemoryMachine {
    let layout = try MachineLayout(vcpus: vcpus, ramSize: UInt64(ramPages) * 4096)
    let m = MemoryMachine(layout: layout)
    for page in 0..<layout.totalPages where page % 3 != 0 { m.write(page: page, byte: UInt8(truncatingIfNeeded: page &* 7) | 1) }
    return m
}

@Suite("Snapshots: write, verify, refuse bad ones (no kernel)")
struct SnapshotTests {
    @Test func aWrittenSnapshotVerifiesAndLeavesZeroPagesAsHoles() throws {
        let folder = SnapshotFolder()
        let machine = try patternedMachine()
        let written = try SnapshotWriter.write(machine, to: folder.path, workload: "test")
        let nonZero = (0..<machine.layout.totalPages).filter { $0 % 3 != 0 }.count
        #expect(written.dataPages == nonZero)
        #expect(written.bytesWritten == UInt64(nonZero) * 4096)
        let snapshot = try Snapshot(folder: folder.path)
        let verified = try snapshot.verify()
        #expect(verified.pages == machine.layout.totalPages)
        #expect(snapshot.manifest.vcpus.count == 2)
        #expect(snapshot.layout == machine.layout)
        // Every page reads back as written; zero pages are holes in the file.
        for page in 0..<machine.layout.totalPages {
            #expect(memcmp(snapshot.pagePointer(page), machine.pagePointer(page), 4096) == 0, "page \(page)")
        }
        let dataBytes = try snapshot.memory.dataRanges().reduce(UInt64(0)) { $0 + UInt64($1.count) }
        #expect(dataBytes < snapshot.memory.size, "zero pages are holes")
        #expect(try SnapshotMachine(snapshot: snapshot).vcpuStateBlob(1) == machine.vcpuStateBlob(1))
    }

    @Test func aFolderWithoutAManifestIsNotASnapshot() throws {
        let folder = SnapshotFolder()
        try FileManager.default.createDirectory(atPath: folder.path, withIntermediateDirectories: true)
        #expect { try Snapshot(folder: folder.path) } throws: { ($0 as? SnapshotError).map { "\($0)" }?.contains("no manifest.json") == true }
        #expect(throws: SnapshotError.self) { try Snapshot(folder: folder.path + "/nowhere") }
    }

    @Test func aForeignManifestIsRefused() throws {
        let folder = SnapshotFolder()
        _ = try SnapshotWriter.write(try patternedMachine(), to: folder.path, workload: "test")
        try Data("not json at all".utf8).write(to: URL(fileURLWithPath: folder.manifest))
        #expect { try Snapshot(folder: folder.path) } throws: { "\($0)".contains("not a snapshot manifest") }
        try Data(#"{"format":"qemu-savevm","version":1}"#.utf8).write(to: URL(fileURLWithPath: folder.manifest))
        #expect { try Snapshot(folder: folder.path) } throws: { "\($0)".contains("not a snapshot manifest") }
        _ = try SnapshotWriter.write(try patternedMachine(), to: folder.path, workload: "test")
        try folder.editManifest { $0["format"] = "qemu-savevm" }
        #expect { try Snapshot(folder: folder.path) } throws: { "\($0)".contains("not a Faultline snapshot") }
    }

    @Test func anUnknownVersionOrFeatureIsRefused() throws {
        let folder = SnapshotFolder()
        _ = try SnapshotWriter.write(try patternedMachine(), to: folder.path, workload: "test")
        try folder.editManifest { $0["version"] = 2 }
        #expect(throws: SnapshotError.unsupportedVersion(found: 2, supported: 1)) { try Snapshot(folder: folder.path) }
        try folder.editManifest { $0["version"] = 1; $0["features"] = ["chunk-crc32c", "encrypted-pages"] }
        #expect(throws: SnapshotError.unsupportedFeatures(["encrypted-pages"])) { try Snapshot(folder: folder.path) }
    }

    @Test func anInconsistentManifestIsRefused() throws {
        let folder = SnapshotFolder()
        _ = try SnapshotWriter.write(try patternedMachine(), to: folder.path, workload: "test")
        try folder.editManifest { $0["chunk_count"] = 3 }
        #expect { try Snapshot(folder: folder.path) } throws: { "\($0)".contains("3 chunk checksums for") }
        _ = try SnapshotWriter.write(try patternedMachine(), to: folder.path, workload: "test")
        try Data([1, 2, 3, 4]).write(to: URL(fileURLWithPath: folder.path + "/chunks.crc32c"))
        #expect { try Snapshot(folder: folder.path) } throws: { "\(String(describing: $0))".contains("truncated") }
        _ = try SnapshotWriter.write(try patternedMachine(), to: folder.path, workload: "test")
        try folder.editManifest { $0["chunk_file_crc32c"] = 7 }
        #expect { try Snapshot(folder: folder.path) } throws: { "\($0)".contains("the chunk file's CRC32C") }
        _ = try SnapshotWriter.write(try patternedMachine(), to: folder.path, workload: "test")
        try folder.editManifest { $0["ram_size"] = 4096 * 513 }
        #expect { try Snapshot(folder: folder.path) } throws: { "\($0)".contains("do not add up") }
        _ = try SnapshotWriter.write(try patternedMachine(), to: folder.path, workload: "test")
        try folder.editManifest { $0["memory_file"] = "../../etc/passwd" }
        #expect { try Snapshot(folder: folder.path) } throws: { "\($0)".contains("memory file") }
    }

    @Test func aTruncatedMemoryFileIsRefusedOnOpen() throws {
        let folder = SnapshotFolder()
        _ = try SnapshotWriter.write(try patternedMachine(), to: folder.path, workload: "test")
        let size = try Snapshot(folder: folder.path).memory.size
        #expect(truncate(folder.memory, off_t(size - 4096)) == 0)
        #expect(throws: SnapshotError.truncated(expected: size, found: size - 4096)) { try Snapshot(folder: folder.path) }
    }

    @Test func aCorruptByteFailsItsChunkAndTheVerify() throws {
        let folder = SnapshotFolder()
        let machine = try patternedMachine()
        _ = try SnapshotWriter.write(machine, to: folder.path, workload: "test")
        let page = machine.layout.lowPages + 100  // 100 % 3 != 0 ... a data page either way
        try folder.flipByte(at: UInt64(page) * 4096 + 17)
        let snapshot = try Snapshot(folder: folder.path)  // opening reads no memory
        let chunk = snapshot.manifest.chunk(of: page)
        #expect { try snapshot.verify() } throws: { ($0 as? SnapshotError).map { if case .corruptChunk(chunk, _, _, _) = $0 { true } else { false } } == true }
        #expect(throws: SnapshotError.self) { try snapshot.checkPages(page..<page + 1) }
        try snapshot.checkPages(0..<1)  // other chunks are fine
    }
}

@Suite("Restore against fakes (no kernel)")
struct RestoreWithFakesTests {
    func restore(_ folder: SnapshotFolder, lazy: Bool) throws -> (Result<RestoreReport, Error>, MemoryPageMapper?) {
        let snapshot = try Snapshot(folder: folder.path)
        var options = SnapshotRestore.Options()
        options.lazy = lazy
        options.destination.runAfterSeconds = 0
        options.destination.faultPathCPU = .unpinned
        options.destination.reconnectSeconds = 2
        options.destination.idleSeconds = 5
        options.source.faultPathCPU = .unpinned
        options.source.peerTimeoutSeconds = 5
        options.source.reconnectSeconds = 2
        let mapperBox = Locked<MemoryPageMapper?>(nil)
        options.destination.machineFactory = { layout in
            let mapper = MemoryPageMapper(pages: layout.totalPages)
            mapperBox.withLock { $0 = mapper }
            return (MemoryMachine(layout: layout), mapper)
        }
        let result = Result { try SnapshotRestore.run(snapshot, options: options, started: MonotonicClock.nanoseconds()) }
        return (result, mapperBox.withLock { $0 })
    }

    @Test(arguments: [true, false])
    func everyPageArrivesAndTheDigestMatches(lazy: Bool) throws {
        let folder = SnapshotFolder("restore\(lazy)")
        let machine = try patternedMachine()
        _ = try SnapshotWriter.write(machine, to: folder.path, workload: "test")
        let (result, mapper) = try restore(folder, lazy: lazy)
        let report = try result.get()
        #expect(report.digestMatch)
        #expect(report.mode == (lazy ? "lazy" : "eager"))
        let m = try #require(mapper)
        #expect(memcmp(m.memory, machine.memory, machine.layout.totalPages * 4096) == 0)
        if lazy { #expect(report.backgroundPages + report.pagesBeforeStart + report.demandPages >= machine.layout.totalPages) }
        else { #expect(report.pagesBeforeStart == machine.layout.totalPages) }
    }

    @Test func aCorruptChunkFailsTheLazyRestoreAndNoneOfItsPagesIsInstalled() throws {
        let folder = SnapshotFolder()
        let machine = try patternedMachine()
        _ = try SnapshotWriter.write(machine, to: folder.path, workload: "test")
        let page = machine.layout.lowPages + 200
        try folder.flipByte(at: UInt64(page) * 4096 + 5)
        let (result, mapper) = try restore(folder, lazy: true)
        #expect { try result.get() } throws: { "\($0)".contains("snapshot memory is corrupt") }
        let m = try #require(mapper)
        let chunk = try Snapshot(folder: folder.path).manifest.pages(ofChunk: page / SnapshotManifest.defaultChunkPages)
        for p in chunk { #expect(m.mapCount[p] == 0 && !m.mapped.contains(p), "page \(p) of the corrupt chunk was installed") }
    }

    @Test func aCorruptSnapshotIsRefusedByTheEagerRestoreBeforeAnythingStarts() throws {
        let folder = SnapshotFolder()
        let machine = try patternedMachine()
        _ = try SnapshotWriter.write(machine, to: folder.path, workload: "test")
        try folder.flipByte(at: UInt64(machine.layout.lowPages + 50) * 4096)
        let (result, mapper) = try restore(folder, lazy: false)
        #expect(throws: SnapshotError.self) { try result.get() }
        #expect(mapper == nil, "no guest was built")
    }
}

@Suite("Working-set record and replay against fakes (no kernel)")
struct WorkingSetTests {
    func restore(_ folder: SnapshotFolder, configure: (inout SnapshotRestore.Options) -> Void,
                 faults: [UInt64] = [], beforeBulkMap: ((Int, Int) -> Void)? = nil,
                 onScheduling: (@Sendable (VcpuScheduling) -> Void)? = nil) throws -> RestoreReport {
        let snapshot = try Snapshot(folder: folder.path)
        var options = SnapshotRestore.Options()
        options.destination.faultMode = .vcpuExit
        options.destination.runAfterSeconds = 0
        options.destination.faultPathCPU = .unpinned
        options.source.faultPathCPU = .unpinned
        options.source.peerTimeoutSeconds = 5
        options.destination.machineFactory = { layout in
            let m = MemoryMachine(layout: layout)
            m.simulatedFaults = faults
            m.onScheduling = onScheduling
            let mapper = MemoryPageMapper(pages: layout.totalPages)
            mapper.beforeBulkMap = beforeBulkMap
            return (m, mapper)
        }
        configure(&options)
        return try SnapshotRestore.run(snapshot, options: options, started: MonotonicClock.nanoseconds())
    }

    @Test func recordingKeepsTheFirstTouchOrder() throws {
        let folder = SnapshotFolder()
        let machine = try patternedMachine(ramPages: 2048)
        _ = try SnapshotWriter.write(machine, to: folder.path, workload: "test")
        let touched = [1500, 20, 777, 1999, 300]  // RAM page offsets, in touch order
        // The stream waits longer than the test's touches take: each touch is a fault of its own.
        let report = try restore(folder, configure: { $0.recordWorkingSetSeconds = 2 },
                                 faults: touched.map { UInt64($0) * 4096 })
        #expect(report.digestMatch)
        let low = machine.layout.lowPages
        #expect(report.workingSet?.pages == touched.map { $0 + low })
        #expect(report.workingSet?.snapshotDigest == (try Snapshot(folder: folder.path)).manifest.memoryDigest)
    }

    /// A 2048-page snapshot and a working set of three scattered pages of it.
    func snapshotWithWorkingSet(_ folder: SnapshotFolder) throws -> WorkingSet {
        let machine = try patternedMachine(ramPages: 2048)
        _ = try SnapshotWriter.write(machine, to: folder.path, workload: "test")
        let snapshot = try Snapshot(folder: folder.path)
        return WorkingSet(snapshotDigest: snapshot.manifest.memoryDigest, pages: [1800, 40, 1200].map { $0 + machine.layout.lowPages })
    }

    @Test func replaySendsTheWorkingSetFirstInItsOrder() throws {
        let folder = SnapshotFolder()
        let set = try snapshotWithWorkingSet(folder)
        let mapped = Locked<[Int]>([])
        let report = try restore(folder, configure: { $0.prefetch = set },
                                 beforeBulkMap: { first, count in mapped.withLock { $0.append(contentsOf: first..<first + count) } })
        #expect(report.digestMatch)
        #expect(report.prefetchPages == 3)
        let order = mapped.withLock { $0 }
        #expect(Array(order.prefix(3)) == set.pages, "the working set went first: \(order.prefix(8))")
    }

    /// Once the working set is in, the rest of the fill gives way: the vCPUs are back at
    /// normal priority before the linear fill has mapped the rest of RAM.
    @Test func replayPutsTheGuestAheadOfTheFillOnceTheSetIsIn() throws {
        let folder = SnapshotFolder()
        let set = try snapshotWithWorkingSet(folder)
        let mapped = Locked(0)
        let mappedAtNormal = Locked<[Int]>([])
        let report = try restore(folder, configure: { $0.prefetch = set },
                                 beforeBulkMap: { _, count in mapped.withLock { $0 += count } },
                                 onScheduling: { s in if s == .normal { mappedAtNormal.withLock { $0.append(mapped.withLock { $0 }) } } })
        #expect(report.digestMatch)
        let atNormal = mappedAtNormal.withLock { $0 }
        #expect(atNormal.first.map { $0 < 1024 } == true, "pages mapped when the vCPUs got normal priority: \(atNormal)")
    }

    @Test func withoutReplayTheGuestStaysBehindTheFillUntilEveryPageIsIn() throws {
        let folder = SnapshotFolder()
        _ = try snapshotWithWorkingSet(folder)
        let mapped = Locked(0)
        let mappedAtNormal = Locked<[Int]>([])
        let report = try restore(folder, configure: { _ in },
                                 beforeBulkMap: { _, count in mapped.withLock { $0 += count } },
                                 onScheduling: { s in if s == .normal { mappedAtNormal.withLock { $0.append(mapped.withLock { $0 }) } } })
        #expect(report.digestMatch)
        let atNormal = mappedAtNormal.withLock { $0 }
        #expect(atNormal.allSatisfy { $0 >= 2048 }, "pages mapped when the vCPUs got normal priority: \(atNormal)")
    }

    @Test func aWorkingSetOfAnotherSnapshotIsRefused() throws {
        let folder = SnapshotFolder()
        _ = try SnapshotWriter.write(try patternedMachine(), to: folder.path, workload: "test")
        let foreign = WorkingSet(snapshotDigest: 42, pages: [20])
        #expect { try restore(folder, configure: { $0.prefetch = foreign }) } throws: { "\($0)".contains("another snapshot") }
        let snapshot = try Snapshot(folder: folder.path)
        let outside = WorkingSet(snapshotDigest: snapshot.manifest.memoryDigest, pages: [5, 1 << 30])
        #expect { try restore(folder, configure: { $0.prefetch = outside }) } throws: { "\($0)".contains("outside") }
    }
}
