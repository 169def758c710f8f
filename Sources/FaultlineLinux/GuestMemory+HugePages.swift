#if canImport(Glibc)
import Glibc
#endif

extension GuestMemoryRegion {
    /// madvise(MADV_NOHUGEPAGE) over the region: the kernel backs it with 4 KiB pages only (as
    /// pages installed one by one with UFFDIO_COPY are), not transparent huge pages.
    public func disableTransparentHugePages() throws(SystemError) {
        try systemCall("madvise NOHUGEPAGE \(size)") { madvise(base, Int(size), MADV_NOHUGEPAGE) }
    }
}
