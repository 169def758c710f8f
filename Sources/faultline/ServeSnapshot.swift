import ArgumentParser
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation

/// `faultline serve-snapshot DIR --listen HOST:PORT`: serves snapshots to `restore --from`.
struct ServeSnapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-snapshot",
        abstract: "Serve snapshots over the network to `faultline restore --from HOST:PORT`, until stopped.",
        discussion: """
        DIR is a snapshot folder (a request without --snapshot gets it) or a folder of snapshot \
        folders (a request names one), or both. Each snapshot is checked in full (every chunk's \
        CRC32C and the memory digest) the first time it is asked for and again whenever its files \
        change; one that fails is refused with the reason. An accepted request is served as a \
        migration source that dials back to the restorer: lazily (post-copy) or eagerly, as it asks.
        """)

    @Argument(help: "The snapshot folder, or a folder of snapshot folders") var folder: String
    @Option(help: "HOST:PORT to listen on (port 0 picks one; it is printed)") var listen = "0.0.0.0:7078"
    @Option(name: .customLong("fault-cpu"), help: faultCPUHelp) var faultCPU: FaultPathCPU = .automatic
    @Option(name: .customLong("reconnect-seconds"), help: "How long a restore may take to reconnect after a cut connection")
    var reconnectSeconds = 30.0
    @Option(name: .customLong("max-restores"), help: "Restores served at once (a request beyond them is refused)")
    var maxRestores = 16
    @Flag(help: "One JSON line per request (after the `listening on` line)") var json = false
    /// Holds each restore's background stream this long after the commit: every page asked for
    /// meanwhile is served on demand (tests force that path with it).
    @Option(name: .customLong("stream-delay-seconds"), help: .hidden) var streamDelaySeconds = 0.0

    @OptionGroup(title: "Logging") var logging: LoggingArguments

    func run() {
        logging.apply()
        do {
            try HeapPolicy.keepHeapForFaultPath()
            guard let endpoint = SocketEndpoint(parsing: listen) else { throw CLIError(description: "cannot read --listen '\(listen)'") }
            guard maxRestores >= 1 else { throw CLIError(description: "--max-restores must be at least 1") }
            var options = SnapshotService.Options(folder: folder, listen: endpoint)
            options.source.faultPathCPU = faultCPU
            options.source.reconnectSeconds = reconnectSeconds
            options.source.streamDelaySeconds = streamDelaySeconds
            options.maxRestores = maxRestores
            let json = json
            let output = Locked(())
            let service = try SnapshotService(options: options) { record in
                output.withLock { _ in
                    print(json ? ((try? jsonLine(record)) ?? "{}") : Self.text(record))
                    fflush(stdout)
                }
            }
            output.withLock { _ in
                print("listening on \(service.endpoint)")
                fflush(stdout)
            }
            // The folder's own snapshot is checked before the first request is read.
            if let checked = service.checkFolderSnapshot() {
                let line: String
                switch checked {
                case .success(let s):
                    line = json ? ((try? jsonLine(Merged(s, OutcomeFields(outcome: "verified")))) ?? "{}")
                        : "snapshot \(folder) verified: \(s.vcpus) vCPU(s), \(s.ramBytes >> 20) MiB, \(s.dataPages) data pages"
                case .failure(let error):
                    line = json ? ((try? jsonLine(FailureReport(outcome: "refused", error: "\(error)", snapshot: folder))) ?? "{}")
                        : "snapshot \(folder) cannot be served (requests for it are refused): \(error)"
                }
                output.withLock { _ in
                    print(line)
                    fflush(stdout)
                }
            }
            service.serve()
        } catch {
            fail(error)
        }
    }

    static func text(_ r: ServedRestore) -> String {
        let what = "request \(r.id) from \(r.peer)" + (r.snapshot.map { " for \($0)" } ?? "") + (r.mode.map { " (\($0))" } ?? "")
        let seconds = String(format: "%.2f", r.seconds)
        switch r.outcome {
        case "completed":
            return "\(what): completed in \(seconds) s: \(r.demandPages) pages on demand, \(r.backgroundPages) in the background, "
                + "\(r.reconnects) reconnect(s)" + (r.failedAttempts.isEmpty ? "" : ", \(r.failedAttempts.count) session(s) retried")
        case "refused":
            return "\(what): refused: \(r.error ?? "?")"
        default:
            return "\(what): failed \(r.committed ? "after" : "before") the commit in \(seconds) s: \(r.error ?? "?")"
        }
    }
}
