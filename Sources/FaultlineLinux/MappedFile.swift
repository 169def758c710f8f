import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// A regular file mapped read-only and private (a snapshot's memory file served to a guest):
/// owned, unmapped in deinit. Pages are read from the page cache on first touch.
public final class MappedFile: @unchecked Sendable {
    public let file: FileDescriptor
    public let base: UnsafeRawPointer
    public let size: UInt64

    /// Opens `path` read-only.
    public static func open(_ path: String) throws(SystemError) -> FileDescriptor {
        try FileDescriptor.open(path, flags: O_RDONLY)
    }

    /// The size of the regular file behind `file`; an error for anything else (a directory,
    /// a pipe, a device).
    public static func regularFileSize(_ file: FileDescriptor) throws(SystemError) -> UInt64 {
        var info = stat()
        try systemCall("fstat \(file)") { fstat(file.rawValue, &info) }
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw SystemError("\(file.label): not a regular file", errno: EINVAL)
        }
        return UInt64(info.st_size)
    }

    /// Maps all of `file` (an empty file is an error: there is nothing to serve).
    public init(_ file: FileDescriptor) throws(SystemError) {
        let size = try MappedFile.regularFileSize(file)
        guard size > 0 else { throw SystemError("mmap \(file.label): the file is empty", errno: EINVAL) }
        let p = mmap(nil, Int(size), PROT_READ, MAP_PRIVATE, file.rawValue, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap \(file.label) \(size) bytes", errno: fl_errno()) }
        self.file = file
        self.base = UnsafeRawPointer(p)
        self.size = size
    }

    deinit { munmap(UnsafeMutableRawPointer(mutating: base), Int(size)) }
}
