import ArgumentParser
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `faultline uffd-serve`: a Firecracker-compatible page server for lazy snapshot restore
/// (docs/page-server.md). The work is in FaultlineEngine/PageServer; this parses arguments.
struct UffdServe: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "uffd-serve",
        abstract: "Serve a Firecracker snapshot's memory on demand (the classic UFFD handler protocol).",
        subcommands: [UffdServeServe.self, UffdServeClient.self, UffdServeWorker.self],
        defaultSubcommand: UffdServeServe.self)
}

struct UffdServeServe: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Listen on --socket for Firecracker, then fill its guest's page faults from --memory (or --from a server).",
        discussion: """
        Firecracker connects (mem_backend {backend_type: "Uffd", backend_path: SOCKET}) and sends its \
        regions with the userfaultfd. A supervisor holds the userfaultfd and runs the serving in a \
        worker process, restarted if it dies; --in-process serves on a thread instead. The report \
        is printed when the peer exits, on SIGINT/SIGTERM, or (--exit-on-hangup) when the peer \
        closes its connection.

        --from HOST:PORT serves the memory file of a snapshot a `faultline serve-snapshot` serves \
        (the regions' offsets index its memory.bin): it is fetched while the guest runs, in the \
        background and, for a page a fault needs first, on demand. The fetched memory lives in \
        this process, so the serving does too (on a thread). A page that can never arrive (the \
        fetch failed for good) is poisoned: the guest gets a memory error, never a wrong page.
        """)

    @Option(help: "Unix socket to listen on (created with mode 0600)") var socket: String
    @Option(help: "The snapshot's memory file") var memory: String?
    @OptionGroup(title: "A snapshot on a server") var remote: RemoteRestoreArguments
    @Option(name: .customLong("allow-uid"), help: "A user id allowed to connect (repeatable; default: this process's)")
    var allowUID: [UInt32] = []
    @Option(name: .customLong("connect-timeout"), help: "Seconds to wait for the peer to connect (0: for ever)")
    var connectTimeout: Double = 120
    @Flag(name: .customLong("exit-on-hangup"), help: "Also end when the peer closes its connection")
    var exitOnHangup = false
    @Flag(name: .customLong("in-process"), help: "Serve on a thread of this process (no worker to restart)")
    var inProcess = false
    @Flag(help: "Print the report as one JSON line") var json = false
    @Option(name: .customLong("inject-worker-exit-after-faults"), help: .hidden) var crashAfterFaults: Int?
    @Option(name: .customLong("inject-worker-exit-after-removes"), help: .hidden) var crashAfterRemoves: Int?

    @OptionGroup(title: "Logging") var logging: LoggingArguments

    func run() {
        logging.apply()
        do {
            let signals = try TerminationSignals()
            if let from = remote.from {
                guard memory == nil else { throw CLIError(description: "give --memory or --from, not both") }
                try serveRemote(from: from, signals: signals)
                return
            }
            guard let memory else { throw CLIError(description: "uffd-serve needs --memory FILE or --from HOST:PORT") }
            let file: FileDescriptor
            do { file = try MappedFile.open(memory) } catch { throw PageServerError.memoryFile(path: memory, error) }
            _ = try MappedFile(file)  // readable, non-empty, mappable: fail now, not in a worker
            let launcher: WorkerLauncher = inProcess ? ThreadWorkerLauncher()
                : ProcessWorkerLauncher(executable: "/proc/self/exe", arguments: ["uffd-serve", "worker", "--control-fd", "3"])
            let report = try serve(file: file, launcher: launcher, mode: inProcess ? "in-process" : "supervised", signals: signals)
            print(json ? report.json : report.text)
        } catch {
            fail(error)
        }
    }

    /// `--from`: fetches the served snapshot's memory into this process and serves from it.
    func serveRemote(from: String, signals: TerminationSignals) throws {
        let server = try remote.server(from)
        try remote.withChaos(SnapshotRestore.Options()) { options in
            let fetched = try RemoteSnapshotMemory(server: server, name: remote.snapshot, options: options)
            fputs("uffd-serve: fetching the snapshot from \(server) (\(fetched.layout.totalPages) pages) while serving; "
                  + "serving in this process, where the fetched memory is\n", stderr)
            var report = try serve(file: fetched.memoryFile, launcher: ThreadWorkerLauncher(ensure: { try fetched.ensure($0) }),
                                   mode: "in-process, fetching from \(server)", signals: signals)
            // The peer is gone; the fetch ends at its own pace (bounded by its timeouts).
            report.fetch = PageServerReport.RemoteFetch(from: "\(server)", outcome: fetched.finish(waitingSeconds: 600))
            print(json ? report.json : report.text)
            if report.fetch?.error != nil || report.fetch?.digest_match == false { Glibc.exit(1) }
        }
    }

    /// Listens, serves one peer with `launcher`'s workers, and returns the report.
    func serve(file: FileDescriptor, launcher: WorkerLauncher, mode: String, signals: TerminationSignals) throws -> PageServerReport {
        var options = PageServerSupervisor.Options(policy: allowUID.isEmpty ? .ownUser : PeerPolicy(allowedUIDs: Set(allowUID)))
        options.connectTimeoutSeconds = connectTimeout > 0 ? connectTimeout : nil
        options.exitOnHangup = exitOnHangup
        if crashAfterFaults != nil || crashAfterRemoves != nil {
            options.crash = CrashInjection(afterFaults: crashAfterFaults, afterRemoves: crashAfterRemoves)
        }
        let supervisor = try PageServerSupervisor(
            socketPath: socket, memoryFile: file, launcher: launcher, mode: mode,
            options: options, log: { fputs("uffd-serve: \($0)\n", stderr) })
        fputs("uffd-serve: listening on \(socket) (pid \(HostProcess.id))\n", stderr)
        return try supervisor.run(stopDescriptors: [(signals.fd.rawValue, "SIGINT or SIGTERM")])
    }
}

