import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// Where and how urgently the calling thread (or another thread, by its kernel id) runs:
/// CPU affinity, niceness and real-time FIFO scheduling. Linux applies all of these per
/// thread.
public enum ThreadScheduling {
    /// The kernel's id of the calling thread (gettid), as userfaultfd reports it.
    public static func currentThreadID() -> Int32 { fl_gettid() }

    /// Restricts the calling thread to `cpu` (sched_setaffinity).
    public static func pinCurrentThread(to cpu: Int32) throws(SystemError) {
        try systemCall("sched_setaffinity cpu \(cpu)") { fl_pin_current_thread(cpu) }
    }

    /// Lets thread `tid` run on every CPU the process may use except `cpu` (nil: every one);
    /// `cpu` stays allowed when it is the only one.
    public static func avoidCPU(_ cpu: Int32?, ofThread tid: Int32) throws(SystemError) {
        try systemCall("sched_setaffinity tid \(tid) avoiding cpu \(cpu.map(String.init) ?? "none")") {
            fl_thread_avoid_cpu(tid, cpu ?? -1)
        }
    }

    /// Whether thread `tid` may run on `cpu`.
    public static func allows(_ cpu: Int32, thread tid: Int32) throws(SystemError) -> Bool {
        let rc = fl_thread_allows_cpu(tid, cpu)
        if rc < 0 { throw SystemError("sched_getaffinity tid \(tid)", errno: fl_errno()) }
        return rc == 1
    }

    /// Gives the CPU up to another runnable thread (a short wait for another thread's step).
    public static func yield() { _ = sched_yield() }

    /// How many CPUs this process may run on (at least 1).
    public static func allowedCPUCount() -> Int { max(Int(fl_allowed_cpu_count()), 1) }

    /// The highest-numbered CPU the calling thread may run on, or nil.
    public static func lastAllowedCPU() -> Int32? {
        let cpu = fl_last_allowed_cpu()
        return cpu >= 0 ? cpu : nil
    }

    /// The CPU the calling thread runs on now (sched_getcpu), or nil.
    public static func currentCPU() -> Int32? {
        let cpu = fl_current_cpu()
        return cpu >= 0 ? cpu : nil
    }

    /// Asks for SCHED_FIFO at `priority` for the calling thread (needs CAP_SYS_NICE).
    public static func requestRealtimeFIFO(priority: Int32 = 1) throws(SystemError) {
        var param = sched_param(sched_priority: priority)
        let rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &param)
        if rc != 0 { throw SystemError("pthread_setschedparam SCHED_FIFO \(priority)", errno: rc) }
    }

    /// Puts thread `tid` under SCHED_FIFO at `priority` (`realtime`, needs CAP_SYS_NICE) or
    /// back under SCHED_OTHER (its niceness is kept).
    public static func setRealtimeFIFO(_ realtime: Bool, ofThread tid: Int32, priority: Int32 = 1) throws(SystemError) {
        var param = sched_param(sched_priority: realtime ? priority : 0)
        try systemCall("sched_setscheduler tid \(tid) \(realtime ? "SCHED_FIFO" : "SCHED_OTHER")") {
            sched_setscheduler(tid, realtime ? SCHED_FIFO : SCHED_OTHER, &param)
        }
    }

    /// Sets the niceness of thread `tid` (setpriority by tid; negative needs privilege).
    public static func setNiceness(_ value: Int32, ofThread tid: Int32) throws(SystemError) {
        try systemCall("setpriority tid \(tid) to \(value)") {
            setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(tid), value)
        }
    }

    /// Sets the niceness of the calling thread.
    public static func setCurrentNiceness(_ value: Int32) throws(SystemError) {
        try setNiceness(value, ofThread: currentThreadID())
    }
}
