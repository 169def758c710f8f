import CFaultlineShim
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
    /// With `cpu`, the thread runs on that CPU only (refused, e.g. by a cpuset: it runs unpinned).
    /// With `avoidingCPU`, the thread starts on the other CPUs the process may use (moving a
    /// running thread off a CPU waits for that CPU's stopper thread).
    public init(name: String, stackSize: Int = 1 << 20, niceness: Int32 = 0, cpu: Int32? = nil, avoidingCPU: Int32? = nil,
                _ body: @escaping () -> Void) throws(SystemError) {
        // The kernel's thread name (15 bytes; `top -H`, perf and /proc show it).
        let shortName = String(decoding: Array(name.utf8.prefix(15)), as: UTF8.self)
        // The new thread settles before `init` returns: named, pinned (a move to another CPU
        // waits for that CPU's migration thread), at its priority, with its allocator arena
        // (glibc maps one on a thread's first allocation). Each of these costs time and most
        // take the mmap lock for writing; started at a switch-over, none of it may happen once
        // the guest runs and faults (see HeapPolicy).
        let settled = TimedCondition()
        var startedID: Int32 = 0
        let run: () -> Void = {
            _ = fl_set_current_thread_name(shortName)
            if let cpu { try? ThreadScheduling.pinCurrentThread(to: cpu) }
            if niceness != 0 { OSThread.setCurrentNiceness(niceness) }
            fl_malloc_warm_thread()
            let tid = ThreadScheduling.currentThreadID()
            settled.withLock { startedID = tid }
            settled.broadcast()
            body()
        }
        let box = Unmanaged.passRetained(Box(run)).toOpaque()
        let rc = fl_thread_create(&thread, stackSize, avoidingCPU ?? -1, { arg in
            let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        if rc != 0 {
            Unmanaged<Box>.fromOpaque(box).release()
            throw SystemError("pthread_create \(name)", errno: rc)
        }
        settled.wait { startedID != 0 }
        threadID = settled.withLock { startedID }
    }

    /// The kernel's id of the thread (gettid), known once `init` has returned.
    public private(set) var threadID: Int32 = 0

    public func join() { pthread_join(thread, nil) }

    /// Sets the calling thread's niceness (Linux: per thread, by tid). The fault path asks
    /// for real-time FIFO scheduling first (it blocks on its socket or uffd almost always and
    /// must preempt the bulk stream at once); without the privilege it gets nice -10.
    /// Refusals are quiet (see `init`).
    public static func setCurrentNiceness(_ value: Int32) {
        if value == Niceness.faultPath, (try? ThreadScheduling.requestRealtimeFIFO(priority: 1)) != nil { return }
        try? ThreadScheduling.setCurrentNiceness(value)
    }

    /// Scheduling priorities of Faultline's threads during post-copy.
    public enum Niceness {
        /// Fault server, fault receiver, uffd readers: a fault never waits behind bulk data.
        public static let faultPath: Int32 = -10
        /// vCPU threads while their memory is still arriving: the lowest priority, so that on
        /// a host without spare CPUs the page stream the guest waits for goes first. Higher, a
        /// guest walking memory gets enough CPU to run ahead of the stream and fault on page
        /// after page, and those faults (each far dearer than a streamed page) starve the
        /// stream: a fault storm (docs/design.md, "Post-copy").
        public static let vcpuDuringPostcopy: Int32 = 19
        /// A vCPU thread while it waits for a page it faulted on (vcpu-exit): woken, it must
        /// run at once, not after the stream's threads have had their slices.
        public static let vcpuWaitingForPage: Int32 = -10
        /// The destination's post-copy installer thread (maps what the bulk stream brought):
        /// ahead of the stream's other threads, behind the fault path. A vCPU whose page it has
        /// claimed waits for it (uffd-minor: installs are exclusive), so it must not sit
        /// preempted in the middle of a run behind the stream's nice-0 threads.
        public static let postcopyInstaller: Int32 = -5
    }
}
