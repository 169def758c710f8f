/// Log-linear latency buckets (the HDR histogram's scheme, fixed size): values below 16 have
/// a bucket each, and every power of two above is cut into 16 equal buckets, so a bucket is
/// at most 1/16 (6%) of its values wide. Values are nanoseconds up to 2^41 (about 36 minutes);
/// larger ones land in the last bucket. Counts live wherever the caller keeps them (shared
/// memory, for a page server that outlives its workers): this is only the arithmetic.
public enum LatencyBuckets {
    static let subBits = 4
    static let sub = 1 << subBits
    static let topExponent = 40
    /// Buckets in all.
    public static let count = sub + (topExponent - subBits + 1) * sub

    /// The bucket of `value`.
    @inlinable @inline(__always)
    public static func index(of value: UInt64) -> Int {
        if value < 16 { return Int(value) }
        let exponent = 63 - value.leadingZeroBitCount
        if exponent > 40 { return count - 1 }
        let subBucket = Int(truncatingIfNeeded: value >> UInt64(exponent - 4)) & 15
        return 16 + (exponent - 4) * 16 + subBucket
    }

    /// The smallest value of bucket `index`.
    public static func lowerBound(of index: Int) -> UInt64 {
        if index < sub { return UInt64(index) }
        let exponent = (index - sub) / sub + subBits, subBucket = (index - sub) % sub
        return UInt64(sub + subBucket) << UInt64(exponent - subBits)
    }

    /// How many values bucket `index` holds.
    public static func width(of index: Int) -> UInt64 {
        index < sub ? 1 : UInt64(1) << UInt64((index - sub) / sub)
    }

    /// The value at `percentile` (0-100) of the counted values: the middle of the bucket it
    /// falls in, never above `max` (the largest value recorded). 0 without values.
    public static func value(atPercentile percentile: Double, counts: [UInt64], max: UInt64) -> UInt64 {
        let total = counts.reduce(0, +)
        guard total > 0 else { return 0 }
        let rank = Swift.max(UInt64((Double(total) * percentile / 100).rounded(.up)), 1)
        var seen: UInt64 = 0
        for (i, c) in counts.enumerated() {
            seen += c
            if seen >= rank { return Swift.min(lowerBound(of: i) + (width(of: i) - 1) / 2, max) }
        }
        return max
    }
}
