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

    /// Starts `body` on a new thread with `stackSize` bytes of stack.
    public init(name: String, stackSize: Int = 1 << 20, _ body: @escaping () -> Void) throws(SystemError) {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
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
}

