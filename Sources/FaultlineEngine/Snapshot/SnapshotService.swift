import Atomics
import FaultlineCore
import FaultlineLinux

/// A snapshot server (`serve-snapshot`): it listens for restore requests on control
/// connections and serves each accepted one as a migration source - a ``SnapshotMachine``,
/// post-copy (lazy) or stop-and-copy (eager), no pre-copy - that dials back to the restorer
/// (docs/protocol.md, "The snapshot service"). One thread per request, so restores run side
/// by side; whatever happens to one (a refusal, a cut, a failure) ends that one only.
public final class SnapshotService: @unchecked Sendable {
    public struct Options: Sendable {
        public var listen: SocketEndpoint
        /// A snapshot folder (requests without a name), or a folder of snapshot folders
        /// (requests naming one), or both.
        public var folder: String
        /// The source side of every restore (fault-path CPU, batch size, timeouts, reconnect
        /// window); the destination, pre-copy, post-copy and retries come from each request.
        public var source: MigrationOptions
        /// How long a new connection may take to send its request.
        public var requestSeconds = 10.0
        /// Restores served at once; a request beyond them is refused.
        public var maxRestores = 16

        public init(folder: String, listen: SocketEndpoint) {
            self.folder = folder
            self.listen = listen
            source = MigrationOptions(destination: listen)
        }
    }

    public let options: Options
    let listener: ListeningSocket
    let library: SnapshotLibrary
    private let stopping = ManagedAtomic<Bool>(false)
    private let requestCount = ManagedAtomic<Int>(0)
    private let running = Locked<[Int: OSThread]>([:])
    private let finished = Locked<[Int]>([])
    /// Called on each request's own thread as it ends, with its record.
    private let onEnded: (@Sendable (ServedRestore) -> Void)?

    public init(options: Options, onRequestEnded: (@Sendable (ServedRestore) -> Void)? = nil) throws {
        self.options = options
        library = SnapshotLibrary(folder: options.folder)
        listener = try ListeningSocket(endpoint: options.listen)
        onEnded = onRequestEnded
    }

    /// Where it listens (the port actually bound for port 0).
    public var endpoint: SocketEndpoint { listener.endpoint }

    /// When the folder is a snapshot itself: checks it now, so the first restore does not wait
    /// for the check, and says how it went. Nil for a folder that only holds snapshots.
    public func checkFolderSnapshot() -> Result<ServedSnapshot, Error>? {
        guard FileSystem.exists(options.folder + "/" + SnapshotManifest.manifestFileName) else { return nil }
        return Result { SnapshotServing.summary(of: try library.snapshot(at: options.folder), name: folderName) }
    }

    var folderName: String { String(options.folder.split(separator: "/").last ?? Substring(options.folder)) }

    /// Accepts requests until ``stop()``, each on a thread of its own.
    public func serve() {
        while !stopping.load(ordering: .relaxed) {
            reapFinished()
            let socket: StreamSocket?
            do {
                socket = try listener.accept(timeoutSeconds: 1)
            } catch {
                if stopping.load(ordering: .relaxed) { return }
                FaultlineLog.warn("snapshot server: accept failed: \(error)")
                MonotonicClock.sleep(microseconds: 100_000)  // e.g. out of file descriptors: do not spin
                continue
            }
            guard let socket else { continue }
            reapFinished()
            let id = requestCount.wrappingIncrementThenLoad(ordering: .relaxed)
            let busy = running.withLock { $0.count } >= options.maxRestores
            do {
                let thread = try OSThread(name: "restore \(id)") { [self] in
                    handle(ServiceChannel(socket: socket), id: id, busy: busy)
                    finished.withLock { $0.append(id) }
                }
                running.withLock { $0[id] = thread }
            } catch {
                let channel = ServiceChannel(socket: socket)
                try? channel.send(RestoreAnswer.refused("the server cannot start a thread for the restore: \(error)"))
                channel.close()
            }
        }
    }

    /// Stops accepting and waits for the restores being served (each ends within its own
    /// timeouts: the peer timeout before the commit, the reconnect window after it).
    public func stop() {
        stopping.store(true, ordering: .relaxed)
        listener.shutdown()
        for thread in running.withLock({ all in let threads = Array(all.values); all = [:]; return threads }) { thread.join() }
    }

