/// When the backing a conversion made stale is given back to the kernel.
///
/// A page has two backings: the shared one (the userspace mapping) and the private one
/// (guest_memfd). After a conversion the old one holds memory nobody can use until the page
/// converts back. Giving it back means fallocate(PUNCH_HOLE) on guest_memfd after
/// private->shared, madvise(MADV_DONTNEED, or MADV_REMOVE for shmem) on the mapping after
/// shared->private.
public enum DiscardPolicy: Equatable, Sendable, CustomStringConvertible {
    /// Discard the stale backing at every conversion (what QEMU does).
    case eager
    /// Defer discards in a range map and flush them, coalesced, once `batchPages` pages are
    /// pending (and at the end, or when asked). A page converted back before the flush
    /// cancels its pending discard: nothing to free, nothing to re-allocate - the
    /// "batched/lazy-discard" the OVMF bounce-buffer pattern needs.
    case lazy(batchPages: UInt64)

    public static let defaultBatchPages: UInt64 = 512

    public var description: String {
        switch self {
        case .eager: "eager"
        case .lazy(let n): "lazy (batch \(n) pages)"
        }
    }

    public var name: String { self == .eager ? "eager" : "lazy" }
}

/// One discard: give back the `backing` of page offsets `pages` (the backing that is stale
/// because the pages are in the other state).
public struct DiscardOperation: Equatable, Sendable, CustomStringConvertible {
    public var pages: Range<UInt64>
    public var backing: MemorySharing
    public init(pages: Range<UInt64>, backing: MemorySharing) {
        self.pages = pages
        self.backing = backing
    }
    public var description: String { "discard \(backing) backing of pages \(pages.lowerBound)..<\(pages.upperBound)" }
}

/// Decides which discards to perform and when, under a ``DiscardPolicy``. Pure: the engine
/// performs the operations it returns.
public struct DiscardPlanner: Sendable {
    public let policy: DiscardPolicy
    /// Page offset -> the backing whose discard is pending (lazy only).
    public private(set) var pending = RangeMap<MemorySharing>()
    /// Pages whose pending discard a conversion back cancelled (their old contents are still
    /// there, and nothing had to be freed or allocated).
    public private(set) var cancelledPages: UInt64 = 0

    public init(policy: DiscardPolicy) { self.policy = policy }

    public var pendingPages: UInt64 { pending.coverage(of: .shared) + pending.coverage(of: .private) }

    /// `changed` (page ranges) just converted to `target`: the discards to do now.
    public mutating func converted(_ changed: [Range<UInt64>], to target: MemorySharing) -> [DiscardOperation] {
        let stale = target.other
        switch policy {
        case .eager:
            return changed.map { DiscardOperation(pages: $0, backing: stale) }
        case .lazy(let batch):
            for range in changed {
                // A pending discard of `target`'s backing here is cancelled: that backing is live again.
                for e in pending.entries where e.value == target {
                    let lo = max(e.range.lowerBound, range.lowerBound), hi = min(e.range.upperBound, range.upperBound)
                    if lo < hi { cancelledPages += hi - lo }
                }
                pending.set(range, to: stale)
            }
            return pendingPages >= batch ? flush() : []
        }
    }

    /// Every pending discard, coalesced (adjacent pages with the same stale backing are one
    /// operation); nothing is pending afterwards.
    public mutating func flush() -> [DiscardOperation] {
        let ops = pending.entries.map { DiscardOperation(pages: $0.range, backing: $0.value) }
        pending = RangeMap()
        return ops
    }
}
