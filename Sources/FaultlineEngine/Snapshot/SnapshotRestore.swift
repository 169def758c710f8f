import FaultlineCore
import FaultlineLinux

/// Restores a snapshot into a new guest: a migration whose source is the snapshot
/// (``SnapshotMachine``), served from this process over loopback or by a `serve-snapshot`
/// server that dials back (the same new guest, the same report, either way). Lazy: the vCPUs
/// start as soon as their state is loaded and the snapshot's pages arrive on demand (in the
/// destination's fault mode) and in a background fill. Eager: every page is copied before
/// the vCPUs start (stop-and-copy), the baseline; a local eager restore checks every chunk
/// first, a server checks every snapshot before it serves it.
public enum SnapshotRestore {
    public struct Options: Sendable {
        public var lazy = true
        /// The new guest's side: fault mode, fault-around, run time after the restore ...
        /// (`listen` is ignored: the new guest listens on a port it picks, on loopback for a
        /// local restore, on its address on the control connection for a remote one).
        public var destination: DestinationOptions
        /// How a local snapshot is served (batch size, the fault-path CPU ...); a server uses its own.
        public var source: MigrationOptions
        /// Sessions the snapshot side may start after one that failed before the commit.
        public var retries = 0
        /// How long the new guest waits for the snapshot side's connections (and, after an
        /// attempt failed before the commit, for its next one).
        public var acceptSeconds = 30.0
        /// Remote: how long to wait for the server's answer (it checks the snapshot first).
        public var answerSeconds = 120.0
        /// Given where the new guest listens, where the snapshot side should connect instead:
        /// something in between (the chaos proxy). Nil: straight to the new guest.
        public var dialThrough: (@Sendable (SocketEndpoint) throws -> SocketEndpoint)?
        /// Record the pages the guest touches, in first-touch order (``RestoreReport/workingSet``):
        /// the background fill waits this many seconds so that every first touch faults, and
        /// each fault asks for its page alone.
        public var recordWorkingSetSeconds: Double?
        /// Replay a recorded working set: the background fill sends its pages first, in order.
        public var prefetch: WorkingSet?
        /// Local restores: the background fill is read by the new guest's side from the file,
        /// not streamed over loopback (the default; off: exactly a migration from the snapshot).
        public var localFill = true

        public init() {
            let loopback = SocketEndpoint(host: "127.0.0.1", port: 0)
            destination = DestinationOptions(listen: loopback)
            source = MigrationOptions(destination: loopback)
        }
    }

    /// Restores the snapshot `snapshot` from this process. `started`: the monotonic time the
    /// restore counts from (the command's start).
    public static func run(_ snapshot: Snapshot, options: Options, started: UInt64) throws -> RestoreReport {
        var verifySeconds: Double?
        if !options.lazy {
            verifySeconds = try snapshot.verify().seconds  // nothing is installed from a snapshot that fails
        }
        let machine = SnapshotMachine(snapshot: snapshot)
        var sourceOptions = options.source
        sourceOptions.retries = options.retries
        var local = LocalSetup(machine: machine, layout: snapshot.layout)
        // The background fill read here too, unless a recording needs the source's held stream.
        local.fill = options.localFill && options.recordWorkingSetSeconds == nil
        sourceOptions.noBackgroundStream = local.fill
        if let seconds = options.recordWorkingSetSeconds {
            local.recordFirstTouches = true
            sourceOptions.streamDelaySeconds = seconds
        }
        if let prefetch = options.prefetch {
            try prefetch.validate(for: snapshot.manifest)
            sourceOptions.streamFirst = prefetch.pages
            local.fillFirst = prefetch.pages
        }
        let feed = LocalSnapshotFeed(machine: machine, sourceOptions: sourceOptions)
        var report = try run(feed, options: options, started: started, verifySeconds: verifySeconds, local: local)
        if options.recordWorkingSetSeconds != nil {
            report.workingSet = WorkingSet(snapshotDigest: snapshot.manifest.memoryDigest, pages: report.firstTouches)
        }
        report.prefetchPages = options.prefetch?.pages.count
        return report
    }

    /// What a restore in the snapshot's own process adds to the new guest: faults and the
    /// background fill read from the file on this side, the guest built before the snapshot
    /// side's hello, and the working-set recording.
    struct LocalSetup {
        let machine: SnapshotMachine
        let layout: MachineLayout
        var fill = true
        var fillFirst: [Int] = []
        var recordFirstTouches = false
    }

