import CFaultlineShim
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A failed system call: which operation (with its subject: slot, vCPU, range...) and the
/// errno. Renders as `KVM_SET_USER_MEMORY_REGION2 slot 1: EINVAL (Invalid argument)`.
public struct SystemError: Error, Equatable, CustomStringConvertible, Sendable {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var errnoName: String { SystemError.name(of: errno) }

    public var description: String {
        "\(operation): \(errnoName) (\(String(cString: strerror(errno))))"
    }

    /// The symbolic name of an errno value (`EINVAL`), or `errno N`.
    public static func name(of code: Int32) -> String {
        switch code {
        case EPERM: return "EPERM"
        case ENOENT: return "ENOENT"
        case ESRCH: return "ESRCH"
        case EINTR: return "EINTR"
        case EIO: return "EIO"
        case ENXIO: return "ENXIO"
        case E2BIG: return "E2BIG"
        case EBADF: return "EBADF"
        case EAGAIN: return "EAGAIN"
        case ENOMEM: return "ENOMEM"
        case EACCES: return "EACCES"
        case EFAULT: return "EFAULT"
        case EBUSY: return "EBUSY"
        case EEXIST: return "EEXIST"
        case ENODEV: return "ENODEV"
        case EINVAL: return "EINVAL"
        case ENFILE: return "ENFILE"
        case EMFILE: return "EMFILE"
        case ENOTTY: return "ENOTTY"
        case EFBIG: return "EFBIG"
        case ENOSPC: return "ENOSPC"
        case ESPIPE: return "ESPIPE"
        case ERANGE: return "ERANGE"
        case ENOSYS: return "ENOSYS"
        case EOPNOTSUPP: return "EOPNOTSUPP"
        case ECONNREFUSED: return "ECONNREFUSED"
        case ECONNRESET: return "ECONNRESET"
        case EPIPE: return "EPIPE"
        case ETIMEDOUT: return "ETIMEDOUT"
        case EHWPOISON: return "EHWPOISON"
        case ENOEXEC: return "ENOEXEC"
        default: return "errno \(code)"
        }
    }
}

/// The one place where system calls turn into Swift results, whatever integer they return
/// (`int`, `ssize_t`, `pid_t`): `-1` becomes a thrown `SystemError` naming `operation` and the
/// errno; EINTR runs `body` again unless the caller says not to (KVM_RUN, whose EINTR means
/// "you were kicked"; connect, which goes on in the background after a signal). `body` must
/// be safe to run again: a call that reports what is left (nanosleep) updates its own arguments.
@inlinable
@discardableResult
public func systemCall<Result: FixedWidthInteger & SignedInteger>(
    _ operation: @autoclosure () -> String,
    retryOnInterrupt: Bool = true,
    _ body: () -> Result
) throws(SystemError) -> Result {
    while true {
        let rc = body()
        if rc != -1 { return rc }
        let code = fl_errno()
        if code == EINTR && retryOnInterrupt { continue }
        throw SystemError(operation(), errno: code)
    }
}

/// An owned file descriptor: closed exactly once, when the last reference goes away.
public final class FileDescriptor: @unchecked Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public let label: String

    public init(adopting fd: Int32, label: String) {
        precondition(fd >= 0, "adopting an invalid fd for \(label)")
        self.rawValue = fd
        self.label = label
    }

    deinit { _ = close(rawValue) }

    public var description: String { "\(label) (fd \(rawValue))" }

    /// Opens `path`; the label is used in error messages.
    public static func open(_ path: String, flags: Int32) throws(SystemError) -> FileDescriptor {
        let fd = try systemCall("open \(path)") { Glibc.open(path, flags | O_CLOEXEC) }
        return FileDescriptor(adopting: fd, label: path)
    }

    @inlinable public func ioctl(_ request: UInt, _ arg: UnsafeMutableRawPointer?) -> Int32 {
        fl_ioctl_ptr(rawValue, request, arg)
    }

    @inlinable public func ioctl(_ request: UInt, value: UInt) -> Int32 {
        fl_ioctl_val(rawValue, request, value)
    }
}
