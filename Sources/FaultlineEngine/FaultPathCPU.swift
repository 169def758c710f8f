import FaultlineLinux

/// Where a migration's fault-path threads run. They all share one CPU: every fault request
/// and reply of a connection then leaves from the same CPU, so on loopback (where a packet
/// is delivered through the sending CPU's backlog) segments cannot overtake each other. A
/// thread that wanders between CPUs makes the receiver see them out of order, and the
/// segment left behind waits for the other CPU's softirq work, which can hold a fault reply
/// back for milliseconds.
public enum FaultPathCPU: Equatable, Sendable {
    /// The highest-numbered CPU this process may run on.
    case automatic
    case cpu(Int32)
    /// Leave the threads to the scheduler.
    case unpinned

    public init?(parsing text: String) {
        switch text {
        case "auto": self = .automatic
        case "none": self = .unpinned
        default:
            guard let n = Int32(text), n >= 0 else { return nil }
            self = .cpu(n)
        }
    }

    /// The CPU to pin to, or nil.
    public var resolved: Int32? {
        switch self {
        case .automatic: return ThreadScheduling.lastAllowedCPU()
        case .cpu(let n): return n
        case .unpinned: return nil
        }
    }
}
