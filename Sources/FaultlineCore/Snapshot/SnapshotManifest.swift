/// A snapshot of a paused guest, as the manifest (`manifest.json`) describes it: the machine
/// layout, the vCPU states, and a memory file that holds every guest page at
/// `page index x pageSize` (low memory first, then RAM). Zero pages are holes in that file.
/// The memory is covered by one CRC32C per chunk, so a reader can check a chunk the first
/// time it serves a page of it, and a whole-memory digest (``MemoryDigest``'s algorithm) that
/// a restored guest's memory is checked against.
///
/// The manifest is written last (atomically, by rename): a folder without one is not a
/// snapshot. Pure data and checks; reading and writing files is the engine's.
public struct SnapshotManifest: Codable, Sendable, Equatable {
    /// Written into every manifest; a file without it is not a Faultline snapshot.
    public static let formatName = "faultline-snapshot"
    /// The version this build writes and the only one it reads.
    public static let currentVersion = 1
    public static let manifestFileName = "manifest.json"
    public static let memoryFileName = "memory.bin"
    /// The chunk checksums, little-endian UInt32s (binary: a big snapshot has many chunks).
    public static let chunkFileName = "chunks.crc32c"
    /// Pages per checksum chunk (256 KiB): small enough to check on the first fault in it.
    public static let defaultChunkPages = 64
    /// Feature names this build understands; a manifest naming another is refused.
    public static let knownFeatures: Set<String> = ["sparse-zero-pages", "chunk-crc32c", "page-digest-crc32c-xor"]

    public struct VcpuState: Codable, Sendable, Equatable {
        public var id: Int
        /// The vCPU's state blob (registers, special registers, ...), as the VM saves it.
        public var state: [UInt8]
        public init(id: Int, state: [UInt8]) { self.id = id; self.state = state }
    }

    public var format: String
    public var version: Int
    public var features: [String]
    public var vcpuCount: Int
    /// "protected" or "long" (``GuestMode``).
    public var guestMode: String
    public var lowSize: UInt64
    public var ramBase: UInt64
    public var ramSize: UInt64
    public var pageSize: UInt64
    public var memoryFile: String
    public var memorySize: UInt64
    public var chunkPages: Int
    /// Chunks in the memory file, and the CRC32C of the chunk file that holds their checksums.
    public var chunkFileCount: Int
    public var chunkFileChecksum: UInt32
    /// One CRC32C per chunk of `chunkPages` pages, holes read as zeros: read from the chunk
    /// file (``chunkFileName``), not from the manifest's JSON.
    public var chunkChecksums: [UInt32]
    /// The page digest of all of memory (``MemoryDigest``: per-page CRC32C mixed with the index).
    public var memoryDigest: UInt64
    /// Pages that hold data (the others are holes: zero pages).
    public var dataPages: Int
    public var vcpus: [VcpuState]
    /// What the guest was running (informational: e.g. "selfcheck").
    public var workload: String

    public init(vcpuCount: Int, guestMode: String, lowSize: UInt64, ramBase: UInt64, ramSize: UInt64,
                chunkPages: Int = SnapshotManifest.defaultChunkPages, chunkChecksums: [UInt32], memoryDigest: UInt64,
                dataPages: Int, vcpus: [VcpuState], workload: String) {
        format = Self.formatName
        version = Self.currentVersion
        features = Self.knownFeatures.sorted()
        self.vcpuCount = vcpuCount
        self.guestMode = guestMode
        self.lowSize = lowSize
        self.ramBase = ramBase
        self.ramSize = ramSize
        pageSize = 4096
        memoryFile = Self.memoryFileName
        memorySize = lowSize + ramSize
        self.chunkPages = chunkPages
        self.chunkChecksums = chunkChecksums
        chunkFileCount = chunkChecksums.count
        chunkFileChecksum = Self.checksum(ofChunkFile: Self.chunkFileBytes(chunkChecksums))
        self.memoryDigest = memoryDigest
        self.dataPages = dataPages
        self.vcpus = vcpus
        self.workload = workload
    }

