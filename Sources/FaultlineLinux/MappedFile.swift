import CFaultlineShim
import FaultlineCore
#if canImport(Glibc)
import Glibc
#endif

/// A regular file mapped read-only and private into this process (a snapshot's memory file):
/// owned, unmapped in deinit. Pages are read from the page cache on first touch; a hole reads
/// as zeros.
public final class MappedFile: @unchecked Sendable {
    public let file: FileDescriptor
    public let base: UnsafeRawPointer
    public let size: UInt64
    public var path: String { file.label }

    /// lseek whence values (Linux, since 3.1); Glibc's module does not export them.
    static let seekData: Int32 = 3
    static let seekHole: Int32 = 4

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

    /// Opens and maps `path` (an empty file is an error: there is nothing to map).
    public convenience init(path: String) throws(SystemError) {
        try self.init(try MappedFile.open(path))
    }

    /// Maps all of `file` (an empty file is an error: there is nothing to serve).
    public init(_ file: FileDescriptor) throws(SystemError) {
        let size = try MappedFile.regularFileSize(file)
        guard size > 0 else { throw SystemError("mmap \(file.label): the file is empty", errno: EINVAL) }
        let p = mmap(nil, Int(size), PROT_READ, MAP_PRIVATE | MAP_NORESERVE, file.rawValue, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap \(file.label) \(size) bytes", errno: fl_errno()) }
        self.file = file
        self.base = UnsafeRawPointer(p)
        self.size = size
    }

    deinit { munmap(UnsafeMutableRawPointer(mutating: base), Int(size)) }

    /// Asks the kernel to read `length` bytes from `offset` ahead (POSIX_FADV_WILLNEED).
    public func adviseWillNeed(offset: UInt64, length: UInt64) {
        _ = posix_fadvise(file.rawValue, Int(offset), Int(length), POSIX_FADV_WILLNEED)
    }

    /// The byte ranges that hold data (SEEK_DATA / SEEK_HOLE); everything else is a hole.
    /// A file system without hole reporting reports the whole file as data.
    public func dataRanges() throws(SystemError) -> [Range<UInt64>] {
        var ranges: [Range<UInt64>] = []
        var offset: Int = 0
        let end = Int(size)
        while offset < end {
            let data = lseek(file.rawValue, offset, Self.seekData)
            if data < 0 {
                let code = fl_errno()
                if code == ENXIO { break }  // no data after `offset`
                throw SystemError("lseek \(path) SEEK_DATA \(offset)", errno: code)
            }
            let hole = lseek(file.rawValue, data, Self.seekHole)
            guard hole >= 0 else { throw SystemError("lseek \(path) SEEK_HOLE \(data)", errno: fl_errno()) }
            ranges.append(UInt64(data)..<UInt64(min(hole, end)))
            offset = hole
        }
        return ranges
    }
}

/// A file being written (owned: closed in deinit): whole-buffer positional writes, the final
/// size, and a sync. Bytes never written are holes and read back as zeros.
public final class FileWriter: @unchecked Sendable {
    public let path: String
    public let file: FileDescriptor

    /// Creates (or truncates) `path`, mode 0600.
    public init(creating path: String) throws(SystemError) {
        self.path = path
        let fd = try systemCall("create \(path)") { Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
        file = FileDescriptor(adopting: fd, label: path)
    }

    /// Writes all `length` bytes at `offset` (short writes are continued).
    public func write(_ bytes: UnsafeRawPointer, length: Int, at offset: UInt64) throws(SystemError) {
        var done = 0
        while done < length {
            let n = try systemCall("pwrite \(path) \(length - done) bytes at \(offset + UInt64(done))") {
                pwrite(file.rawValue, bytes + done, length - done, Int(offset) + done)
            }
            guard n > 0 else { throw SystemError("pwrite \(path): wrote nothing", errno: EIO) }
            done += n
        }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64 = 0) throws(SystemError) {
        let copy = UnsafeMutableRawPointer.allocate(byteCount: max(bytes.count, 1), alignment: 16)
        defer { copy.deallocate() }
        copy.copyMemory(from: bytes, byteCount: bytes.count)
        try write(copy, length: bytes.count, at: offset)
    }

    /// Sets the file's size (ftruncate): the tail after the last write becomes a hole.
    public func setSize(_ size: UInt64) throws(SystemError) {
        try systemCall("ftruncate \(path) \(size)") { ftruncate(file.rawValue, Int(size)) }
    }

    public func sync() throws(SystemError) {
        try systemCall("fsync \(path)") { fsync(file.rawValue) }
    }
}

/// Whole-file helpers for small files (manifests) and folders.
public enum FileSystem {
    /// The whole file; `limit` bounds what is read (a bigger file is an error, not a hang).
    public static func read(_ path: String, limit: Int = 64 << 20) throws(SystemError) -> [UInt8] {
        let fd = try FileDescriptor.open(path, flags: O_RDONLY)
        var out: [UInt8] = []
        let chunk = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 16)
        defer { chunk.deallocate() }
        while true {
            let n = try systemCall("read \(path)") { Glibc.read(fd.rawValue, chunk, 65536) }
            if n == 0 { return out }
            out.append(contentsOf: UnsafeRawBufferPointer(start: chunk, count: n))
            guard out.count <= limit else { throw SystemError("read \(path): more than \(limit) bytes", errno: EFBIG) }
        }
    }

    /// Writes `bytes` to `path` so that a reader sees the old file or the whole new one, never
    /// a part: a temporary file, fsync, rename, fsync of the folder.
    public static func writeAtomically(_ bytes: [UInt8], to path: String) throws(SystemError) {
        let temporary = path + ".tmp"
        let writer = try FileWriter(creating: temporary)
        try writer.write(bytes)
        try writer.sync()
        try systemCall("rename \(temporary) to \(path)") { rename(temporary, path) }
        let folder = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        if let dir = try? FileDescriptor.open(folder.isEmpty ? "." : folder, flags: O_RDONLY | O_DIRECTORY) { _ = fsync(dir.rawValue) }
    }

    /// Creates the folder (mode 0700) unless it exists.
    public static func makeDirectory(_ path: String) throws(SystemError) {
        if mkdir(path, 0o700) != 0 {
            let code = fl_errno()
            var st = stat()
            guard code == EEXIST, stat(path, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
                throw SystemError("mkdir \(path)", errno: code)
            }
        }
    }

    public static func remove(_ path: String) { unlink(path) }

    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

}
