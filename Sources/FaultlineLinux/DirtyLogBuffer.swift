/// The bitmap KVM_GET_DIRTY_LOG fills: one bit per page of a memslot, in 64-bit words,
/// owned (allocated once, freed in deinit). Read it with `bits` after
/// `VirtualMachine.getDirtyLog(slot:into:)`.
public final class DirtyLogBuffer: @unchecked Sendable {
    /// Pages of the slot the bitmap covers.
    public let pages: Int
    private let words: UnsafeMutablePointer<UInt64>
    private let wordCount: Int

    public init(pages: Int) {
        self.pages = pages
        wordCount = max((pages + 63) / 64, 1)
        words = .allocate(capacity: wordCount)
        words.initialize(repeating: 0, count: wordCount)
    }

    deinit { words.deallocate() }

    /// The bitmap as the kernel wrote it (bit i = page i of the slot).
    public var bits: UnsafeRawPointer { UnsafeRawPointer(words) }

    /// Whether page `index` of the slot was dirty in the last fetch.
    public func contains(_ index: Int) -> Bool {
        precondition(index >= 0 && index < pages, "page \(index) outside a \(pages)-page dirty log")
        return words[index / 64] & (1 << UInt64(index % 64)) != 0
    }

    func clear() { words.update(repeating: 0, count: wordCount) }
    var mutableBits: UnsafeMutableRawPointer { UnsafeMutableRawPointer(words) }
}

extension VirtualMachine {
    /// KVM_GET_DIRTY_LOG into an owned buffer (cleared first); resets the log unless manual
    /// protect is enabled.
    public func getDirtyLog(slot: UInt32, into buffer: DirtyLogBuffer) throws(SystemError) {
        buffer.clear()
        try getDirtyLog(slot: slot, into: buffer.mutableBits)
    }
}
