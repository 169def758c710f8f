import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// poll(2) over a few descriptors, for control loops that wait on several things at once (a
/// child's pidfd, a socket, a signalfd). Allocates per call: not for a fault path.
public enum DescriptorPoll {
    public struct Events: OptionSet, Sendable {
        public let rawValue: Int16
        public init(rawValue: Int16) { self.rawValue = rawValue }
        public static let readable = Events(rawValue: Int16(POLLIN))
        /// The peer shut its writing side (POLLRDHUP; Glibc's module map leaves the name out).
        public static let hangUp = Events(rawValue: 0x2000)
        /// Always reported, never asked for: POLLHUP, POLLERR, POLLNVAL.
        public static let closed = Events(rawValue: Int16(POLLHUP) | Int16(POLLERR) | Int16(POLLNVAL))
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) until one of `descriptors` has one of
    /// its events; returns what each has (empty sets on timeout or an interrupting signal).
    public static func wait(_ descriptors: [(fd: Int32, events: Events)], timeoutMilliseconds: Int32) throws(SystemError) -> [Events] {
        var fds = descriptors.map { pollfd(fd: $0.fd, events: $0.events.rawValue, revents: 0) }
        let rc = poll(&fds, nfds_t(fds.count), timeoutMilliseconds)
        if rc < 0 {
            let code = fl_errno()
            if code == EINTR { return Array(repeating: [], count: fds.count) }
            throw SystemError("poll \(descriptors.count) descriptors", errno: code)
        }
        return fds.map { Events(rawValue: $0.revents) }
    }
}
