import CFaultlineShim
import FaultlineCore
#if canImport(Glibc)
import Glibc
#endif

/// Private anonymous memory mapped into this process (mmap), owned: unmapped in deinit.
/// For host-side buffers the kernel works on directly (a page source, a pool of pages to
/// UFFDIO_MOVE from); guest RAM is a ``GuestMemoryRegion``.
public final class AnonymousMapping: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    /// Bytes mapped.
    public let size: Int
    public let label: String

    /// Maps `size` bytes, read-write. `populate` faults every page in now (MAP_POPULATE), so
    /// later accesses never fault. `reserve: false` (MAP_NORESERVE) for address space that
    /// only ever holds pages moved into it. `hugePages`: 2 MiB hugetlb pages (MAP_HUGETLB; needs
    /// free reserved huge pages, and `size` a multiple of 2 MiB).
    public init(size: Int, populate: Bool = false, reserve: Bool = true, hugePages: Bool = false, label: String) throws(SystemError) {
        let flags = MAP_PRIVATE | MAP_ANONYMOUS | (populate ? MAP_POPULATE : 0) | (reserve ? 0 : MAP_NORESERVE)
            | (hugePages ? MAP_HUGETLB | (21 << MAP_HUGE_SHIFT) : 0)
        guard size > 0 else { throw SystemError("mmap \(label): size \(size)", errno: EINVAL) }
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, flags, -1, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap \(label) \(size) bytes", errno: fl_errno()) }
        base = p
        self.size = size
        self.label = label
    }

    deinit { munmap(base, size) }

    public var hostAddress: HostAddress { HostAddress(base) }

    /// Which pages are resident (mincore): one byte per page, bit 0 set when resident.
    /// `bytes` holds at least `size / 4096` bytes.
    public func residency(into bytes: UnsafeMutablePointer<UInt8>) throws(SystemError) {
        try queryResidency(base: base, length: size, into: bytes, label: label)
    }

    /// The same for `length` bytes from `offset` (both page-aligned).
    public func residency(offset: Int, length: Int, into bytes: UnsafeMutablePointer<UInt8>) throws(SystemError) {
        try queryResidency(base: base + offset, length: length, into: bytes, label: label)
    }
}

extension AnonymousMapping: ZeroFilledMemory {
    /// Zero-filled memory for large tables: an anonymous mapping, nothing touched until written
    /// (nil if the mapping fails; the table then zeroes heap memory).
    public static let zeroFilled: ZeroFilledAllocator = { bytes in
        try? AnonymousMapping(size: (bytes + 4095) & ~4095, label: "zeroed table")
    }

    /// madvise(MADV_POPULATE_WRITE): every page allocated and mapped writable now, contents
    /// unchanged (safe while other threads write to the mapping). False where the kernel lacks
    /// it (before 5.14): the pages are then allocated on first write, as before.
    @discardableResult
    public func populateForWriting() -> Bool {
        let populateWrite: Int32 = 23  // MADV_POPULATE_WRITE, not in every libc's headers
        return madvise(base, size, populateWrite) == 0
    }
}

/// Zero-filled memory for per-page tables, carved from mappings made ahead of the tables.
/// Building per-page tables must not delay a restored guest's first instruction, yet a page of
/// a table first written on the fault path costs that fault a page allocation (several
/// microseconds on a nested host, for each of the tables it writes: the fault's p99). So a
/// caller that knows the guest's size early ``reserve(bytes:)``s the memory and has it
/// allocated on a thread of its own while the rest of the start-up goes on; the tables are
/// then carved from it. Without a reservation, or beyond it, tables get zero pages that are
/// allocated on first write.
public final class ZeroFilledArena: @unchecked Sendable {
    private struct Pool {
        var mappings: [AnonymousMapping] = []
        var current: AnonymousMapping?
        var used = 0
        var populate: OSThread?
    }
    private let pool = Locked(Pool())

    public init() {}

    /// Maps `bytes` now and allocates their pages on a background thread (MADV_POPULATE_WRITE:
    /// safe while tables carved from it are in use). Throws if the mapping fails.
    public func reserve(bytes: Int) throws(SystemError) {
        let mapping = try AnonymousMapping(size: (bytes + 4095) & ~4095, label: "per-page tables")
        let thread = try? OSThread(name: "table populate") { mapping.populateForWriting() }
        pool.withLock { p in
            p.populate?.join()
            p.mappings.append(mapping)
            p.current = mapping
            p.used = 0
            p.populate = thread
        }
    }

    /// Whether a reservation was made.
    public var reserved: Bool { pool.withLock { $0.current != nil } }

    /// Waits for the background allocation, if one runs.
    public func finishPopulating() {
        let thread = pool.withLock { p -> OSThread? in
            defer { p.populate = nil }
            return p.populate
        }
        thread?.join()
    }

    deinit { pool.withLock { $0.populate }?.join() }

    /// Carves from the reservation while it has room; otherwise maps zero pages (nil if even
    /// that fails: the table then zeroes heap memory).
    public var allocator: ZeroFilledAllocator {
        { [self] bytes in
            let size = (bytes + 4095) & ~4095
            let carved = pool.withLock { p -> ZeroFilledMemory? in
                guard let m = p.current, m.size - p.used >= size else { return nil }
                defer { p.used += size }
                return CarvedMemory(parent: m, offset: p.used, size: size)
            }
            return carved ?? AnonymousMapping.zeroFilled(bytes)
        }
    }

    /// A part of a reservation; keeps the mapping alive.
    private final class CarvedMemory: ZeroFilledMemory, @unchecked Sendable {
        let parent: AnonymousMapping
        let base: UnsafeMutableRawPointer
        let size: Int
        init(parent: AnonymousMapping, offset: Int, size: Int) {
            self.parent = parent
            base = parent.base + offset
            self.size = size
        }
    }
}
