import Synchronization

/// A value behind a `Synchronization.Mutex`, as a class other modules can share between
/// threads (the engine uses swift-atomics, whose names clash with Synchronization's, so it
/// reaches the mutex through here).
public final class Locked<Value>: @unchecked Sendable {
    private let mutex: Mutex<Value>

    public init(_ value: sending Value) { mutex = Mutex(value) }

    /// Runs `body` with exclusive access to the value.
    public func withLock<T>(_ body: (inout sending Value) throws -> sending T) rethrows -> sending T {
        try mutex.withLock(body)
    }

    /// Runs `body` with exclusive access when no other thread holds it; nil (without running
    /// `body`) when one does.
    public func withLockIfAvailable<T>(_ body: (inout sending Value) throws -> sending T) rethrows -> sending T? {
        try mutex.withLockIfAvailable(body)
    }
}
