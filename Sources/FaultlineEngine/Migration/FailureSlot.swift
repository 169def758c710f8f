import FaultlineLinux

/// The first failure of any thread of a migration (fault path, installers), for the main
/// thread to act on. Recording one also runs `onFailure` once (it wakes the main thread,
/// e.g. by shutting down the connection it is blocked on).
final class FailureSlot: @unchecked Sendable {
    private let slot = Locked<MigrationError?>(nil)
    var onFailure: (() -> Void)?

    func record(_ thread: String, _ error: Error) {
        let first = slot.withLock { current -> Bool in
            guard current == nil else { return false }
            current = .thread(thread, error)
            return true
        }
        if first { onFailure?() }
    }

    var failure: MigrationError? { slot.withLock { $0 } }
}
