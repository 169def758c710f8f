/// The guest memory a snapshot page server fills: regions of another process's memory, each
/// backed by a range of the snapshot's memory file. Built only through `validate`, so every
/// layout in hand is sound: supported page sizes, aligned, no overlaps, inside the file.

/// One region as the peer describes it, before any check (every field optional: a message
/// may lack any of them).
public struct SnapshotRegionFields: Equatable, Sendable {
    public var base: UInt64?
    public var size: UInt64?
    public var offset: UInt64?
    /// `page_size`, in bytes.
    public var pageSize: UInt64?
    /// The deprecated `page_size_kib`, which Firecracker fills with the page size in bytes
    /// despite its name.
    public var pageSizeKib: UInt64?

    public init(base: UInt64?, size: UInt64?, offset: UInt64?, pageSize: UInt64?, pageSizeKib: UInt64? = nil) {
        self.base = base
        self.size = size
        self.offset = offset
        self.pageSize = pageSize
        self.pageSizeKib = pageSizeKib
    }
}

/// A checked region: `size` bytes at host address `base` in the peer, whose contents are the
/// memory file's bytes from `offset`, served in pages of `pageSize`.
public struct SnapshotRegion: Equatable, Sendable {
    public let base: UInt64
    public let size: UInt64
    public let offset: UInt64
    public let pageSize: UInt64
    /// The layout-wide index of this region's first page.
    public let firstPage: UInt64

    public var end: UInt64 { base + size }
    public var pages: UInt64 { size / pageSize }
}

/// Why a region list cannot be served. `index` is the region's position in the message.
public enum SnapshotLayoutError: Error, Equatable, CustomStringConvertible {
    case noRegions
    case tooManyRegions(Int)
    case missingField(index: Int, field: String)
    case conflictingPageSizes(index: Int, pageSize: UInt64, pageSizeKib: UInt64)
    case unsupportedPageSize(index: Int, UInt64)
    case emptyRegion(index: Int)
    case misaligned(index: Int, field: String, value: UInt64, alignment: UInt64)
    case addressOverflow(index: Int)
    case overlap(Int, Int)
    case startsPastEndOfFile(index: Int, offset: UInt64, fileSize: UInt64)
    case endsPastEndOfFile(index: Int, end: UInt64, fileSize: UInt64)

    public var description: String {
        switch self {
        case .noRegions: return "the message lists no regions"
        case .tooManyRegions(let n): return "the message lists \(n) regions (at most \(SnapshotLayout.maxRegions))"
        case .missingField(let i, let f): return "region \(i) has no \"\(f)\""
        case .conflictingPageSizes(let i, let p, let k):
            return "region \(i): page_size \(p) and page_size_kib \(k) disagree (both carry bytes)"
        case .unsupportedPageSize(let i, let p):
            let hint = p == 4 || p == 2048 ? " (the page size is in bytes: 4096 or 2097152, even in page_size_kib)" : ""
            return "region \(i): page size \(p) is neither 4096 nor 2097152\(hint)"
        case .emptyRegion(let i): return "region \(i) has size 0"
        case .misaligned(let i, let f, let v, let a):
            return "region \(i): \(f) 0x\(String(v, radix: 16)) is not a multiple of \(a)"
        case .addressOverflow(let i): return "region \(i): base + size or offset + size overflows"
        case .overlap(let a, let b): return "regions \(a) and \(b) overlap in memory"
        case .startsPastEndOfFile(let i, let o, let s):
            return "region \(i) starts at file offset \(o), past the end of the memory file (\(s) bytes)"
        case .endsPastEndOfFile(let i, let e, let s):
            return "region \(i) ends at file offset \(e), past the end of the memory file (\(s) bytes): the file is \(e - s) bytes short"
        }
    }
}

/// A checked, address-ordered list of regions, and the page numbering across them.
public struct SnapshotLayout: Equatable, Sendable {
    public static let supportedPageSizes: [UInt64] = [4096, 2 << 20]
    public static let maxRegions = 4096

    /// Sorted by `base`.
    public let regions: [SnapshotRegion]
    /// Pages over all regions.
    public let totalPages: UInt64

