import CFaultlineShim
import FaultlineLinux
#if canImport(Glibc)
import Glibc
#endif

/// A dedicated OS thread (vCPUs block in KVM_RUN; fault handlers block in poll): not a
/// Swift concurrency task. `join()` waits for it.
public final class OSThread: @unchecked Sendable {
    private var thread = pthread_t()
    private final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }

    /// Starts `body` on a new thread with `stackSize` bytes of stack. A non-zero `niceness`
    /// is applied to the thread first (negative needs privilege; refused quietly otherwise -
    /// it orders the fault path before the bulk stream before running vCPUs, it is not
    /// needed for correctness).
    /// With `cpu`, the thread runs on that CPU only (see ``FaultPathCPU``).
    public init(name: String, stackSize: Int = 1 << 20, niceness: Int32 = 0, cpu: Int32? = nil,
                _ body: @escaping () -> Void) throws(SystemError) {
        let run: () -> Void = niceness == 0 && cpu == nil ? body : {
            if let cpu { _ = fl_pin_current_thread(cpu) }  // refused (e.g. by a cpuset): runs unpinned
            if niceness != 0 { OSThread.setCurrentNiceness(niceness) }
            body()
        }
        let box = Unmanaged.passRetained(Box(run)).toOpaque()
        let rc = fl_thread_create(&thread, stackSize, { arg in
            let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        if rc != 0 {
            Unmanaged<Box>.fromOpaque(box).release()
            throw SystemError("pthread_create \(name)", errno: rc)
        }
    }

    public func join() { pthread_join(thread, nil) }

    /// Sets the calling thread's niceness (Linux: per thread, by tid). The fault path asks
    /// for real-time FIFO scheduling first (it blocks on its socket or uffd almost always and
    /// must preempt the bulk stream at once); without the privilege it gets nice -10.
    public static func setCurrentNiceness(_ value: Int32) {
        if value == Niceness.faultPath {
            var param = sched_param(sched_priority: 1)
            if pthread_setschedparam(pthread_self(), SCHED_FIFO, &param) == 0 { return }
        }
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(fl_gettid()), value)
    }

    /// Scheduling priorities of Faultline's threads during post-copy.
    public enum Niceness {
        /// Fault server, fault receiver, uffd readers: a fault never waits behind bulk data.
        public static let faultPath: Int32 = -10
        /// vCPU threads while their memory is still arriving.
        public static let vcpuDuringPostcopy: Int32 = 10
    }
}


/// `pthread_cond_timedwait` for at most `nanoseconds` (a relative timeout).
@discardableResult
func conditionWait(_ cond: UnsafeMutablePointer<pthread_cond_t>, _ mutex: UnsafeMutablePointer<pthread_mutex_t>,
                   nanoseconds: Int) -> Int32 {
    var deadline = timespec()
    clock_gettime(CLOCK_REALTIME, &deadline)
    deadline.tv_nsec += nanoseconds
    deadline.tv_sec += deadline.tv_nsec / 1_000_000_000
    deadline.tv_nsec %= 1_000_000_000
    return pthread_cond_timedwait(cond, mutex, &deadline)
}

/// Where a migration's fault-path threads run. They all share one CPU: every fault request
/// and reply of a connection then leaves from the same CPU, so on loopback (where a packet
/// is delivered through the sending CPU's backlog) segments cannot overtake each other. A
/// thread that wanders between CPUs makes the receiver see them out of order, and the
/// segment left behind waits for the other CPU's softirq work - measured here as fault
/// replies held back 1-5 ms (p99 of 0.4-3.5 ms unpinned, 0.1-0.75 ms pinned, on the
/// 1 GiB acceptance runs).
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
        case .automatic: let c = fl_last_allowed_cpu(); return c >= 0 ? c : nil
        case .cpu(let n): return n
        case .unpinned: return nil
        }
    }
}
