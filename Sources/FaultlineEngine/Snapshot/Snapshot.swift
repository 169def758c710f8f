import FaultlineCore
import FaultlineLinux
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A snapshot opened for reading: its manifest checked, its memory file mapped and its size
/// checked. Opening reads no memory; chunks are checked against their CRC32C the first time
/// a page of them is read (``checkPages(_:)``), or all at once by ``verify()``.
public final class Snapshot: @unchecked Sendable {
    public let folder: String
    public let manifest: SnapshotManifest
    public let layout: MachineLayout
    public let memory: MappedFile
    /// Chunks whose checksum matched (set once, never cleared).
    private let checked: PageBitmap

    /// Opens `folder`; a missing, foreign, truncated or inconsistent snapshot is refused here,
    /// with the reason.
    public init(folder: String) throws {
        self.folder = folder
        let manifestPath = folder + "/" + SnapshotManifest.manifestFileName
        guard FileSystem.exists(manifestPath) else {
            throw SnapshotError.missing("\(folder) has no \(SnapshotManifest.manifestFileName)")
        }
        let bytes = try FileSystem.read(manifestPath, limit: 256 << 20)
        var manifest: SnapshotManifest
        do {
            manifest = try JSONDecoder().decode(SnapshotManifest.self, from: Data(bytes))
        } catch {
            throw SnapshotError.foreign("\(manifestPath) is not a snapshot manifest (\(Self.describe(error)))")
        }
        try manifest.validate()
        let chunkPath = folder + "/" + SnapshotManifest.chunkFileName
        guard FileSystem.exists(chunkPath) else { throw SnapshotError.missing("\(chunkPath) does not exist") }
        try manifest.loadChunkFile(try FileSystem.read(chunkPath, limit: manifest.chunkFileCount * 4 + 1))
        self.manifest = manifest
        layout = try MachineLayout(vcpus: manifest.vcpuCount, ramSize: manifest.ramSize,
                                   mode: GuestMode(rawValue: manifest.guestMode))
        guard layout.lowSize == manifest.lowSize, layout.ramBase == manifest.ramBase else {
            throw SnapshotError.invalidManifest("low memory \(manifest.lowSize) bytes and RAM at 0x\(String(manifest.ramBase, radix: 16)) "
                                                + "are not this build's \(layout.mode) layout")
        }
        let memoryPath = folder + "/" + manifest.memoryFile
        guard FileSystem.exists(memoryPath) else { throw SnapshotError.missing("\(memoryPath) does not exist") }
        let file = try MappedFile.open(memoryPath)
        let size = try MappedFile.regularFileSize(file)
        guard size == manifest.memorySize else { throw SnapshotError.truncated(expected: manifest.memorySize, found: size) }
        memory = try MappedFile(file)
        checked = PageBitmap(count: manifest.chunkCount)
    }

    static func describe(_ error: Error) -> String {
        switch error {
        case DecodingError.keyNotFound(let key, _): "no '\(key.stringValue)'"
        case DecodingError.typeMismatch(_, let c), DecodingError.valueNotFound(_, let c):
            "bad '\(c.codingPath.map(\.stringValue).joined(separator: "."))'"
        case DecodingError.dataCorrupted(let c): "unreadable JSON\(c.codingPath.isEmpty ? "" : " at \(c.codingPath.map(\.stringValue).joined(separator: "."))")"
        default: "\(error)"
        }
    }

    /// Memory of page `page` (reading it must be preceded by ``checkPages(_:)``).
    @inline(__always) public func pagePointer(_ page: Int) -> UnsafeRawPointer { memory.base + page * 4096 }

    /// Checks every chunk `pages` touch that was not checked yet; throws on the first bad one.
    /// Cheap once a chunk is checked (a bit test), so it stands in front of every read.
    @inline(__always) public func checkPages(_ pages: Range<Int>) throws {
        guard !pages.isEmpty else { return }
        let first = manifest.chunk(of: pages.lowerBound), last = manifest.chunk(of: pages.upperBound - 1)
        for chunk in first...last where !checked.contains(chunk) { try checkChunk(chunk) }
    }

    private func checkChunk(_ chunk: Int) throws {
        let pages = manifest.pages(ofChunk: chunk)
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: pagePointer(pages.lowerBound), count: pages.count * 4096))
        guard crc == manifest.chunkChecksums[chunk] else {
            throw SnapshotError.corruptChunk(index: chunk, pages: pages, expected: manifest.chunkChecksums[chunk], found: crc)
        }
        checked.insert(chunk)  // atomic: two threads checking one chunk both find it good
    }

    /// Checks every chunk and the whole-memory digest, reading all of memory once.
    public func verify() throws -> VerifyReport {
        let t0 = MonotonicClock.nanoseconds()
        var digest: UInt64 = 0
        for chunk in 0..<manifest.chunkCount {
            try checkChunk(chunk)
            for page in manifest.pages(ofChunk: chunk) {
                digest ^= MemoryDigest.mix(page: page, crc: CRC32C.checksum(UnsafeRawBufferPointer(start: pagePointer(page), count: 4096)))
            }
        }
        guard digest == manifest.memoryDigest else { throw SnapshotError.digestMismatch(expected: manifest.memoryDigest, found: digest) }
        return VerifyReport(chunks: manifest.chunkCount, pages: manifest.totalPages, dataPages: manifest.dataPages,
                            seconds: Double(MonotonicClock.nanoseconds() - t0) / 1e9)
    }

    public struct VerifyReport: Sendable, Codable {
        public var chunks: Int
        public var pages: Int
        public var dataPages: Int
        public var seconds: Double

        enum CodingKeys: String, CodingKey { case chunks, pages, dataPages = "data_pages", seconds }
    }

    /// One byte per RAM page, bit 0 set where the memory file holds data; holes are zero pages.
    public func ramDataMap(into bytes: UnsafeMutablePointer<UInt8>) throws {
        bytes.initialize(repeating: 0, count: layout.ramPages)
        let lowBytes = manifest.lowSize
        for range in try memory.dataRanges() {
            let start = max(range.lowerBound, lowBytes), end = range.upperBound
            guard start < end else { continue }
            let first = Int((start - lowBytes) / 4096), last = Int((end - lowBytes + 4095) / 4096)
            for i in first..<min(last, layout.ramPages) { bytes[i] = 1 }
        }
    }
}
