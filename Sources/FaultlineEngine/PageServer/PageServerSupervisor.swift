import FaultlineCore
import FaultlineLinux

/// A Firecracker-compatible page server that survives its own workers' deaths
/// (docs/page-server.md, "Surviving a crash").
///
/// The supervisor accepts the peer, checks its handshake, and holds the userfaultfd for the
/// whole session - while any copy is open the kernel keeps the peer's memory registered, so
/// a fault waits for a server instead of reading fresh zero pages. It never maps guest memory
/// or the memory file. A worker (a child process, or a thread with `ThreadWorkerLauncher`)
/// receives the userfaultfd, the memory file and the shared ledger, and serves. When a
/// worker dies the supervisor starts another and hands it the same descriptors; the new
/// worker replays the ledger's landing buffer and wakes every region, so faults the dead one
/// had read are raised again.
public final class PageServerSupervisor: @unchecked Sendable {
    public struct Options: Sendable {
        public var policy: PeerPolicy
        /// How long to wait for the peer to connect (nil: for ever).
        public var connectTimeoutSeconds: Double?
        /// Also end when the peer closes its connection (Firecracker keeps it open while the
        /// VM lives; releases before 1.7 closed it at once, so this is off by default).
        public var exitOnHangup = false
        /// Injected into the first worker only.
        public var crash: CrashInjection?
        /// Workers in a row that may end without serving a fault before the server gives up.
        public var maxFruitlessWorkers = 5
        public var timing = FirecrackerHandshake.Timing()
        public init(policy: PeerPolicy = .ownUser) { self.policy = policy }
    }

    public let listener: UnixListener
    let options: Options
    let memoryFile: FileDescriptor
    let launcher: WorkerLauncher
    let mode: String
    let log: (String) -> Void
    let stopEvent: EventFD
    private let workers = Locked<[Int32]>([])

    /// Binds `socketPath` (mode 0600) at once: a peer may connect as soon as this returns.
    public init(socketPath: String, memoryFile: FileDescriptor, launcher: WorkerLauncher, mode: String,
                options: Options, log: @escaping (String) -> Void) throws(PageServerError) {
        do {
            listener = try UnixListener(path: socketPath, mode: 0o600)
            stopEvent = try EventFD()
        } catch { throw .system(error) }
        self.memoryFile = memoryFile
        self.launcher = launcher
        self.mode = mode
        self.options = options
        self.log = log
    }

    /// Ends `run` from another thread (it stops its worker and reports).
    public func requestStop() { stopEvent.signal() }

    /// Process ids of the workers started so far (none for thread workers), oldest first.
    public var workerPIDs: [Int32] { workers.withLock { $0 } }

    /// Accepts the peer, serves it until it exits (or hangs up, with `exitOnHangup`), a stop
    /// is requested, or one of `stopDescriptors` turns readable (the report's `ended_by` is
    /// its name); then stops the worker and reports.
    public func run(stopDescriptors: [(fd: Int32, name: String)] = []) throws(PageServerError) -> PageServerReport {
        let (connection, peer) = try FirecrackerHandshake.accept(on: listener, policy: options.policy,
                                                                 timeoutSeconds: options.connectTimeoutSeconds, log: log)
        let session = try FirecrackerHandshake.receive(from: connection, peer: peer, file: memoryFile, timing: options.timing)
        log("serving pid \(peer.pid) (uid \(peer.uid)): \(session.layout.regions.count) region(s), \(session.layout.totalPages) pages, userfaultfd features \(session.uffd.features)")
        let ledger: PageServerLedger
        do { ledger = try PageServerLedger.create(for: session.layout) } catch { throw .system(error) }
        // Held by the peer's open connection, the pid is still the peer's here.
        let peerWatch = try? ProcessWatch(pid: peer.pid)
        if peerWatch == nil { log("cannot watch pid \(peer.pid) (no pidfd): serving until stopped") }
        var generation = 0, fruitless = 0
        while true {
            generation += 1
            let served = ledger[.faultsServed]
            let (control, worker) = try start(generation: generation, session: session, ledger: ledger, peerWatch: peerWatch)
            let outcome = try supervise(worker, control: control, session: session, peerWatch: peerWatch, extra: stopDescriptors)
            let how = worker.reap()
            let who = worker.pid.map { "worker \(generation) (pid \($0))" } ?? "worker \(generation)"
            if let endedBy = outcome {
                return PageServerReport(ledger: ledger, session: session, mode: mode, workersStarted: generation, endedBy: endedBy)
            }
            fruitless = ledger[.faultsServed] > served ? 0 : fruitless + 1
            guard fruitless < options.maxFruitlessWorkers else {
                throw .worker("\(fruitless) workers in a row ended without serving a fault; the last: \(how)")
            }
            log("\(who) ended (\(how)) after \(ledger[.faultsServed]) faults served in all; starting worker \(generation + 1)")
        }
    }

