/// A map from disjoint half-open ranges of `UInt64` (page numbers or addresses) to values,
/// kept coalesced: adjacent ranges with equal values merge. This is how guest_memfd tracks
/// shared versus private memory (by range, not a bit per page - the guest_memfd seeds),
/// and how Faultline describes "pages still to send" on the wire.
///
/// Lookups are O(log n); an update touches only the ranges it overlaps.
public struct RangeMap<Value: Equatable & Sendable>: Sendable, Equatable {
    public struct Entry: Equatable, Sendable {
        public var range: Range<UInt64>
        public var value: Value
    }

    public private(set) var entries: [Entry] = []

    public init() {}

    /// The value at `key`, or nil when no range covers it.
    public func value(at key: UInt64) -> Value? {
        var lo = 0, hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].range.upperBound <= key { lo = mid + 1 } else { hi = mid }
        }
        return lo < entries.count && entries[lo].range.contains(key) ? entries[lo].value : nil
    }

    /// Assigns `value` to every key in `range` (nil removes), splitting and merging as needed.
    public mutating func set(_ range: Range<UInt64>, to value: Value?) {
        guard !range.isEmpty else { return }
        var result: [Entry] = []
        result.reserveCapacity(entries.count + 2)
        var inserted = false
        func append(_ e: Entry) {
            if var last = result.last, last.range.upperBound == e.range.lowerBound, last.value == e.value {
                last.range = last.range.lowerBound..<e.range.upperBound
                result[result.count - 1] = last
            } else {
                result.append(e)
            }
        }
        for e in entries {
            if e.range.upperBound <= range.lowerBound || e.range.lowerBound >= range.upperBound {
                if !inserted && e.range.lowerBound >= range.upperBound {
                    if let value { append(Entry(range: range, value: value)) }
                    inserted = true
                }
                append(e)
                continue
            }
            if e.range.lowerBound < range.lowerBound {
                append(Entry(range: e.range.lowerBound..<range.lowerBound, value: e.value))
            }
            if !inserted {
                if let value { append(Entry(range: range, value: value)) }
                inserted = true
            }
            if e.range.upperBound > range.upperBound {
                append(Entry(range: range.upperBound..<e.range.upperBound, value: e.value))
            }
        }
        if !inserted, let value { append(Entry(range: range, value: value)) }
        entries = result
    }

    /// Total length covered by ranges whose value equals `value`.
    public func coverage(of value: Value) -> UInt64 {
        entries.reduce(0) { $0 + ($1.value == value ? UInt64($1.range.count) : 0) }
    }
}
