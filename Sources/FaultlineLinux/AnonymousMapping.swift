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
