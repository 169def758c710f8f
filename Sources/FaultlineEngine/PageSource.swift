import CFaultlineShim
import FaultlineCore
import FaultlineLinux
#if canImport(Glibc)
import Glibc
#endif

/// Where missing guest pages come from: local memory now (a snapshot, the benchmark's
/// source), the network in a migration. Implementations must be safe to call from many
/// fault-handling threads at once and must not allocate per call.
public protocol PageSource: AnyObject, Sendable {
    /// Bytes in the source (the guest RAM size).
    var size: UInt64 { get }
    /// Makes bytes [offset, offset + length) available and returns a pointer to them,
    /// valid until the caller's next fetch. `scratch` (at least `length` bytes, owned by the
    /// calling thread) may be used to hold them; local sources return their own memory.
    func fetch(offset: UInt64, length: Int, scratch: UnsafeMutableRawPointer) throws -> UnsafeRawPointer
}

/// A page source in local memory, filled with `SourcePattern`, with an optional injected
/// fetch latency (a sleep before each fetch, as the kernel's demand_paging_test does).
public final class LocalPageSource: PageSource, @unchecked Sendable {
    public let size: UInt64
    public let base: UnsafeMutableRawPointer
    public let delayNanoseconds: Int

    public init(size: UInt64, delayMicroseconds: Int = 0) throws {
        guard let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0),
              p != MAP_FAILED else {
            throw SystemError("mmap page source \(size) bytes", errno: fl_errno())
        }
        self.size = size
        self.base = p
        self.delayNanoseconds = delayMicroseconds * 1000
        for page in 0..<Int(size / 4096) { SourcePattern.fill(page: page, at: p + page * 4096) }
    }

    deinit { munmap(base, Int(size)) }

    @inlinable
    public func fetch(offset: UInt64, length: Int, scratch: UnsafeMutableRawPointer) throws -> UnsafeRawPointer {
        if delayNanoseconds > 0 {
            var request = timespec(tv_sec: delayNanoseconds / 1_000_000_000, tv_nsec: delayNanoseconds % 1_000_000_000)
            var remaining = timespec()
            while nanosleep(&request, &remaining) != 0 && fl_errno() == EINTR { request = remaining }
        }
        return UnsafeRawPointer(base + Int(offset))
    }
}
