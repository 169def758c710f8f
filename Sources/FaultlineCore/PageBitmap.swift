import Atomics

/// One bit per guest page, safe to read and update from any thread (vCPU threads,
/// uffd readers, the background receiver) without locks.
///
/// Words are 64-bit, bit `i % 64` of word `i / 64` is page `i` - the layout of every kernel
/// bitmap (dirty log, KVM Userfault's userfault_bitmap), so `words` can be handed to the
/// kernel as is. The API is always "set = page present"; how the bits are *stored* is
/// ``Polarity``: `.setMeansPresent` (plain), or `.setMeansMissing`, the polarity of KVM
/// Userfault's `userfault_bitmap` (a set bit makes a vCPU touching the page exit). A
/// `.setMeansMissing` bitmap is the userfault bitmap itself: `insert` (page present) clears
/// the kernel's bit with a store-release, after the page was installed.
public final class PageBitmap: @unchecked Sendable {
    /// How a page's state is stored in `words`.
    public enum Polarity: Sendable {
        /// A stored 1 means present (starts all missing = all 0).
        case setMeansPresent
        /// A stored 1 means missing (KVM Userfault's userfault_bitmap; starts all 1 for the
        /// `count` pages, 0 past them).
        case setMeansMissing
    }

    public let count: Int
    public let wordCount: Int
    public let polarity: Polarity
    @usableFromInline let storage: UnsafeMutablePointer<UInt64.AtomicRepresentation>
    /// XORed into a stored word to get the logical (set = present) word.
    @usableFromInline let flip: UInt64

    public init(count: Int, polarity: Polarity = .setMeansPresent) {
        precondition(count >= 0, "bitmap size must not be negative")
        self.count = count
        self.wordCount = (count + 63) / 64
        self.polarity = polarity
        flip = polarity == .setMeansMissing ? ~0 : 0
        storage = .allocate(capacity: max(wordCount, 1))
        storage.initialize(repeating: UInt64.AtomicRepresentation(0), count: max(wordCount, 1))
        if polarity == .setMeansMissing {
            for w in 0..<wordCount { word(w).store(Self.validMask(word: w, count: count), ordering: .relaxed) }
        }
    }

    /// The bits of word `w` that are pages (all but the tail of the last word).
    @inlinable static func validMask(word w: Int, count: Int) -> UInt64 {
        let bits = count - w * 64
        return bits >= 64 ? ~0 : (bits <= 0 ? 0 : (1 << UInt64(bits)) - 1)
    }

    /// Word `w` as "set = present", bits past `count` clear.
    @inlinable func logicalWord(_ w: Int) -> UInt64 {
        (word(w).load(ordering: .relaxed) ^ flip) & Self.validMask(word: w, count: count)
    }

    deinit { storage.deallocate() }

    @inlinable func word(_ index: Int) -> UnsafeAtomic<UInt64> {
        UnsafeAtomic(at: storage + index)
    }

    /// The raw words (for the kernel, or for serialising). Valid while the bitmap lives.
    public var words: UnsafeMutableRawPointer { UnsafeMutableRawPointer(storage) }

    @inlinable public func contains(_ page: Int) -> Bool {
        precondition(page >= 0 && page < count, "page \(page) outside bitmap of \(count)")
        return (word(page >> 6).load(ordering: .acquiring) ^ flip) & (1 << UInt64(page & 63)) != 0
    }

    /// Sets the bit; returns true if this call set it (false if it was already set).
    /// With `.setMeansMissing` this clears the stored bit (a release: everything written to
    /// the page before is visible to whoever sees the bit clear, the kernel included).
    @discardableResult
    @inlinable public func insert(_ page: Int) -> Bool {
        precondition(page >= 0 && page < count, "page \(page) outside bitmap of \(count)")
        let mask: UInt64 = 1 << UInt64(page & 63)
        if flip != 0 {
            return word(page >> 6).loadThenBitwiseAnd(with: ~mask, ordering: .acquiringAndReleasing) & mask != 0
        }
        let old = word(page >> 6).loadThenBitwiseOr(with: mask, ordering: .acquiringAndReleasing)
        return old & mask == 0
    }

    /// Clears the bit; returns true if it was set.
    @discardableResult
    public func remove(_ page: Int) -> Bool {
        precondition(page >= 0 && page < count, "page \(page) outside bitmap of \(count)")
        let mask: UInt64 = 1 << UInt64(page & 63)
        if flip != 0 {
            return word(page >> 6).loadThenBitwiseOr(with: mask, ordering: .acquiringAndReleasing) & mask == 0
        }
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
        for w in 0..<wordCount { n += logicalWord(w).nonzeroBitCount }
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
            let w = ~logicalWord(page >> 6) >> UInt64(page & 63)
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
        for w in 0..<wordCount {
            word(w).store((other.logicalWord(w) ^ flip) & Self.validMask(word: w, count: count), ordering: .relaxed)
        }
    }

    /// Calls `body` with each maximal run of clear bits (pages still missing).
    public func forEachClearRange(_ body: (Range<Int>) throws -> Void) rethrows {
        var page = 0
        while let start = scanClear(from: page, to: count) {
            var end = start + 1
            // Whole clear words at a time, then bit by bit.
            while end < count && end % 64 == 0 && end + 64 <= count && logicalWord(end / 64) == 0 { end += 64 }
            while end < count && !contains(end) {
                end += 1
                while end % 64 == 0 && end + 64 <= count && logicalWord(end / 64) == 0 { end += 64 }
            }
            try body(start..<end)
            page = end
        }
    }

    /// Calls `body` with every set bit, in ascending order.
    public func forEachSetPage(_ body: (Int) throws -> Void) rethrows {
        for w in 0..<wordCount {
            var v = logicalWord(w)
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
