#if canImport(Glibc)
import Glibc
#endif

/// An errno value with names, so layers above compare errors without importing libc
/// (`error.code == .badAddress`). Names follow swift-system's.
public struct Errno: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public var description: String { SystemError.name(of: rawValue) }

    public static let invalidArgument = Errno(rawValue: EINVAL)
    public static let badAddress = Errno(rawValue: EFAULT)
    public static let interrupted = Errno(rawValue: EINTR)
    public static let resourceTemporarilyUnavailable = Errno(rawValue: EAGAIN)
    public static let fileExists = Errno(rawValue: EEXIST)
    public static let timedOut = Errno(rawValue: ETIMEDOUT)
    public static let brokenPipe = Errno(rawValue: EPIPE)
    public static let connectionReset = Errno(rawValue: ECONNRESET)
    public static let connectionRefused = Errno(rawValue: ECONNREFUSED)
    public static let connectionAbort = Errno(rawValue: ECONNABORTED)
    public static let socketNotConnected = Errno(rawValue: ENOTCONN)
    public static let socketShutdown = Errno(rawValue: ESHUTDOWN)
    public static let noRouteToHost = Errno(rawValue: EHOSTUNREACH)
    public static let networkUnreachable = Errno(rawValue: ENETUNREACH)
    public static let notSupported = Errno(rawValue: EOPNOTSUPP)
    public static let noSuchFileOrDirectory = Errno(rawValue: ENOENT)
}

extension SystemError {
    /// The errno, named.
    public var code: Errno { Errno(rawValue: errno) }
}
