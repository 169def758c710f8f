import CFaultlineShim

/// CLOCK_MONOTONIC in nanoseconds: durations and deadlines (never the wall clock).
public enum MonotonicClock {
    @inline(__always) public static func nanoseconds() -> UInt64 { fl_now_ns() }

    /// A deadline `seconds` from now.
    public static func deadline(after seconds: Double) -> UInt64 { nanoseconds() &+ UInt64(max(seconds, 0) * 1e9) }

    /// Seconds left until `deadline` (0 when past).
    public static func secondsLeft(until deadline: UInt64) -> Double {
        let now = nanoseconds()
        return now >= deadline ? 0 : Double(deadline - now) / 1e9
    }
}
