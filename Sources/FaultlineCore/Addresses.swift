/// Checked newtypes for the three address spaces Faultline juggles: guest physical
/// addresses, host virtual addresses and page indices. Arithmetic that can overflow
/// returns nil instead of trapping, so a bad GPA from the wire becomes an error, not a crash.

/// A guest physical address.
public struct GuestPhysicalAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ value: UInt64) { self.rawValue = value }

    /// `self + offset`, or nil on overflow.
    @inlinable public func adding(_ offset: UInt64) -> GuestPhysicalAddress? {
        let (sum, overflow) = rawValue.addingReportingOverflow(offset)
        return overflow ? nil : GuestPhysicalAddress(sum)
    }
    @inlinable public func alignedDown(to alignment: UInt64) -> GuestPhysicalAddress {
        GuestPhysicalAddress(rawValue & ~(alignment - 1))
    }
    @inlinable public func isAligned(to alignment: UInt64) -> Bool { rawValue & (alignment - 1) == 0 }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// A host virtual address (where guest memory is mapped in this process).
public struct HostAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ pointer: UnsafeRawPointer) { self.rawValue = UInt64(UInt(bitPattern: pointer)) }
    @inlinable public init(_ pointer: UnsafeMutableRawPointer) { self.rawValue = UInt64(UInt(bitPattern: pointer)) }
    @inlinable public func adding(_ offset: UInt64) -> HostAddress? {
        let (sum, overflow) = rawValue.addingReportingOverflow(offset)
        return overflow ? nil : HostAddress(rawValue: sum)
    }
    @inlinable public var pointer: UnsafeMutableRawPointer? { UnsafeMutableRawPointer(bitPattern: UInt(rawValue)) }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// The index of a page within a guest memory layout (0 = the first page of the first region).
public struct PageIndex: RawRepresentable, Hashable, Comparable, Strideable, Sendable, CustomStringConvertible {
    public var rawValue: Int
    @inlinable public init(rawValue: Int) { self.rawValue = rawValue }
    @inlinable public init(_ value: Int) { self.rawValue = value }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    @inlinable public func distance(to other: PageIndex) -> Int { other.rawValue - rawValue }
    @inlinable public func advanced(by n: Int) -> PageIndex { PageIndex(rawValue + n) }
    public var description: String { "page \(rawValue)" }
}

/// A contiguous range of guest physical memory.
public struct GuestMemoryRange: Hashable, Sendable, CustomStringConvertible {
    public let start: GuestPhysicalAddress
    public let size: UInt64

    /// Fails when the range would wrap around the 64-bit address space or is empty.
    public init?(start: GuestPhysicalAddress, size: UInt64) {
        guard size > 0, start.adding(size) != nil else { return nil }
        self.start = start
        self.size = size
    }
    @inlinable public var end: GuestPhysicalAddress { GuestPhysicalAddress(start.rawValue &+ size) }
    @inlinable public func contains(_ address: GuestPhysicalAddress) -> Bool {
        address.rawValue >= start.rawValue && address.rawValue - start.rawValue < size
    }
    public func overlaps(_ other: GuestMemoryRange) -> Bool {
        start < other.end && other.start < end
    }
    public var description: String { "[\(start), \(end))" }
}

/// The guest memory layout: page size and the RAM regions, in page-index order.
/// Translates between guest physical addresses and page indices.
public struct GuestMemoryLayout: Hashable, Sendable {
    public let pageSize: UInt64
    public let regions: [GuestMemoryRange]
    /// First page index of each region.
    public let firstPage: [Int]
    public let pageCount: Int

    public enum LayoutError: Error, CustomStringConvertible, Equatable {
        case badPageSize(UInt64)
        case unaligned(GuestMemoryRange)
        case overlapping(GuestMemoryRange, GuestMemoryRange)
        case empty
        public var description: String {
            switch self {
            case .badPageSize(let s): return "page size \(s) is not a power of two >= 4096"
            case .unaligned(let r): return "memory region \(r) is not page aligned"
            case .overlapping(let a, let b): return "memory regions \(a) and \(b) overlap"
            case .empty: return "the memory layout has no regions"
            }
        }
    }

    public init(pageSize: UInt64 = 4096, regions: [GuestMemoryRange]) throws {
        guard pageSize >= 4096, pageSize.nonzeroBitCount == 1 else { throw LayoutError.badPageSize(pageSize) }
        guard !regions.isEmpty else { throw LayoutError.empty }
        for r in regions where !r.start.isAligned(to: pageSize) || r.size % pageSize != 0 {
            throw LayoutError.unaligned(r)
        }
        for i in regions.indices {
            for j in regions.indices where j > i && regions[i].overlaps(regions[j]) {
                throw LayoutError.overlapping(regions[i], regions[j])
            }
        }
        self.pageSize = pageSize
        self.regions = regions
        var first: [Int] = []
        var count = 0
        for r in regions {
            first.append(count)
            count += Int(r.size / pageSize)
        }
        self.firstPage = first
        self.pageCount = count
    }

    public var totalBytes: UInt64 { UInt64(pageCount) * pageSize }

    /// The page holding `address`, or nil when it is not guest RAM.
    @inlinable public func page(containing address: GuestPhysicalAddress) -> PageIndex? {
        for i in regions.indices where regions[i].contains(address) {
            return PageIndex(firstPage[i] + Int((address.rawValue - regions[i].start.rawValue) / pageSize))
        }
        return nil
    }

    /// The guest physical address of the first byte of `page`, or nil when out of range.
    public func address(of page: PageIndex) -> GuestPhysicalAddress? {
        guard page.rawValue >= 0, page.rawValue < pageCount else { return nil }
        var i = regions.count - 1
        while firstPage[i] > page.rawValue { i -= 1 }
        return GuestPhysicalAddress(regions[i].start.rawValue + UInt64(page.rawValue - firstPage[i]) * pageSize)
    }
}
