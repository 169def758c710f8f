import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC in nanoseconds: durations and deadlines (never the wall clock).
public enum MonotonicClock {
    @inlinable public static func nanoseconds() -> UInt64 { fl_now_ns() }

    /// A deadline `seconds` from now.
    public static func deadline(after seconds: Double) -> UInt64 { nanoseconds() &+ UInt64(max(seconds, 0) * 1e9) }

    /// Seconds left until `deadline` (0 when past).
    public static func secondsLeft(until deadline: UInt64) -> Double {
        let now = nanoseconds()
        return now >= deadline ? 0 : Double(deadline - now) / 1e9
    }

    /// Sleeps the calling thread for `nanoseconds` (a signal does not cut it short: the sleep
    /// resumes for the time left). Allocates nothing (a fault path may sleep).
    public static func sleep(nanoseconds: UInt64) {
        var request = timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
        var remaining = timespec()
        // After a signal, the next try sleeps for what is left. Only EINTR is expected; a sleep
        // the kernel refuses (EINVAL) ends at once.
        _ = try? systemCall("nanosleep") {
            let rc = nanosleep(&request, &remaining)
            request = remaining
            return rc
        }
    }

    /// Sleeps the calling thread for `microseconds`.
    public static func sleep(microseconds: UInt64) { sleep(nanoseconds: microseconds &* 1000) }

    /// Sleeps the calling thread for `seconds` (nothing when not positive).
    public static func sleep(seconds: Double) {
        guard seconds > 0 else { return }
        sleep(nanoseconds: UInt64(seconds * 1e9))
    }
}