/// A worker process: started by `serve` with its control socket at descriptor 3.
struct UffdServeWorker: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "worker", abstract: "(internal) a page-server worker", shouldDisplay: false)

    @Option(name: .customLong("control-fd")) var controlFD: Int32 = 3

    func run() {
        do {
            let control = UnixConnection(fd: FileDescriptor(adopting: controlFD, label: "supervisor control"))
            try PageServerWorker.serve(control: control, crash: { HostProcess.crashNow() })
        } catch {
            fputs("uffd-serve worker \(HostProcess.id): \(error)\n", stderr)
            Glibc.exit(3)
        }
    }
}

/// Firecracker's side, for trying a page server (this one, or any other) and benchmarking it.
struct UffdServeClient: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "client",
        abstract: "Play Firecracker against a page server: send regions and a userfaultfd, fault every page, check every byte.")

    @Option(help: "The page server's socket") var socket: String
    @Option(help: "The memory file the server serves (to check the bytes)") var memory: String
    @Option(help: "Region sizes, comma-separated (e.g. 64M,32M); file offsets follow each other from 0")
    var regions = "64M"
    @Option(name: .customLong("page-size"), help: "4K or 2M (2M: hugetlb memory)") var pageSize = "4K"
    @Option(help: "Threads faulting at once (vCPUs)") var threads = 1
    @Option(help: "REGION:OFFSET:LENGTH removed (madvise DONTNEED) after the faults; repeatable")
    var remove: [String] = []
    @Option(name: .customLong("touch-delay-us"), help: "Pause of each thread between pages") var touchDelayUs: UInt64 = 0
    @Option(name: .customLong("announce-after"), help: "Print 'touched N pages' once N pages are touched") var announceAfter: Int?
    @Flag(name: .customLong("no-verify"), help: "Skip the byte-for-byte check") var noVerify = false
    @Flag(help: "One JSON line") var json = false

    func run() {
        do {
            var plan = FirecrackerPeerRun.Plan(sizes: try regions.split(separator: ",").map { try size(String($0), "--regions") })
            plan.pageSize = try size(pageSize, "--page-size")
            plan.threads = max(threads, 1)
            plan.delayMicroseconds = touchDelayUs
            plan.verify = !noVerify
            plan.removes = try remove.map { spec in
                let parts = spec.split(separator: ":").map(String.init)
                guard parts.count == 3, let r = Int(parts[0]) else { throw CLIError(description: "--remove \(spec): expected REGION:OFFSET:LENGTH") }
                return (r, Int(try size(parts[1], "--remove", zero: true)), Int(try size(parts[2], "--remove")))
            }
            if let n = announceAfter {
                plan.announceAfter = n
                plan.announce = { print("touched \(n) pages"); fflush(stdout) }
            }
            let file = try MappedFile(try MappedFile.open(memory))
            let result = try FirecrackerPeerRun.play(plan, socketPath: socket, file: file)
            if json {
                printJSON(result)
            } else {
                print("\(result.pages) pages of \(result.page_size) bytes from \(result.threads) thread(s) in \(String(format: "%.3f", result.seconds)) s: \(Int(result.pages_per_second)) pages/s")
                if let m = result.mismatched_pages { print(m == 0 ? "verified: every byte as expected" : "MISMATCH: \(m) pages, first \(result.first_mismatch ?? "")") }
            }
            if (result.mismatched_pages ?? 0) > 0 { Glibc.exit(1) }
        } catch {
            fail(error)
        }
    }

    func size(_ text: String, _ option: String, zero: Bool = false) throws -> UInt64 {
        guard let v = parseSize(text), v > 0 || zero else { throw CLIError(description: "\(option): '\(text)' is not a size (e.g. 4K, 2M, 64M)") }
        return v
    }
}