    private func reapFinished() {
        for id in finished.withLock({ ids in let done = ids; ids = []; return done }) {
            running.withLock { $0.removeValue(forKey: id) }?.join()
        }
    }

    // MARK: one request

    func handle(_ channel: ServiceChannel, id: Int, busy: Bool) {
        let t0 = MonotonicClock.nanoseconds()
        var record = ServedRestore(id: id, peer: channel.socket.peer)
        defer {
            channel.close()
            record.seconds = Double(MonotonicClock.nanoseconds() - t0) / 1e9
            onEnded?(record)
        }
        func refuse(_ reason: String) {
            record.outcome = "refused"
            record.error = reason
            try? channel.send(RestoreAnswer.refused(reason))
        }
        let request: RestoreRequest
        do {
            guard let payload = try channel.receivePayload(seconds: options.requestSeconds) else {
                return refuse("the connection closed without a request")
            }
            try ServiceChannel.decode(ServiceEnvelope.self, payload, what: "not a request").check()
            request = try ServiceChannel.decode(RestoreRequest.self, payload, what: "not a restore request")
            try request.validate()
        } catch {
            return refuse("\(error)")
        }
        record.snapshot = request.snapshot ?? folderName
        if busy { return refuse("the server is already serving \(options.maxRestores) restores") }
        let snapshot: Snapshot
        do {
            snapshot = try library.snapshot(at: try library.path(for: request.snapshot))
        } catch {
            return refuse("snapshot '\(record.snapshot ?? "")' cannot be served: \(error)")
        }
        guard let peerHost = channel.socket.peerHost else { return refuse("the request's address is unknown") }
        do {
            try channel.send(RestoreAnswer.accepted(SnapshotServing.summary(of: snapshot, name: record.snapshot ?? folderName)))
        } catch {
            record.outcome = "failed"
            record.error = "the answer could not be sent: \(error)"
            return
        }
        let restorer = SocketEndpoint(host: peerHost, port: UInt16(request.dialBackPort))
        let sourceOptions = SnapshotServing.sourceOptions(options.source, dialing: restorer, lazy: request.lazy,
                                                          retries: request.retries)
        let end: RestoreEnd
        do {
            let report = try SourceMigration.run(SnapshotMachine(snapshot: snapshot), options: sourceOptions).1
            end = RestoreEnd(outcome: "completed", committed: true, error: nil, reconnects: report.reconnects,
                             demandPages: report.demandPages, backgroundPages: report.backgroundPages,
                             failedAttempts: report.failedAttempts)
        } catch let failed as MigrationFailedBeforeSwitchover {
            let causes = failed.causes.enumerated().map { "session \($0.offset + 1): \($0.element)" }.joined(separator: "; ")
            end = RestoreEnd(outcome: "failed", committed: false, error: "every session failed before the commit (\(causes))",
                             reconnects: 0, demandPages: 0,
                             backgroundPages: 0, failedAttempts: failed.causes)
        } catch {
            end = RestoreEnd(outcome: "failed", committed: true, error: "\(error)", reconnects: 0, demandPages: 0,
                             backgroundPages: 0, failedAttempts: [])
        }
        try? channel.send(end)  // the restorer may be gone; its guest's fate does not depend on this
        record.mode = request.mode
        record.outcome = end.outcome
        record.error = end.error
        record.committed = end.committed
        record.reconnects = end.reconnects
        record.demandPages = end.demandPages
        record.backgroundPages = end.backgroundPages
        record.failedAttempts = end.failedAttempts
    }
}

/// One request as the server saw it (`serve-snapshot --json` prints one line per request).
public struct ServedRestore: Sendable, Codable, Equatable {
    public var id: Int
    public var peer: String
    public var snapshot: String?
    public var mode: String?
    /// "completed", "failed" (after it was accepted) or "refused" (nothing was served).
    public var outcome = "refused"
    public var error: String?
    /// The server committed: the restorer's guest may have run.
    public var committed = false
    public var seconds = 0.0
    public var reconnects = 0
    public var demandPages = 0
    public var backgroundPages = 0
    public var failedAttempts: [String] = []

    public init(id: Int, peer: String) {
        self.id = id
        self.peer = peer
    }

    enum CodingKeys: String, CodingKey {
        case id = "request", peer, snapshot, mode, outcome, error, committed, seconds, reconnects
        case demandPages = "demand_pages", backgroundPages = "background_pages", failedAttempts = "failed_attempts"
    }
}
