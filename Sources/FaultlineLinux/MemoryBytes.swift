#if canImport(Glibc)
import Glibc
#endif

/// Byte comparisons of memory ranges at libc speed (memcmp), for checks that read whole
/// guest memories.
public enum MemoryBytes {
    /// Whether `count` bytes at `a` and `b` are equal.
    public static func equal(_ a: UnsafeRawPointer, _ b: UnsafeRawPointer, count: Int) -> Bool {
        memcmp(a, b, count) == 0
    }

    /// Whether `count` bytes at `p` are all zero.
    public static func allZero(_ p: UnsafeRawPointer, count: Int) -> Bool {
        guard count > 0 else { return true }
        // Zero first byte, and every byte equal to the one before it.
        return p.load(as: UInt8.self) == 0 && (count == 1 || memcmp(p, p + 1, count - 1) == 0)
    }
}