    /// Checks `fields` against a memory file of `fileSize` bytes. File offsets need only be
    /// 4 KiB-aligned (the file is read through 4 KiB pages whatever the guest's page size).
    public static func validate(_ fields: [SnapshotRegionFields], fileSize: UInt64) throws(SnapshotLayoutError) -> SnapshotLayout {
        guard !fields.isEmpty else { throw .noRegions }
        guard fields.count <= maxRegions else { throw .tooManyRegions(fields.count) }
        var checked: [(index: Int, base: UInt64, size: UInt64, offset: UInt64, pageSize: UInt64)] = []
        for (i, f) in fields.enumerated() {
            guard let base = f.base else { throw .missingField(index: i, field: "base_host_virt_addr") }
            guard let size = f.size else { throw .missingField(index: i, field: "size") }
            guard let offset = f.offset else { throw .missingField(index: i, field: "offset") }
            let pageSize: UInt64
            switch (f.pageSize, f.pageSizeKib) {
            case (nil, nil): throw .missingField(index: i, field: "page_size")
            case (let p?, let k?) where p != k: throw .conflictingPageSizes(index: i, pageSize: p, pageSizeKib: k)
            case (let p?, _): pageSize = p
            case (nil, let k?): pageSize = k
            }
            guard supportedPageSizes.contains(pageSize) else { throw .unsupportedPageSize(index: i, pageSize) }
            guard size > 0 else { throw .emptyRegion(index: i) }
            guard base % pageSize == 0 else { throw .misaligned(index: i, field: "base_host_virt_addr", value: base, alignment: pageSize) }
            guard size % pageSize == 0 else { throw .misaligned(index: i, field: "size", value: size, alignment: pageSize) }
            guard offset % 4096 == 0 else { throw .misaligned(index: i, field: "offset", value: offset, alignment: 4096) }
            let (_, o1) = base.addingReportingOverflow(size)
            let (fileEnd, o2) = offset.addingReportingOverflow(size)
            guard !o1, !o2 else { throw .addressOverflow(index: i) }
            guard offset < fileSize else { throw .startsPastEndOfFile(index: i, offset: offset, fileSize: fileSize) }
            guard fileEnd <= fileSize else { throw .endsPastEndOfFile(index: i, end: fileEnd, fileSize: fileSize) }
            checked.append((i, base, size, offset, pageSize))
        }
        checked.sort { $0.base < $1.base }
        for k in checked.indices.dropFirst() where checked[k - 1].base + checked[k - 1].size > checked[k].base {
            throw .overlap(min(checked[k - 1].index, checked[k].index), max(checked[k - 1].index, checked[k].index))
        }
        var regions: [SnapshotRegion] = []
        var next: UInt64 = 0
        for c in checked {
            regions.append(SnapshotRegion(base: c.base, size: c.size, offset: c.offset, pageSize: c.pageSize, firstPage: next))
            next += c.size / c.pageSize
        }
        return SnapshotLayout(regions: regions, totalPages: next)
    }

    /// The region holding `address`, by binary search; nil outside every region.
    @inlinable
    public func regionIndex(containing address: UInt64) -> Int? {
        var low = 0, high = regions.count
        while low < high {
            let mid = (low + high) / 2
            if regions[mid].base <= address { low = mid + 1 } else { high = mid }
        }
        guard low > 0, address < regions[low - 1].end else { return nil }
        return low - 1
    }

    /// Calls `body` with the layout-wide indices of the whole pages inside [start, end), once
    /// per region the range touches (a range that covers part of a page leaves that page out).
    /// Allocates nothing.
    @inlinable
    public func forEachPageRange(in start: UInt64, _ end: UInt64, _ body: (Range<UInt64>) -> Void) {
        for r in regions {
            let s = max(start, r.base), e = min(end, r.end)
            guard s < e else { continue }
            let first = (s - r.base + r.pageSize - 1) / r.pageSize, last = (e - r.base) / r.pageSize
            if first < last { body((r.firstPage + first)..<(r.firstPage + last)) }
        }
    }
}
