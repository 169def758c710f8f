#if canImport(Glibc)
import Glibc
#endif

/// Which file a path names and which version of it: device, inode, size and modification
/// time. Two equal identities mean the same file, not written since (as far as the file
/// system's timestamps tell); a snapshot server uses it to know when a check it made of a
/// file still holds.
public struct FileIdentity: Equatable, Sendable {
    public let device: UInt64
    public let inode: UInt64
    public let size: Int64
    public let modifiedNanoseconds: Int64

    /// The identity of `path` now (following symlinks); nil when it cannot be stat'ed.
    public init?(path: String) {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        device = UInt64(st.st_dev)
        inode = UInt64(st.st_ino)
        size = Int64(st.st_size)
        modifiedNanoseconds = Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec)
    }
}
