import FaultlineCore
import FaultlineLinux
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Writes a snapshot of a paused guest (any ``SourceMachine``): the memory file first, with
/// zero pages left as holes and a CRC32C per chunk, then the vCPU states and the manifest,
/// which is renamed into place last. A crash part-way leaves a folder without a manifest,
/// which no reader takes for a snapshot.
public enum SnapshotWriter {
    public struct Report: Sendable, Codable {
        public var folder: String
        public var pages: Int
        public var dataPages: Int
        public var bytesWritten: UInt64
        public var memoryDigest: UInt64
        public var seconds: Double

        enum CodingKeys: String, CodingKey {
            case folder, pages, dataPages = "data_pages", bytesWritten = "bytes_written", memoryDigest = "memory_digest", seconds
        }
    }

    /// `machine` must be paused (its memory and vCPU states do not change meanwhile).
    public static func write(_ machine: SourceMachine, to folder: String, workload: String,
                             chunkPages: Int = SnapshotManifest.defaultChunkPages) throws -> Report {
        let t0 = MonotonicClock.nanoseconds()
        let layout = machine.layout
        try FileSystem.makeDirectory(folder)
        let manifestPath = folder + "/" + SnapshotManifest.manifestFileName
        FileSystem.remove(manifestPath)  // the folder is not a snapshot until the new manifest is in
        let writer = try FileWriter(creating: folder + "/" + SnapshotManifest.memoryFileName)

        // Pages the guest never touched are zero and are not read (reading would map them).
        let residency = UnsafeMutablePointer<UInt8>.allocate(capacity: max(layout.ramPages, 1))
        defer { residency.deallocate() }
        let residencyKnown = machine.residency(into: residency)
        let zero = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { zero.deallocate() }
        zero.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)

        var chunkCRCs: [UInt32] = []
        chunkCRCs.reserveCapacity(layout.totalPages / chunkPages + 1)
        var chunk = CRC32C()
        var digest: UInt64 = 0
        var dataPages = 0
        var bytesWritten: UInt64 = 0
        // A run of consecutive data pages that are also contiguous in memory: one write.
        var runStart = -1, runCount = 0
        func flushRun() throws {
            guard runCount > 0 else { return }
            try writer.write(machine.pagePointer(runStart), length: runCount * 4096, at: UInt64(runStart) * 4096)
            bytesWritten += UInt64(runCount) * 4096
            runStart = -1
            runCount = 0
        }
        for page in 0..<layout.totalPages {
            let ramIndex = page - layout.lowPages
            let untouched = residencyKnown && ramIndex >= 0 && residency[ramIndex] & 1 == 0
            let bytes = untouched ? UnsafeRawPointer(zero) : UnsafeRawPointer(machine.pagePointer(page))
            let buffer = UnsafeRawBufferPointer(start: bytes, count: 4096)
            let crc = CRC32C.checksum(buffer)
            chunk.update(buffer)
            digest ^= MemoryDigest.mix(page: page, crc: crc)
            if !untouched && !PageBatch.isAllZero(buffer) {
                dataPages += 1
                if runCount > 0 && runStart + runCount == page && runCount < 256
                    && UnsafeRawPointer(machine.pagePointer(runStart)) + runCount * 4096 == bytes {
                    runCount += 1
                } else {
                    try flushRun()
                    runStart = page
                    runCount = 1
                }
            } else {
                try flushRun()
            }
            if (page + 1) % chunkPages == 0 || page + 1 == layout.totalPages {
                chunkCRCs.append(chunk.value)
                chunk = CRC32C()
            }
        }
        try flushRun()
        try writer.setSize(UInt64(layout.totalPages) * 4096)
        try writer.sync()

        let vcpus = try (0..<layout.vcpus).map { SnapshotManifest.VcpuState(id: $0, state: try machine.vcpuStateBlob($0)) }
        let manifest = SnapshotManifest(vcpuCount: layout.vcpus, guestMode: layout.mode.rawValue, lowSize: layout.lowSize,
                                        ramBase: layout.ramBase, ramSize: layout.ramSize, chunkPages: chunkPages,
                                        chunkChecksums: chunkCRCs, memoryDigest: digest, dataPages: dataPages, vcpus: vcpus,
                                        workload: workload)
        try manifest.validate()
        let chunkFile = try FileWriter(creating: folder + "/" + SnapshotManifest.chunkFileName)
        try chunkFile.write(SnapshotManifest.chunkFileBytes(chunkCRCs))
        try chunkFile.sync()
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        try FileSystem.writeAtomically(Array(try encoder.encode(manifest)), to: manifestPath)
        return Report(folder: folder, pages: layout.totalPages, dataPages: dataPages, bytesWritten: bytesWritten,
                      memoryDigest: digest, seconds: Double(MonotonicClock.nanoseconds() - t0) / 1e9)
    }
}
