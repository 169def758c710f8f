import ArgumentParser
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation

/// `faultline snapshot verify DIR`.
struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot", abstract: "Work with snapshots (`run --snapshot-to DIR` writes one).",
        subcommands: [Verify.self])

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check a snapshot without restoring it: manifest, size, every chunk's CRC32C and the memory digest.")
        @Argument(help: "The snapshot folder") var folder: String
        @Flag(help: "One JSON line") var json = false

        func run() throws {
            do {
                let snapshot = try Snapshot(folder: folder)
                let r = try snapshot.verify()
                if json {
                    print(try jsonLine(Merged(r, OutcomeFields(outcome: "verified", snapshot: folder))))
                } else {
                    print("snapshot \(folder) verified: \(r.pages) pages (\(r.dataPages) with data), \(r.chunks) chunks, "
                          + "\(snapshot.layout.vcpus) vCPU(s), \(snapshot.layout.ramSize >> 20) MiB RAM, \(r.seconds) s")
                }
            } catch {
                if json { printJSON(FailureReport(outcome: "refused", error: "\(error)")) }
                fail(error)
            }
        }
    }
}

/// `faultline restore DIR`, `faultline restore --from HOST:PORT`.
struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Restore a snapshot into a new guest and run it: lazily (pages on demand and in the background) or eagerly.")

    @Argument(help: "The snapshot folder (none with --from)") var folder: String?
    @OptionGroup var remote: RemoteRestoreArguments
    @Flag(help: "--lazy: start the vCPUs at once, fetch memory on demand; --eager: check and copy everything first")
    var lazy: RestoreMode = .lazy
    @Option(name: .customLong("fault-mode"), help: faultModeHelp) var faultMode: FaultModeChoice = .auto
    @Option(help: "single | per-vcpu (uffd modes)") var uffd: UffdTopology = .single
    @Option(help: "Reader threads per userfaultfd (uffd modes)") var readers = 1
    @Option(name: .customLong("fault-around"), help: faultAroundHelp) var faultAround = 16
    @Option(name: .customLong("fault-cpu"), help: faultCPUHelp) var faultCPU: FaultPathCPU = .automatic
    @Option(name: .customLong("run-after"), help: "Seconds the guest keeps running after every page is in") var runAfter = 1.0
    @Option(name: .customLong("record-working-set"), help: "Write the pages the guest touches, in first-touch order, to this file")
    var recordWorkingSet: String?
    @Option(name: .customLong("record-seconds"), help: "With --record-working-set: how long every touch is served on demand before the background fill starts")
    var recordSeconds = 3.0
    @Option(help: "Replay a working set recorded with --record-working-set: its pages are sent first, in order")
    var prefetch: String?
    @Flag(help: "One JSON line") var json = false
    @OptionGroup(title: "Clones") var clone: CloneArguments

    enum RestoreMode: String, EnumerableFlag { case lazy, eager }

    /// The working set `--prefetch` names, if any.
    func readPrefetch() throws -> WorkingSet? {
        guard let prefetch else { return nil }
        guard lazy == .lazy, remote.from == nil else { throw CLIError(description: "--prefetch needs a lazy restore of a local snapshot") }
        do {
            return try JSONDecoder().decode(WorkingSet.self, from: Data(contentsOf: URL(fileURLWithPath: prefetch)))
        } catch {
            throw CLIError(description: "cannot read the working set \(prefetch): \(error)")
        }
    }

    @OptionGroup(title: "Logging") var logging: LoggingArguments

    func run() {
        let started = MonotonicClock.nanoseconds()
        logging.apply()
        if clone.requested { return runClone(started: started) }
        do {
            try HeapPolicy.keepHeapForFaultPath()
            // The fault-mode probe (a one-page VM), when the mode needs it, runs while a local
            // snapshot is opened.
            var userfaultfdMode = false
            if case .explicit(let m) = faultMode { userfaultfdMode = m == .uffdMissing || m == .uffdMinor }
            let probing = userfaultfdMode ? nil : VcpuFaultProbe.startInBackground()
            let opened: Snapshot?
            let tables: ZeroFilledArena?
            let workingSet: WorkingSet?
            do {
                opened = try remote.from == nil ? folder.map { try Snapshot(folder: $0) } : nil
                // The new guest's tables are allocated meanwhile too, and a working set read.
                tables = opened.flatMap { MigrationDestination.tableArena(for: $0.layout) }
                workingSet = try readPrefetch()
            } catch {
                probing?.join()
                throw error
            }
            // vcpu-exit named: the new guest's build checks the probe (it is waited for only there,
            // and refuses what this kernel cannot do before anything runs); otherwise resolved now.
            let mode: FaultMode
            if case .explicit(.vcpuExit) = faultMode {
                mode = .vcpuExit
            } else {
                mode = try FaultModeSelection.resolve(requested: faultMode, option: "--fault-mode").mode
                probing?.join()
            }
            defer { probing?.join() }
            var options = SnapshotRestore.Options()
            options.lazy = lazy == .lazy
            options.destination.faultMode = mode
            options.destination.uffd = uffd
            options.destination.readers = readers
            options.destination.faultAround = faultAround
            options.destination.faultPathCPU = faultCPU
            options.destination.tableArena = tables
            options.destination.runAfterSeconds = runAfter
            options.source.faultPathCPU = faultCPU
            if recordWorkingSet != nil {
                guard lazy == .lazy, prefetch == nil, remote.from == nil else {
                    throw CLIError(description: "--record-working-set needs a lazy restore of a local snapshot, without --prefetch")
                }
                options.recordWorkingSetSeconds = recordSeconds
            }
            options.prefetch = workingSet
            let report = try remote.restore(folder: folder, opened: opened, options: options, started: started)
            if let recordWorkingSet, let set = report.workingSet {
                try Data(try jsonLine(set).utf8).write(to: URL(fileURLWithPath: recordWorkingSet))
                if !json { print("working set: \(set.pages.count) pages recorded in \(recordWorkingSet)") }
            }
            print(json ? try jsonLine(report) : report.text)
            if !report.digestMatch || !report.guestCheck {
                fputs("faultline: error: the restored guest's memory does not match the snapshot\n", stderr)
                Foundation.exit(1)
            }
        } catch {
            restoreFailed(error, json: json)
        }
    }
}
