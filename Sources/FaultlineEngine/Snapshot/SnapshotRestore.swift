import FaultlineCore
import FaultlineLinux

/// Restores a snapshot into a new guest: a migration whose source is the snapshot
/// (``SnapshotMachine``), run inside this process over loopback. Lazy: the vCPUs start as
/// soon as their state is loaded and the snapshot's pages arrive on demand (in the
/// destination's fault mode) and in a background fill. Eager: every chunk is checked, then
/// every page is copied before the vCPUs start (stop-and-copy), the baseline.
public enum SnapshotRestore {
    public struct Options: Sendable {
        public var lazy = true
        /// The new guest's side: fault mode, fault-around, run time after the restore ...
        /// (`listen` is ignored: the restore listens on loopback, on a port it picks).
        public var destination: DestinationOptions
        /// How the snapshot is served (batch size, the fault-path CPU ...).
        public var source: MigrationOptions
        /// Record the pages the guest touches, in first-touch order (``RestoreReport/workingSet``):
        /// the background fill waits this many seconds so that every first touch faults, and
        /// each fault asks for its page alone.
        public var recordWorkingSetSeconds: Double?
        /// Replay a recorded working set: the background fill sends its pages first, in order.
        public var prefetch: WorkingSet?
        /// The background fill read by the new guest's side from the file, not streamed over
        /// loopback (the default; off: the restore is exactly a migration from the snapshot).
        public var localFill = true

        public init() {
            let loopback = SocketEndpoint(parsing: "127.0.0.1:0")!
            destination = DestinationOptions(listen: loopback)
            source = MigrationOptions(destination: loopback)
        }
    }

    /// `started`: the monotonic time the restore counts from (the command's start).
    public static func run(_ snapshot: Snapshot, options: Options, started: UInt64) throws -> RestoreReport {
        var report = RestoreReport(snapshot: snapshot.folder, mode: options.lazy ? "lazy" : "eager",
                                   faultMode: options.destination.faultMode.description, vcpus: snapshot.layout.vcpus,
                                   memoryBytes: snapshot.layout.ramSize, snapshotDataPages: snapshot.manifest.dataPages)
        if !options.lazy {
            let verified = try snapshot.verify()  // nothing is installed from a snapshot that fails
            report.verifySeconds = verified.seconds
        }
        let machine = SnapshotMachine(snapshot: snapshot)
        var destinationOptions = options.destination
        var sourceOptions = options.source
        destinationOptions.listen = SocketEndpoint(parsing: "127.0.0.1:0")!
        destinationOptions.acceptSeconds = 30
        destinationOptions.localPages = machine  // faults read the file on their own thread
        // The background fill read here too, unless a recording needs the source's held stream.
        let localFill = options.localFill && options.recordWorkingSetSeconds == nil
        destinationOptions.localFill = localFill
        sourceOptions.noBackgroundStream = localFill
        if let seconds = options.recordWorkingSetSeconds {
            destinationOptions.recordFirstTouches = true
            destinationOptions.faultAround = 1  // every page its own fault: none arrives unasked
            sourceOptions.streamDelaySeconds = seconds
        }
        if let prefetch = options.prefetch {
            try prefetch.validate(for: snapshot.manifest)
            sourceOptions.streamFirst = prefetch.pages
            destinationOptions.localFillFirst = prefetch.pages
            report.prefetchPages = prefetch.pages.count
        }
        sourceOptions.precopyRounds = 0
        sourceOptions.retries = 0
        sourceOptions.progress = false
        if options.lazy {
            sourceOptions.postcopy = .always
        } else {
            sourceOptions.immediateStopAndCopy = "eager restore: every page before the vCPUs start"
        }
        let destination = try MigrationDestination(options: destinationOptions)
        sourceOptions.destination = destination.endpoint
        let sourceOutcome = Locked<Result<SourceReport, Error>?>(nil)
        var sourceThread: OSThread?
        let destinationReport: DestinationReport
        do {
            destinationReport = try destination.run(expecting: snapshot.layout) { _ in
                sourceThread = try? OSThread(name: "snapshot server") {
                    let outcome = Result { try SourceMigration.run(machine, options: sourceOptions).1 }
                    sourceOutcome.withLock { $0 = outcome }
                    // The snapshot side gave up (a corrupt chunk found before the vCPUs started):
                    // there is no one to retry, so the new guest's side stops waiting for it.
                    if case .failure = outcome { destination.stopAccepting() }
                }
            }
        } catch {
            sourceThread?.join()
            // The snapshot side's cause (a corrupt chunk, say) is the one worth naming.
            if case .failure(let sourceError)? = sourceOutcome.withLock({ $0 }) { throw RestoreFailed(cause: sourceError, destination: error) }
            throw error
        }
        sourceThread?.join()
        let sourceReport: SourceReport
        switch sourceOutcome.withLock({ $0 }) {
        case .success(let r)?: sourceReport = r
        case .failure(let e)?: throw e
        case nil: throw RestoreFailed(cause: MigrationError.protocolViolation("the snapshot server did not start"), destination: nil)
        }
        report.fill(destination: destinationReport, source: sourceReport, started: started)
        if options.recordWorkingSetSeconds != nil {
            report.workingSet = WorkingSet(snapshotDigest: snapshot.manifest.memoryDigest, pages: destinationReport.firstTouches)
        }
        return report
    }
}

/// A restore that failed; `cause` is the snapshot side's reason, `destination` the new guest's.
public struct RestoreFailed: Error, CustomStringConvertible {
    public let cause: Error
    public let destination: Error?
    public var description: String {
        "restore failed: \(cause)" + (destination.map { "; the new guest was stopped (\($0))" } ?? "")
    }
}
