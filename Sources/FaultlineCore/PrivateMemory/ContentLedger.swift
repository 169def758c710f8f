/// The host's exact expectation of what a page shows after a conversion: the value last
/// written into that backing, unless the backing was discarded since, then 0 (guest_memfd
/// and fresh anonymous/shmem pages read as zero). Fed with every discard the engine
/// performs and every value the guest reports writing, it tells for each observation
/// whether the contents survived the round trip, and catches any observation that is
/// neither (the guest seeing the other backing, or a discard that should not have happened).
public struct ContentLedger: Sendable {
    struct Key: Hashable { var page: UInt64; var backing: MemorySharing }
    private var discards: [Key: UInt32] = [:]
    private var written: [Key: (value: UInt32, generation: UInt32)] = [:]

    public init() {}

    /// A discard of `op.backing` over `op.pages` happened.
    public mutating func record(_ op: DiscardOperation) {
        for page in op.pages { discards[Key(page: page, backing: op.backing), default: 0] &+= 1 }
    }

    /// What a read of `page` through `backing` must return now.
    public func expected(page: UInt64, backing: MemorySharing) -> UInt32 {
        let key = Key(page: page, backing: backing)
        guard let w = written[key], w.generation == discards[key, default: 0] else { return 0 }
        return w.value
    }

    /// The guest wrote `value` into `page` while it was in state `backing`.
    public mutating func wrote(page: UInt64, backing: MemorySharing, value: UInt32) {
        let key = Key(page: page, backing: backing)
        written[key] = (value, discards[key, default: 0])
    }
}
