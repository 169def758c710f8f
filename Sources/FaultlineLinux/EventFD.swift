import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// An eventfd(2), owned: a counter other threads wait on (`wait`) or poll (`fd`) and any
/// thread bumps (`signal`). Closed in deinit.
public final class EventFD: @unchecked Sendable {
    public let fd: Int32

    public init(initial: UInt32 = 0) throws(SystemError) {
        let fd = fl_eventfd(initial, Int32(O_CLOEXEC))
        guard fd >= 0 else { throw SystemError("eventfd", errno: fl_errno()) }
        self.fd = fd
    }

    deinit { close(fd) }

    /// Adds `n` to the counter, waking a waiter.
    public func signal(_ n: UInt64 = 1) {
        var value = n
        _ = write(fd, &value, 8)
    }

    /// Blocks until the counter is non-zero; returns and resets it (retried on EINTR).
    public func wait() throws(SystemError) -> UInt64 {
        var value: UInt64 = 0
        let n = try systemCall("read eventfd") { read(fd, &value, 8) }
        guard n == 8 else { throw SystemError("read eventfd: \(n) of 8 bytes", errno: EIO) }
        return value
    }
}
