import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// The vCPU "kick": a real-time signal whose handler does nothing, installed without
/// SA_RESTART, so a KVM_RUN blocked in the guest returns EINTR. vCPU threads unblock it
/// (`Vcpu.bindToCurrentThread`); threads that must never see it (uffd readers) block it.
public enum KickSignal {
    /// Installs the handler (once per process; later calls return the same signal).
    @discardableResult
    public static func install() throws(SystemError) -> Int32 {
        try systemCall("sigaction kick signal") { fl_kick_signal_install() }
    }

    /// Blocks the kick signal in the calling thread (after `install`).
    public static func blockInCurrentThread() throws(SystemError) { try setBlocked(true) }

    /// Unblocks the kick signal in the calling thread (after `install`).
    public static func unblockInCurrentThread() throws(SystemError) { try setBlocked(false) }

    private static func setBlocked(_ block: Bool) throws(SystemError) {
        let rc = fl_kick_signal_block(block ? 1 : 0)
        if rc != 0 { throw SystemError("pthread_sigmask \(block ? "block" : "unblock") kick signal", errno: rc) }
    }

    /// Sends the kick signal to `thread`.
    static func send(to thread: pthread_t) throws(SystemError) {
        let rc = fl_kick_thread(thread)
        if rc != 0 { throw SystemError("pthread_kill kick signal", errno: rc) }
    }

    /// The calling thread, as `send(to:)` addresses it.
    static func currentThread() -> pthread_t { pthread_self() }
}
