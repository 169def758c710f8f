import Atomics

/// Demand-fault latency as QEMU 10.1 reports it (`postcopy-latency-dist`): bucket N counts
/// values in [2^N, 2^(N+1)) microseconds (values under 1 us count in bucket 0), overall and
/// per vCPU. Every counter is allocated up front; `record` is two relaxed atomic increments
/// and allocates nothing, so it may run on the fault path from any thread.
public final class Log2Histogram: @unchecked Sendable {
    public static let bucketCount = 40
    public let vcpus: Int
    /// (vcpus + 1) rows of `bucketCount` counters; the last row is the total.
    private let counters: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>

    public init(vcpus: Int) {
        self.vcpus = max(vcpus, 0)
        let n = (self.vcpus + 1) * Self.bucketCount
        counters = .allocate(capacity: n)
        counters.initialize(repeating: .init(0), count: n)
    }

    deinit { counters.deallocate() }

    /// The bucket of a latency in microseconds: floor(log2(us)), 0 below 2 us.
    @inline(__always) public static func bucket(microseconds: UInt64) -> Int {
        microseconds <= 1 ? 0 : min(63 - microseconds.leadingZeroBitCount, bucketCount - 1)
    }

    /// Records one latency in nanoseconds for `vcpu` (out of range: the total only).
    @inline(__always) public func record(nanoseconds: UInt64, vcpu: Int) {
        let b = Self.bucket(microseconds: nanoseconds / 1000)
        UnsafeAtomic<UInt64>(at: counters + vcpus * Self.bucketCount + b).wrappingIncrement(ordering: .relaxed)
        if vcpu >= 0 && vcpu < vcpus {
            UnsafeAtomic<UInt64>(at: counters + vcpu * Self.bucketCount + b).wrappingIncrement(ordering: .relaxed)
        }
    }

    /// The counts of one row up to its last non-empty bucket (`vcpu` nil: every fault).
    public func buckets(vcpu: Int? = nil) -> [UInt64] {
        let row = vcpu.map { min(max($0, 0), vcpus) } ?? vcpus
        var out = (0..<Self.bucketCount).map {
            UnsafeAtomic<UInt64>(at: counters + row * Self.bucketCount + $0).load(ordering: .relaxed)
        }
        while let last = out.last, last == 0 { out.removeLast() }
        return out
    }
}
