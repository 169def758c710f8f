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
    private var launched = 0
    /// Workers started (and ready) before the socket is bound, not yet handed to `run`.
    private var earlyWorkers: [Worker] = []

    /// Starts two workers - the one that will serve, and a standby - and waits (up to 10 s)
    /// until they are ready, then binds `socketPath` (mode 0600): a peer may connect as soon
    /// as this returns, and its first fault finds a worker waiting.
    public init(socketPath: String, memoryFile: FileDescriptor, launcher: WorkerLauncher, mode: String,
                options: Options, log: @escaping (String) -> Void) throws(PageServerError) {
        do { stopEvent = try EventFD() } catch { throw .system(error) }
        self.memoryFile = memoryFile
        self.launcher = launcher
        self.mode = mode
        self.options = options
        self.log = log
        var early: [Worker] = []
        do throws(PageServerError) {
            for number in 1...2 { early.append(try Self.launch(launcher, number: number)) }
            for w in early where (try? w.control.waitReadable(timeoutMilliseconds: 10_000)) != true {
                log("worker (\(w.name)) is not ready after 10 s; listening anyway")
            }
            do { listener = try UnixListener(path: socketPath, mode: 0o600) } catch { throw PageServerError.system(error) }
        } catch {
            for w in early { Self.retire(w, log: log) }
            throw error
        }
        launched = early.count
        workers.withLock { $0 += early.compactMap(\.handle.pid) }
        earlyWorkers = early
    }

    deinit { for w in earlyWorkers { Self.retire(w, log: log) } }

    /// Ends `run` from another thread (it stops its worker and reports).
    public func requestStop() { stopEvent.signal() }

    /// Process ids of the workers started so far (none for thread workers), oldest first.
    public var workerPIDs: [Int32] { workers.withLock { $0 } }

    /// A started worker: a standby waiting for an assignment, or the one serving.
    struct Worker {
        let control: UnixConnection
        let handle: WorkerHandle
        var name: String { handle.pid.map { "pid \($0)" } ?? "thread" }
    }

    /// Accepts the peer, serves it until it exits (or hangs up, with `exitOnHangup`), a stop
    /// is requested, or one of `stopDescriptors` turns readable (the report's `ended_by` is
    /// its name); then stops the worker and reports.
    ///
    /// Workers are started ahead of need: two before the peer connects (one serves, one
    /// stands by), and a new standby each time the standby takes over from a dead worker. So
    /// neither the first fault nor a replacement waits for a process to start, and no process
    /// starts while the guest is faulting normally.
    public func run(stopDescriptors: [(fd: Int32, name: String)] = []) throws(PageServerError) -> PageServerReport {
        var spares = earlyWorkers
        earlyWorkers = []
        defer { for w in spares { retire(w) } }
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
            let active = spares.isEmpty ? try launch() : spares.removeFirst()
            assign(active, generation: generation, session: session, ledger: ledger, peerWatch: peerWatch)
            if spares.isEmpty, let standby = try? launch() { spares.append(standby) }
            let outcome = try supervise(active, spares: &spares, session: session, peerWatch: peerWatch, extra: stopDescriptors)
            let how = active.handle.reap()
            if let endedBy = outcome {
                return PageServerReport(ledger: ledger, session: session, mode: mode, workersStarted: generation, endedBy: endedBy)
            }
            fruitless = ledger[.faultsServed] > served ? 0 : fruitless + 1
            guard fruitless < options.maxFruitlessWorkers else {
                throw .worker("\(fruitless) workers in a row ended without serving a fault; the last: \(how)")
            }
            log("worker \(generation) (\(active.name)) ended (\(how)) after \(ledger[.faultsServed]) faults served in all; worker \(generation + 1) takes over")
        }
    }

    /// Starts a worker that waits for an assignment.
    func launch() throws(PageServerError) -> Worker {
        launched += 1
        let worker = try Self.launch(launcher, number: launched)
        if let pid = worker.handle.pid { workers.withLock { $0.append(pid) } }
        return worker
    }

    static func launch(_ launcher: WorkerLauncher, number: Int) throws(PageServerError) -> Worker {
        do {
            let (mine, theirs) = try UnixConnection.pair(label: "worker control \(number)")
            return Worker(control: mine, handle: try launcher.launch(control: theirs, generation: number))
        } catch let error as SystemError {
            throw .system(error)
        } catch {
            throw .worker("starting a worker: \(error)")
        }
    }

    /// Hands `worker` the session's descriptors as worker `generation`.
    func assign(_ worker: Worker, generation: Int, session: ServeSession, ledger: PageServerLedger, peerWatch: ProcessWatch?) {
        let assignment = PageServerWorker.assignment(for: session.layout, generation: generation,
                                                     crash: generation == 1 ? options.crash : nil, hasPeerWatch: peerWatch != nil)
        var fds = [session.uffd.fd.rawValue, ledger.memory.fd.rawValue, session.file.rawValue]
        if let peerWatch { fds.append(peerWatch.fd.rawValue) }
        // A worker that died before this is handled like any other death.
        try? WorkerControl.send(assignment, on: worker.control, descriptors: fds)
    }

    /// Waits until the serving worker ends (nil: put the standby to work) or the session
    /// should end (why). A standby that dies is replaced, up to 5 times in a row.
    func supervise(_ worker: Worker, spares: inout [Worker], session: ServeSession, peerWatch: ProcessWatch?,
                   extra: [(fd: Int32, name: String)]) throws(PageServerError) -> String? {
        var listening = true, standbyDeaths = 0
        while true {
            var fds: [(fd: Int32, events: DescriptorPoll.Events)] = [
                (worker.handle.exitDescriptor, .readable), (stopEvent.fd, .readable),
                (listening ? worker.control.fd.rawValue : -1, .readable),
                (peerWatch?.fd.rawValue ?? -1, .readable),
                (options.exitOnHangup ? session.connection.fd.rawValue : -1, .hangUp),
                (spares.first?.handle.exitDescriptor ?? -1, .readable),
            ]
            fds += extra.map { ($0.fd, .readable) }
            let ready: [DescriptorPoll.Events]
            do { ready = try DescriptorPoll.wait(fds, timeoutMilliseconds: -1) } catch { throw .system(error) }
            if !ready[2].isEmpty {
                // News from the worker, or its end of the pair closing as it dies.
                if let (news, _) = try? WorkerControl.receive(WorkerNews.self, from: worker.control) {
                    if news.kind == .attached { log("worker (\(worker.name)) attached") }
                } else {
                    listening = false
                }
            }
            let why: String?
            if !ready[1].isEmpty { why = "stop requested" }
            else if !ready[3].isEmpty { why = "peer exited" }
            else if !ready[4].isEmpty { why = "peer hung up" }
            else if let i = ready.indices.dropFirst(6).first(where: { !ready[$0].isEmpty }) { why = extra[i - 6].name }
            else { why = nil }
            if let why {
                stop(worker)
                return why
            }
            // Checked after the reasons to stop: a worker killed along with this process (a
            // terminal's Ctrl-C, a test harness's SIGTERM) is not restarted.
            if !ready[0].isEmpty { return nil }
            if !ready[5].isEmpty, !spares.isEmpty {
                let dead = spares.removeFirst()
                let how = dead.handle.reap()
                standbyDeaths += 1
                if standbyDeaths < 5, let standby = try? launch() { spares.insert(standby, at: 0) }
                log("the standby worker (\(dead.name)) ended (\(how))\(spares.isEmpty ? "; none is kept now" : "; another is started")")
            }
        }
    }

    /// Asks the serving worker to stop and waits for it (5 s, then SIGKILL).
    func stop(_ worker: Worker) {
        try? worker.control.send([UInt8]("{\"stop\":true}".utf8))
        Self.wait(for: worker, log: log)
    }

    func retire(_ worker: Worker) { Self.retire(worker, log: log) }

    /// Lets a standby go: its control socket closes, it exits.
    static func retire(_ worker: Worker, log: (String) -> Void) {
        worker.control.shutdown()
        wait(for: worker, log: log)
        _ = worker.handle.reap()
    }

    static func wait(for worker: Worker, log: (String) -> Void) {
        let ready = try? DescriptorPoll.wait([(worker.handle.exitDescriptor, .readable)], timeoutMilliseconds: 5000)
        if ready?.first?.isEmpty ?? true {
            log("worker (\(worker.name)) did not stop within 5 s: killing it")
            worker.handle.kill()
        }
    }
}
