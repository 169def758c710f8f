#if canImport(Glibc)
import Glibc
#endif

/// A mutex with a condition variable, owned: the pthread objects live on the heap for the
/// object's lifetime (never addressed through `&` on a stored property), destroyed in deinit.
/// For threads that must sleep until another thread changes something, with a timeout.
public final class TimedCondition: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = .allocate(capacity: 1)
        cond = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    /// Runs `body` holding the lock.
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Wakes every waiter (after changing what they wait for).
    public func broadcast() {
        pthread_mutex_lock(mutex)
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(mutex)
    }

    /// Waits, without a timeout, until `done()` is true; `done` is evaluated under the lock.
    public func wait(until done: () -> Bool) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while !done() { pthread_cond_wait(cond, mutex) }
    }

    /// Waits until `done()` is true or `timeoutNanoseconds` have passed; `done` is evaluated
    /// under the lock. Returns `done()`'s last value.
    @discardableResult
    public func wait(timeoutNanoseconds: UInt64, until done: () -> Bool) -> Bool {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let end = UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec) + timeoutNanoseconds
        var deadline = timespec(tv_sec: Int(end / 1_000_000_000), tv_nsec: Int(end % 1_000_000_000))
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while !done() {
            if pthread_cond_timedwait(cond, mutex, &deadline) == ETIMEDOUT { return done() }
        }
        return true
    }
}