    /// Starts worker `generation` and hands it the session's descriptors.
    func start(generation: Int, session: ServeSession, ledger: PageServerLedger, peerWatch: ProcessWatch?)
        throws(PageServerError) -> (UnixConnection, WorkerHandle) {
        do {
            let (mine, theirs) = try UnixConnection.pair(label: "worker \(generation) control")
            let worker = try launcher.launch(control: theirs, generation: generation)
            if let pid = worker.pid { workers.withLock { $0.append(pid) } }
            let assignment = PageServerWorker.assignment(for: session.layout, generation: generation,
                                                         crash: generation == 1 ? options.crash : nil, hasPeerWatch: peerWatch != nil)
            var fds = [session.uffd.fd.rawValue, ledger.memory.fd.rawValue, session.file.rawValue]
            if let peerWatch { fds.append(peerWatch.fd.rawValue) }
            // A worker that dies before reading this is handled like any other death.
            try? WorkerControl.send(assignment, on: mine, descriptors: fds)
            return (mine, worker)
        } catch let error as PageServerError {
            throw error
        } catch {
            throw .worker("starting worker \(generation): \(error)")
        }
    }

    /// Waits until the worker ends (nil: start another) or the session should end (why).
    func supervise(_ worker: WorkerHandle, control: UnixConnection, session: ServeSession, peerWatch: ProcessWatch?,
                   extra: [(fd: Int32, name: String)]) throws(PageServerError) -> String? {
        var listening = true
        while true {
            var fds: [(fd: Int32, events: DescriptorPoll.Events)] = [
                (worker.exitDescriptor, .readable), (stopEvent.fd, .readable),
                (listening ? control.fd.rawValue : -1, .readable),
                (peerWatch?.fd.rawValue ?? -1, .readable),
                (options.exitOnHangup ? session.connection.fd.rawValue : -1, .hangUp),
            ]
            fds += extra.map { ($0.fd, .readable) }
            let ready: [DescriptorPoll.Events]
            do { ready = try DescriptorPoll.wait(fds, timeoutMilliseconds: -1) } catch { throw .system(error) }
            if !ready[2].isEmpty {
                // News from the worker, or its end of the pair closing as it dies.
                if let (news, _) = try? WorkerControl.receive(WorkerNews.self, from: control), news.kind == .attached {
                    log(worker.pid.map { "worker (pid \($0)) attached" } ?? "worker thread attached")
                } else {
                    listening = false
                }
            }
            let why: String?
            if !ready[1].isEmpty { why = "stop requested" }
            else if !ready[3].isEmpty { why = "peer exited" }
            else if !ready[4].isEmpty { why = "peer hung up" }
            else if let i = ready.indices.dropFirst(5).first(where: { !ready[$0].isEmpty }) { why = extra[i - 5].name }
            else { why = nil }
            if let why {
                stop(worker, control: control)
                return why
            }
            // Checked after the reasons to stop: a worker killed along with this process (a
            // terminal's Ctrl-C, a test harness's SIGTERM) is not restarted.
            if !ready[0].isEmpty { return nil }
        }
    }

    /// Asks the worker to stop and waits for it (5 s, then SIGKILL).
    func stop(_ worker: WorkerHandle, control: UnixConnection) {
        try? control.send([UInt8]("{\"stop\":true}".utf8))
        let ready = try? DescriptorPoll.wait([(worker.exitDescriptor, .readable)], timeoutMilliseconds: 5000)
        if ready?.first?.isEmpty ?? true {
            log("the worker did not stop within 5 s: killing it")
            worker.kill()
        }
    }
}
