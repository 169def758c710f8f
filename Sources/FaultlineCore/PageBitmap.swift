import Atomics

/// One bit per guest page, safe to read and update from any thread (vCPU threads,
/// uffd readers, the background receiver) without locks.
///
/// This is the "userfault bitmap" of the KVM Userfault proposal, inverted: a set bit
/// means the page is present. Words are 64-bit, bit `i % 64` of word `i / 64` is page
/// `i` - the layout of every kernel bitmap (dirty log, the proposed userfault_bitmap), so
/// `words` can be handed to the kernel as is.
public final class PageBitmap: @unchecked Sendable {
    public let count: Int
    public let wordCount: Int
    @usableFromInline let storage: UnsafeMutablePointer<UInt64.AtomicRepresentation>

    public init(count: Int) {
        precondition(count >= 0, "bitmap size must not be negative")
        self.count = count
        self.wordCount = (count + 63) / 64
        storage = .allocate(capacity: max(wordCount, 1))
        storage.initialize(repeating: UInt64.AtomicRepresentation(0), count: max(wordCount, 1))
    }

    deinit { storage.deallocate() }

    @inlinable func word(_ index: Int) -> UnsafeAtomic<UInt64> {
        UnsafeAtomic(at: storage + index)
    }

    /// The raw words (for the kernel, or for serialising). Valid while the bitmap lives.
    public var words: UnsafeMutableRawPointer { UnsafeMutableRawPointer(storage) }

    @inlinable public func contains(_ page: Int) -> Bool {
        precondition(page >= 0 && page < count, "page \(page) outside bitmap of \(count)")
        return word(page >> 6).load(ordering: .acquiring) & (1 << UInt64(page & 63)) != 0
    }

    /// Sets the bit; returns true if this call set it (false if it was already set).
    @discardableResult
    @inlinable public func insert(_ page: Int) -> Bool {
        precondition(page >= 0 && page < count, "page \(page) outside bitmap of \(count)")
        let mask: UInt64 = 1 << UInt64(page & 63)
        let old = word(page >> 6).loadThenBitwiseOr(with: mask, ordering: .acquiringAndReleasing)
        return old & mask == 0
    }

    /// Clears the bit; returns true if it was set.
    @discardableResult
    public func remove(_ page: Int) -> Bool {
        precondition(page >= 0 && page < count, "page \(page) outside bitmap of \(count)")
        let mask: UInt64 = 1 << UInt64(page & 63)
        let old = word(page >> 6).loadThenBitwiseAnd(with: ~mask, ordering: .acquiringAndReleasing)
        return old & mask != 0
    }

    /// Sets every bit in `range`.
    public func insert(_ range: Range<Int>) {
        for page in range { insert(page) }
    }

    /// Number of set bits (a scan: kept off the fault path, where a shared counter would
    /// bounce one cache line between every vCPU).
    public var populationCount: Int {
        var n = 0
        for w in 0..<wordCount { n += word(w).load(ordering: .relaxed).nonzeroBitCount }
        return n
    }
    public var isFull: Bool { populationCount == count }

    /// The first clear bit at or after `start`, wrapping around once; nil when full.
    public func firstClear(from start: Int = 0) -> Int? {
        guard count > 0 else { return nil }
        let s = min(max(start, 0), count - 1)
        if let hit = scanClear(from: s, to: count) { return hit }
        return scanClear(from: 0, to: s)
    }

    private func scanClear(from: Int, to: Int) -> Int? {
        var page = from
        while page < to {
            let w = ~word(page >> 6).load(ordering: .relaxed) >> UInt64(page & 63)
            if w != 0 {
                let hit = page + w.trailingZeroBitCount
                return hit < to ? hit : nil
            }
            page = (page | 63) + 1
        }
        return nil
    }

    /// A copy of the bits of `other` (of the same count), a word at a time.
    public func copyBits(from other: PageBitmap) {
        precondition(other.count == count, "bitmaps of \(other.count) and \(count) pages")
        for w in 0..<wordCount { word(w).store(other.word(w).load(ordering: .relaxed), ordering: .relaxed) }
    }

    /// Calls `body` with each maximal run of clear bits (pages still missing).
    public func forEachClearRange(_ body: (Range<Int>) throws -> Void) rethrows {
        var page = 0
        while let start = scanClear(from: page, to: count) {
            var end = start + 1
            // Whole clear words at a time, then bit by bit.
            while end < count && end % 64 == 0 && end + 64 <= count && word(end / 64).load(ordering: .relaxed) == 0 { end += 64 }
            while end < count && !contains(end) {
                end += 1
                while end % 64 == 0 && end + 64 <= count && word(end / 64).load(ordering: .relaxed) == 0 { end += 64 }
            }
            try body(start..<end)
            page = end
        }
    }

    /// Calls `body` with every set bit, in ascending order.
    public func forEachSetPage(_ body: (Int) throws -> Void) rethrows {
        for w in 0..<wordCount {
            var v = word(w).load(ordering: .relaxed)
            while v != 0 {
                let page = w * 64 + v.trailingZeroBitCount
                v &= v - 1
                if page < count { try body(page) }
            }
        }
    }

    /// Sets every bit that is set in a kernel-format bitmap of `pages` bits at `bits`,
    /// offset by `firstPage`. Returns how many were newly set.
    @discardableResult
    public func merge(kernelBitmap bits: UnsafeRawPointer, pages: Int, firstPage: Int) -> Int {
        var added = 0
        let words = (pages + 63) / 64
        for w in 0..<words {
            var v = bits.load(fromByteOffset: w * 8, as: UInt64.self)
            while v != 0 {
                let bit = v.trailingZeroBitCount
                v &= v - 1
                let page = w * 64 + bit
                if page < pages, insert(firstPage + page) { added += 1 }
            }
        }
        return added
    }
}
