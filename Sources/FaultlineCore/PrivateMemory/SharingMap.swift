/// Whether guest memory is shared (backed by the userspace mapping, which the VMM can read)
/// or private (backed by guest_memfd, which it cannot on Linux 6.12): KVM's
/// KVM_MEMORY_ATTRIBUTE_PRIVATE, per page.
public enum MemorySharing: Sendable, Equatable, Hashable, CustomStringConvertible {
    case shared
    case `private`

    /// The other state: the backing that becomes stale when memory converts to `self`.
    public var other: MemorySharing { self == .shared ? .private : .shared }

    public var description: String { self == .shared ? "shared" : "private" }
}

/// Why a conversion was refused before it reached the kernel.
public enum ConversionError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Zero bytes (or zero pages) asked for.
    case empty(gpa: UInt64)
    /// The start or the size is not a multiple of the page size.
    case unaligned(gpa: UInt64, size: UInt64)
    /// gpa + size wraps around the address space.
    case overflow(gpa: UInt64, size: UInt64)
    /// Part of the range lies outside the private-capable memory.
    case outsideMemory(gpa: UInt64, size: UInt64, memory: GuestMemoryRange)
    /// KVM_HC_MAP_GPA_RANGE attribute bits Faultline does not know.
    case unknownAttributes(UInt64)

    public var description: String {
        switch self {
        case .empty(let gpa): "conversion at gpa \(hexString(gpa)): empty range (size 0)"
        case .unaligned(let gpa, let size):
            "conversion of gpa \(hexString(gpa)) size \(hexString(size)): not page aligned (start and size must be multiples of 4096)"
        case .overflow(let gpa, let size): "conversion of gpa \(hexString(gpa)) size \(hexString(size)): the range wraps around the address space"
        case .outsideMemory(let gpa, let size, let memory):
            "conversion of gpa \(hexString(gpa)) size \(hexString(size)): outside guest memory (private-capable memory is \(memory))"
        case .unknownAttributes(let bits):
            "KVM_HC_MAP_GPA_RANGE attributes \(hexString(bits)): unknown bits (known: page size 0-2 in bits 0-3, encrypted bit 4)"
        }
    }
}

func hexString(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// The shared/private state of one private-capable memory region, as ranges of pages
/// (conversions come in ranges, so track ranges, not a bit per page).
/// This is what Faultline believes KVM's memory attributes are; the engine keeps the two
/// in step (every KVM_SET_MEMORY_ATTRIBUTES that succeeds is applied here) and the rig
/// tests compare them by reading the kernel's view back through the guest.
public struct SharingMap: Sendable, Equatable {
    public static let pageSize: UInt64 = 4096
    /// The region, page aligned.
    public let memory: GuestMemoryRange
    /// Page offsets within `memory` -> state; always covers every page.
    public private(set) var pages: RangeMap<MemorySharing>

    public var pageCount: UInt64 { memory.size / Self.pageSize }

    public init(memory: GuestMemoryRange, initial: MemorySharing) throws(ConversionError) {
        guard memory.start.isAligned(to: Self.pageSize), memory.size % Self.pageSize == 0 else {
            throw .unaligned(gpa: memory.start.rawValue, size: memory.size)
        }
        self.memory = memory
        var map = RangeMap<MemorySharing>()
        map.set(0..<(memory.size / Self.pageSize), to: initial)
        pages = map
    }

    /// The page offsets (within `memory`) of `size` bytes at `gpa`, or why that range cannot
    /// be converted.
    public func pageRange(gpa: UInt64, size: UInt64) throws(ConversionError) -> Range<UInt64> {
        guard size > 0 else { throw .empty(gpa: gpa) }
        guard gpa % Self.pageSize == 0, size % Self.pageSize == 0 else { throw .unaligned(gpa: gpa, size: size) }
        let (end, overflow) = gpa.addingReportingOverflow(size)
        guard !overflow else { throw .overflow(gpa: gpa, size: size) }
        guard gpa >= memory.start.rawValue, end <= memory.end.rawValue else {
            throw .outsideMemory(gpa: gpa, size: size, memory: memory)
        }
        let first = (gpa - memory.start.rawValue) / Self.pageSize
        return first..<(first + size / Self.pageSize)
    }

    /// The state of the page at offset `page`.
    public func state(ofPage page: UInt64) -> MemorySharing? { pages.value(at: page) }

    /// The state of the page holding `gpa`, or nil outside `memory`.
    public func state(at gpa: UInt64) -> MemorySharing? {
        guard memory.contains(GuestPhysicalAddress(gpa)) else { return nil }
        return pages.value(at: (gpa - memory.start.rawValue) / Self.pageSize)
    }

    /// The parts of `range` (page offsets) whose state is not `target` - what a conversion
    /// to `target` would actually change, in order, coalesced.
    public func changes(in range: Range<UInt64>, to target: MemorySharing) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for e in pages.entries where e.value != target {
            let lo = max(e.range.lowerBound, range.lowerBound), hi = min(e.range.upperBound, range.upperBound)
            if lo < hi { out.append(lo..<hi) }
        }
        return out
    }

    /// Records a conversion of `size` bytes at `gpa` to `target` (after the kernel accepted
    /// it) and returns the page ranges that changed state.
    @discardableResult
    public mutating func convert(gpa: UInt64, size: UInt64, to target: MemorySharing) throws(ConversionError) -> [Range<UInt64>] {
        let range = try pageRange(gpa: gpa, size: size)
        let changed = changes(in: range, to: target)
        if !changed.isEmpty { pages.set(range, to: target) }
        return changed
    }

    /// Pages in each state.
    public func count(_ state: MemorySharing) -> UInt64 { pages.coverage(of: state) }

    /// The guest physical range of page offsets `pages`.
    public func gpaRange(of pages: Range<UInt64>) -> (gpa: UInt64, size: UInt64) {
        (memory.start.rawValue + pages.lowerBound * Self.pageSize, UInt64(pages.count) * Self.pageSize)
    }
}
