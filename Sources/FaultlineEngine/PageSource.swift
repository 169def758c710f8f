import FaultlineCore
import FaultlineLinux

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
    public let delayNanoseconds: Int
    /// The source's bytes, populated up front (fetching never faults).
    @usableFromInline let memory: AnonymousMapping
    @inlinable public var base: UnsafeMutableRawPointer { memory.base }

    public init(size: UInt64, delayMicroseconds: Int = 0) throws {
        memory = try AnonymousMapping(size: Int(size), populate: true, label: "page source")
        self.size = size
        self.delayNanoseconds = delayMicroseconds * 1000
        for page in 0..<Int(size / 4096) { SourcePattern.fill(page: page, at: memory.base + page * 4096) }
    }

    @inlinable
    public func fetch(offset: UInt64, length: Int, scratch: UnsafeMutableRawPointer) throws -> UnsafeRawPointer {
        if delayNanoseconds > 0 { MonotonicClock.sleep(nanoseconds: UInt64(delayNanoseconds)) }
        return UnsafeRawPointer(base + Int(offset))
    }
}