    /// Restores the snapshot a `serve-snapshot` server at `server` serves: its folder, or the
    /// snapshot folder `name` inside it. The server is asked over a control connection and
    /// dials back to the new guest.
    public static func run(from server: SocketEndpoint, snapshot name: String?, options: Options,
                           started: UInt64) throws -> RestoreReport {
        let feed = try RemoteSnapshotFeed(server: server, name: name, retries: options.retries,
                                          answerSeconds: options.answerSeconds)
        var report = try run(feed, options: options, started: started, verifySeconds: nil, local: nil)
        report.from = "\(server)"
        return report
    }

    static func run(_ feed: SnapshotFeed, options: Options, started: UInt64, verifySeconds: Double?,
                    local: LocalSetup?) throws -> RestoreReport {
        var destinationOptions = options.destination
        destinationOptions.listen = SocketEndpoint(host: feed.listenHost, port: 0)
        destinationOptions.acceptSeconds = options.acceptSeconds
        if let local {
            destinationOptions.localPages = local.machine  // faults read the file on their own thread
            destinationOptions.localFill = local.fill
            destinationOptions.localFillFirst = local.fillFirst
            if local.recordFirstTouches {
                destinationOptions.recordFirstTouches = true
                destinationOptions.faultAround = 1  // every page its own fault: none arrives unasked
            }
        }
        let destination = try MigrationDestination(options: destinationOptions)
        let dial = try options.dialThrough?(destination.endpoint) ?? destination.endpoint
        let stoppedWaiting = Locked(false)
        let served = try feed.start(dialing: dial, lazy: options.lazy) { [destination] final in
            // The snapshot side gave up: no retry will come, so the new guest stops waiting for
            // one. A control connection lost after the start leaves the resume window open.
            if final || !destination.guestHasStarted {
                stoppedWaiting.withLock { $0 = true }
                destination.stopAccepting()
            }
        }
        var report = RestoreReport(snapshot: feed.label, mode: options.lazy ? "lazy" : "eager",
                                   faultMode: options.destination.faultMode.description, vcpus: served.vcpus,
                                   memoryBytes: served.ramBytes, snapshotDataPages: served.dataPages)
        report.verifySeconds = verifySeconds
        let destinationReport: DestinationReport
        do {
            destinationReport = try destination.run(expecting: local?.layout)
        } catch {
            let side = feed.finish(waitingSeconds: 10)
            let started = destination.guestHasStarted
            guard let sideError = side?.error else { throw RestoreFailed(cause: error, destination: nil, guestStarted: started) }
            // The snapshot side's cause (a corrupt chunk, say) is the one worth naming; the new
            // guest's own error adds nothing when it is only its wait for the snapshot side ended.
            let waitEnded = !started && stoppedWaiting.withLock { $0 }
            throw RestoreFailed(cause: sideError, destination: waitEnded ? nil : error, guestStarted: started)
        }
        let side = feed.finish(waitingSeconds: 10)
        if let error = side?.error, !(error is ControlConnectionLost) {
            throw RestoreFailed(cause: error, destination: nil, guestStarted: true)
        }
        report.fill(destination: destinationReport, sourceReconnects: side?.reconnects ?? 0, started: started)
        // The restored memory must be the snapshot as written: the source's digest (of the
        // pages it sent) must be the manifest's too, not only the new guest's.
        report.snapshotDigest = served.memoryDigest
        report.digestMatch = destinationReport.digestMatch && destinationReport.sourceDigest == served.memoryDigest
        return report
    }
}

/// A restore that failed; `cause` is the snapshot side's reason (or the new guest's when the
/// snapshot side had none), `destination` the new guest's, `guestStarted` whether the new
/// guest had run (then it was stopped; before, nothing of it ran).
public struct RestoreFailed: Error, CustomStringConvertible {
    public let cause: Error
    public let destination: Error?
    public let guestStarted: Bool

    public init(cause: Error, destination: Error?, guestStarted: Bool) {
        self.cause = cause
        self.destination = destination
        self.guestStarted = guestStarted
    }

    public var description: String {
        "restore failed \(guestStarted ? "after the restored guest started (it was stopped)" : "before the restored guest started"): "
            + "\(cause)" + (destination.map { "; the new guest's side: \($0)" } ?? "")
    }
}
