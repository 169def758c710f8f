import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// SIGINT and SIGTERM as a readable descriptor (signalfd), so a poll loop ends cleanly and
/// reports instead of dying mid-way. Blocks both signals in the calling thread and in the
/// threads it starts afterwards: create it first thing on the main thread.
public final class TerminationSignals: @unchecked Sendable {
    public let fd: FileDescriptor

    public init() throws(SystemError) {
        let raw = try systemCall("signalfd SIGINT|SIGTERM") { fl_termination_signalfd() }
        fd = FileDescriptor(adopting: raw, label: "signalfd")
    }

    /// The signal that arrived (SIGINT or SIGTERM), consumed; nil when none is pending.
    public func take() -> Int32? {
        let n = fl_signalfd_read(fd.rawValue)
        return n > 0 ? n : nil
    }

    public static func name(_ signal: Int32) -> String {
        switch signal {
        case SIGINT: return "SIGINT"
        case SIGTERM: return "SIGTERM"
        case SIGKILL: return "SIGKILL"
        case SIGSEGV: return "SIGSEGV"
        case SIGABRT: return "SIGABRT"
        case SIGBUS: return "SIGBUS"
        case SIGILL: return "SIGILL"
        case SIGTRAP: return "SIGTRAP"
        default: return "signal \(signal)"
        }
    }
}
