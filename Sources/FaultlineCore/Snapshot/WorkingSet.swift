/// The pages a restored guest touched, in the order it first touched them, recorded for one
/// snapshot (``snapshotDigest``) and replayed by later restores of it: their background
/// stream sends these pages first, in this order.
public struct WorkingSet: Codable, Sendable, Equatable {
    public static let formatName = "faultline-working-set"
    public static let currentVersion = 1

    public var format: String
    public var version: Int
    /// The memory digest of the snapshot it was recorded from (``SnapshotManifest/memoryDigest``).
    public var snapshotDigest: UInt64
    /// Page indices (low memory first, then RAM), first touched first.
    public var pages: [Int]

    public init(snapshotDigest: UInt64, pages: [Int]) {
        format = Self.formatName
        version = Self.currentVersion
        self.snapshotDigest = snapshotDigest
        self.pages = pages
    }

    enum CodingKeys: String, CodingKey {
        case format, version, snapshotDigest = "snapshot_digest", pages
    }

    /// Checks it belongs to `manifest`'s snapshot and names only its pages, each once.
    public func validate(for manifest: SnapshotManifest) throws(SnapshotError) {
        guard format == Self.formatName else { throw .foreign("the working set's format is '\(format)', not '\(Self.formatName)'") }
        guard version == Self.currentVersion else { throw .unsupportedVersion(found: version, supported: Self.currentVersion) }
        guard snapshotDigest == manifest.memoryDigest else {
            throw .invalidManifest("the working set was recorded from another snapshot (digest \(String(snapshotDigest, radix: 16)), "
                                   + "this one is \(String(manifest.memoryDigest, radix: 16)))")
        }
        guard pages.allSatisfy({ $0 >= 0 && $0 < manifest.totalPages }), Set(pages).count == pages.count else {
            throw .invalidManifest("the working set names pages outside the snapshot's \(manifest.totalPages), or a page twice")
        }
    }
}