    enum CodingKeys: String, CodingKey {
        case format, version, features, vcpuCount = "vcpu_count", guestMode = "guest_mode", lowSize = "low_size"
        case ramBase = "ram_base", ramSize = "ram_size", pageSize = "page_size", memoryFile = "memory_file"
        case memorySize = "memory_size", chunkPages = "chunk_pages", chunkFileCount = "chunk_count"
        case chunkFileChecksum = "chunk_file_crc32c"
        case memoryDigest = "memory_digest", dataPages = "data_pages", vcpus, workload
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        format = try c.decode(String.self, forKey: .format)
        version = try c.decode(Int.self, forKey: .version)
        features = try c.decode([String].self, forKey: .features)
        vcpuCount = try c.decode(Int.self, forKey: .vcpuCount)
        guestMode = try c.decode(String.self, forKey: .guestMode)
        lowSize = try c.decode(UInt64.self, forKey: .lowSize)
        ramBase = try c.decode(UInt64.self, forKey: .ramBase)
        ramSize = try c.decode(UInt64.self, forKey: .ramSize)
        pageSize = try c.decode(UInt64.self, forKey: .pageSize)
        memoryFile = try c.decode(String.self, forKey: .memoryFile)
        memorySize = try c.decode(UInt64.self, forKey: .memorySize)
        chunkPages = try c.decode(Int.self, forKey: .chunkPages)
        chunkFileCount = try c.decode(Int.self, forKey: .chunkFileCount)
        chunkFileChecksum = try c.decode(UInt32.self, forKey: .chunkFileChecksum)
        memoryDigest = try c.decode(UInt64.self, forKey: .memoryDigest)
        dataPages = try c.decode(Int.self, forKey: .dataPages)
        vcpus = try c.decode([VcpuState].self, forKey: .vcpus)
        workload = try c.decode(String.self, forKey: .workload)
        chunkChecksums = []
    }

