import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// Memory shared between processes: a memfd mapped MAP_SHARED, owned (unmapped in deinit;
/// the memfd closes with the last descriptor). Pass `fd` to another process and map it there
/// with `init(adopting:)`: both see the same bytes, and they outlive any one of them.
/// Every page is populated up front, so storing into it never faults.
public final class SharedMemory: @unchecked Sendable {
    public let fd: FileDescriptor
    public let base: UnsafeMutableRawPointer
    public let size: Int

    /// A new zero-filled memfd of `size` bytes (rounded up to 4 KiB), mapped.
    public init(size: Int, label: String) throws(SystemError) {
        guard size > 0 else { throw SystemError("memfd \(label): size \(size)", errno: EINVAL) }
        let rounded = (size + 4095) & ~4095
        let raw = try systemCall("memfd_create \(label)") { fl_memfd_create(label, 1 /* MFD_CLOEXEC */) }
        let fd = FileDescriptor(adopting: raw, label: "memfd \(label)")
        try systemCall("ftruncate \(fd) to \(rounded)") { ftruncate(raw, off_t(rounded)) }
        self.fd = fd
        self.size = rounded
        self.base = try SharedMemory.map(fd, size: rounded)
    }

    /// Maps a memfd received from another process (its whole length).
    public init(adopting fd: FileDescriptor) throws(SystemError) {
        var info = stat()
        try systemCall("fstat \(fd)") { fstat(fd.rawValue, &info) }
        guard info.st_size > 0 else { throw SystemError("map \(fd): the shared memory is empty", errno: EINVAL) }
        self.fd = fd
        self.size = Int(info.st_size)
        self.base = try SharedMemory.map(fd, size: Int(info.st_size))
    }

    private static func map(_ fd: FileDescriptor, size: Int) throws(SystemError) -> UnsafeMutableRawPointer {
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd.rawValue, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap \(fd) \(size) bytes shared", errno: fl_errno()) }
        return p
    }

    deinit { munmap(base, size) }
}
