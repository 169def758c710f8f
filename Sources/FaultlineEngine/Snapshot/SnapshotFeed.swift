import FaultlineCore
import FaultlineLinux

/// The snapshot side of a restore: whatever serves the snapshot as a migration source to
/// the new guest, which listens. ``SnapshotRestore`` runs the new guest the same way for
/// every feed: a snapshot in this process (``LocalSnapshotFeed``) or one a `serve-snapshot`
/// server serves (``RemoteSnapshotFeed``).
protocol SnapshotFeed: AnyObject {
    /// Where the snapshot is, for the report (a folder, or server and name).
    var label: String { get }
    /// The address the new guest listens on, so that this feed can reach it.
    var listenHost: String { get }
    /// Starts serving a restore to `endpoint` and returns what is being restored. Throws when
    /// the snapshot is refused (nothing has been sent then). `onGaveUp` is called once, on any
    /// thread, when the snapshot side stopped without completing (`final`: it said so itself;
    /// false: it can no longer be heard from, but may still be serving): a new guest still
    /// waiting for it then stops waiting.
    func start(dialing endpoint: SocketEndpoint, lazy: Bool, onGaveUp: @escaping @Sendable (_ final: Bool) -> Void) throws -> ServedSnapshot
    /// Waits for the snapshot side to end, at most `seconds`: how it ended (nil: not yet).
    func finish(waitingSeconds seconds: Double) -> FeedOutcome?
}

/// How the snapshot side of a restore ended.
struct FeedOutcome {
    /// Nil when it completed (the new guest's digest was confirmed).
    var error: Error?
    var reconnects = 0
}

/// A snapshot served from this process: ``SourceMigration`` over ``SnapshotMachine`` on a
/// thread of its own, dialing the new guest on loopback.
final class LocalSnapshotFeed: SnapshotFeed, @unchecked Sendable {
    let machine: SnapshotMachine
    let sourceOptions: MigrationOptions
    private var thread: OSThread?
    private let outcome = Locked<FeedOutcome?>(nil)
    var snapshot: Snapshot { machine.snapshot }

    init(machine: SnapshotMachine, sourceOptions: MigrationOptions) {
        self.machine = machine
        self.sourceOptions = sourceOptions
    }

    var label: String { snapshot.folder }
    var listenHost: String { "127.0.0.1" }

    func start(dialing endpoint: SocketEndpoint, lazy: Bool, onGaveUp: @escaping @Sendable (_ final: Bool) -> Void) throws -> ServedSnapshot {
        let options = SnapshotServing.sourceOptions(sourceOptions, dialing: endpoint, lazy: lazy, retries: 0)
        thread = try OSThread(name: "snapshot server") { [outcome, machine] in
            let ended: FeedOutcome
            do {
                let report = try SourceMigration.run(machine, options: options).1
                ended = FeedOutcome(error: nil, reconnects: report.reconnects)
            } catch {
                ended = FeedOutcome(error: error)
            }
            outcome.withLock { $0 = ended }
            if ended.error != nil { onGaveUp(true) }
        }
        return SnapshotServing.summary(of: snapshot, name: snapshot.folder)
    }

    func finish(waitingSeconds seconds: Double) -> FeedOutcome? {
        thread?.join()  // the source's own timeouts bound it (peer timeout, reconnect window)
        thread = nil
        return outcome.withLock { $0 }
    }
}

/// What serving a snapshot as a migration source means, for both feeds and the server.
enum SnapshotServing {
    /// The source options of a restore: no pre-copy; lazy = post-copy, eager = stop-and-copy
    /// of every page before the new guest starts; `retries` new sessions after a failure
    /// before the commit.
    static func sourceOptions(_ template: MigrationOptions, dialing endpoint: SocketEndpoint, lazy: Bool,
                              retries: Int) -> MigrationOptions {
        var options = template
        options.destination = endpoint
        options.precopyRounds = 0
        options.retries = retries
        options.retryDelaySeconds = min(options.retryDelaySeconds, 0.2)
        options.progress = nil
        if lazy {
            options.postcopy = .always
        } else {
            options.immediateStopAndCopy = "eager restore: every page before the vCPUs start"
        }
        return options
    }

    static func summary(of snapshot: Snapshot, name: String) -> ServedSnapshot {
        let m = snapshot.manifest
        return ServedSnapshot(name: name, vcpus: m.vcpuCount, ramBytes: m.ramSize, guestMode: m.guestMode,
                              totalPages: m.totalPages, dataPages: m.dataPages, memoryDigest: m.memoryDigest)
    }
}