    /// The chunk file's bytes for `checksums`.
    public static func chunkFileBytes(_ checksums: [UInt32]) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(checksums.count * 4)
        for c in checksums { withUnsafeBytes(of: c.littleEndian) { bytes.append(contentsOf: $0) } }
        return bytes
    }

    public static func checksum(ofChunkFile bytes: [UInt8]) -> UInt32 { bytes.withUnsafeBytes { CRC32C.checksum($0) } }

    /// Takes the chunk checksums from the chunk file's bytes, checking them against the manifest.
    public mutating func loadChunkFile(_ bytes: [UInt8]) throws(SnapshotError) {
        guard bytes.count == chunkFileCount * 4 else {
            throw .truncated(expected: UInt64(chunkFileCount * 4), found: UInt64(bytes.count))
        }
        let crc = Self.checksum(ofChunkFile: bytes)
        guard crc == chunkFileChecksum else {
            throw .invalidManifest("the chunk file's CRC32C is \(String(crc, radix: 16)), the manifest says \(String(chunkFileChecksum, radix: 16))")
        }
        var checksums = [UInt32](repeating: 0, count: chunkFileCount)
        bytes.withUnsafeBytes { raw in
            for i in 0..<checksums.count { checksums[i] = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)) }
        }
        chunkChecksums = checksums
    }

    public var totalPages: Int { Int(memorySize / pageSize) }
    public var chunkCount: Int { (totalPages + chunkPages - 1) / max(chunkPages, 1) }
    /// The pages of chunk `i`.
    public func pages(ofChunk i: Int) -> Range<Int> { i * chunkPages..<min((i + 1) * chunkPages, totalPages) }
    @inlinable public func chunk(of page: Int) -> Int { page / chunkPages }

    /// Checks everything the manifest says about itself, before any memory is read: the
    /// format and version, the features, the layout's arithmetic, the vCPU list, the chunk
    /// table. The error says what is wrong.
    public func validate() throws(SnapshotError) {
        guard format == Self.formatName else {
            throw .foreign("the manifest's format is '\(format)', not '\(Self.formatName)'")
        }
        guard version == Self.currentVersion else {
            throw .unsupportedVersion(found: version, supported: Self.currentVersion)
        }
        let unknown = Set(features).subtracting(Self.knownFeatures)
        guard unknown.isEmpty else { throw .unsupportedFeatures(unknown.sorted()) }
        guard pageSize == 4096 else { throw .invalidManifest("page size \(pageSize) (only 4096 is written or read)") }
        guard vcpuCount >= 1, vcpuCount <= DemandPagingConfig.maxVcpus else {
            throw .invalidManifest("vcpu_count \(vcpuCount) (1...\(DemandPagingConfig.maxVcpus))")
        }
        guard GuestMode(rawValue: guestMode) != nil else { throw .invalidManifest("unknown guest mode '\(guestMode)'") }
        guard lowSize > 0, lowSize % pageSize == 0, ramSize > 0, ramSize % pageSize == 0,
              memorySize == lowSize &+ ramSize, memorySize >= lowSize else {
            throw .invalidManifest("memory sizes do not add up (low \(lowSize) + RAM \(ramSize) != \(memorySize))")
        }
        guard memoryFile == Self.memoryFileName else {
            throw .invalidManifest("memory file '\(memoryFile)' (expected '\(Self.memoryFileName)' inside the snapshot folder)")
        }
        guard chunkPages >= 1, chunkPages <= 1 << 16 else { throw .invalidManifest("chunk_pages \(chunkPages)") }
        guard chunkFileCount == chunkCount else {
            throw .invalidManifest("\(chunkFileCount) chunk checksums for \(chunkCount) chunks")
        }
        guard dataPages >= 0, dataPages <= totalPages else { throw .invalidManifest("data_pages \(dataPages) of \(totalPages)") }
        guard vcpus.map(\.id) == Array(0..<vcpuCount), vcpus.allSatisfy({ !$0.state.isEmpty }) else {
            throw .invalidManifest("the vCPU states are not exactly vCPUs 0..<\(vcpuCount), each with a state")
        }
    }
}

/// Why a snapshot was refused. Every case says what was found.
public enum SnapshotError: Error, Equatable, CustomStringConvertible {
    case missing(String)
    case foreign(String)
    case unsupportedVersion(found: Int, supported: Int)
    case unsupportedFeatures([String])
    case invalidManifest(String)
    case truncated(expected: UInt64, found: UInt64)
    case corruptChunk(index: Int, pages: Range<Int>, expected: UInt32, found: UInt32)
    case digestMismatch(expected: UInt64, found: UInt64)

    public var description: String {
        switch self {
        case .missing(let what): "not a snapshot: \(what)"
        case .foreign(let why): "not a Faultline snapshot: \(why)"
        case .unsupportedVersion(let found, let supported):
            "snapshot version \(found) is not supported (this build reads version \(supported))"
        case .unsupportedFeatures(let names): "snapshot needs features this build does not have: \(names.joined(separator: ", "))"
        case .invalidManifest(let why): "invalid snapshot manifest: \(why)"
        case .truncated(let expected, let found): "snapshot memory file is \(found) bytes, the manifest says \(expected): truncated or replaced"
        case .corruptChunk(let index, let pages, let expected, let found):
            "snapshot memory is corrupt: chunk \(index) (pages \(pages.lowerBound)..<\(pages.upperBound)) has CRC32C "
                + String(found, radix: 16) + ", the manifest says " + String(expected, radix: 16)
        case .digestMismatch(let expected, let found):
            "snapshot memory digest is \(String(found, radix: 16)), the manifest says \(String(expected, radix: 16))"
        }
    }
}
