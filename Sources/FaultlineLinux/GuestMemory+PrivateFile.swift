import CFaultlineShim
import FaultlineCore
#if canImport(Glibc)
import Glibc
#endif

extension GuestMemoryRegion {
    /// Maps `size` bytes of `file` from `offset` private and writable (``MemoryBacking/privateFile``):
    /// MAP_PRIVATE, so a page is read from the file's page cache on first touch and shared with
    /// every other mapping of the file until this mapping writes it; the write copies it (copy on
    /// write) into this process, and the file never sees it. MAP_NORESERVE: only written pages
    /// take memory, so none is committed up front. The region keeps `file` open.
    ///
    /// The file must hold the whole range (a page past its end would raise SIGBUS on access), and
    /// nothing may change it while the region lives: a page no mapping has written reads
    /// whatever the file holds at the time.
    public convenience init(privateMappingOf file: FileDescriptor, offset: UInt64, size: UInt64,
                            label: String = "guest-ram") throws {
        let pageSize = MemoryBacking.privateFile.pageSize
        guard size > 0, size % pageSize == 0 else { throw RegionError.badSize(size, pageSize: pageSize) }
        guard offset % pageSize == 0 else {
            throw SystemError("mmap \(file) offset \(offset) for \(label): not a multiple of \(pageSize)", errno: EINVAL)
        }
        var st = stat()
        try systemCall("fstat \(file)") { fstat(file.rawValue, &st) }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw SystemError("mmap \(file) for \(label): not a regular file", errno: EINVAL)
        }
        let (end, overflow) = offset.addingReportingOverflow(size)
        guard !overflow, UInt64(st.st_size) >= end else {
            throw SystemError("mmap \(file) bytes \(offset)..<\(end) for \(label): the file has \(st.st_size) bytes", errno: EINVAL)
        }
        let mapping = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, file.rawValue, off_t(offset))
        guard let mapping, mapping != MAP_FAILED else {
            throw SystemError("mmap \(file) private \(size) bytes at \(offset) for \(label)", errno: fl_errno())
        }
        self.init(backing: .privateFile, size: size, base: mapping, file: file)
    }
}
