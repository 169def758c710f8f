import FaultlineCore
import FaultlineLinux

/// A running page-server worker, as its supervisor sees it.
public protocol WorkerHandle: AnyObject {
    /// Turns readable once the worker has ended.
    var exitDescriptor: Int32 { get }
    /// Its process id; nil for a thread of this process.
    var pid: Int32? { get }
    /// Ends it now (SIGKILL); nothing for a thread, which cannot be killed.
    func kill()
    /// Waits until it has ended; how it ended ("SIGKILL", "exit 0", "returned").
    func reap() -> String
}

/// Starts workers: the seam between the supervisor and where workers run.
public protocol WorkerLauncher {
    /// Starts worker `generation`, which talks to the supervisor over `control`.
    func launch(control: UnixConnection, generation: Int) throws -> WorkerHandle
}

/// Workers as child processes (`faultline uffd-serve worker`): a worker that crashes takes
/// nothing of the supervisor's with it, and the supervisor starts another.
public struct ProcessWorkerLauncher: WorkerLauncher {
    public let executable: String
    /// argv after the executable; the control socket is descriptor 3.
    public let arguments: [String]

    public init(executable: String, arguments: [String]) {
        self.executable = executable
        self.arguments = arguments
    }

    public func launch(control: UnixConnection, generation: Int) throws -> WorkerHandle {
        ProcessWorker(try SpawnedProcess(executable: executable, arguments: arguments, passing: control.fd, as: 3))
    }

    final class ProcessWorker: WorkerHandle {
        let process: SpawnedProcess
        init(_ process: SpawnedProcess) { self.process = process }
        var exitDescriptor: Int32 { process.watch.fd.rawValue }
        var pid: Int32? { process.pid }
        func kill() { process.kill() }
        func reap() -> String { SpawnedProcess.describe(status: process.reap()) }
    }
}

/// Workers as threads of this process: the same protocol and code, without a process
/// boundary (`uffd-serve --in-process`, and tests that need no real process). An injected
/// crash ends the thread without cleaning up (no `stopped` message), as a death would.
public struct ThreadWorkerLauncher: WorkerLauncher {
    /// Called before a fill copies from the memory file (one still arriving: ``RemoteSnapshotMemory``).
    let ensure: (@Sendable (Range<Int>) throws -> Void)?

    public init(ensure: (@Sendable (Range<Int>) throws -> Void)? = nil) {
        self.ensure = ensure
    }

    /// What an injected crash throws in a thread worker.
    struct InjectedCrash: Error {}

    public func launch(control: UnixConnection, generation: Int) throws -> WorkerHandle {
        let worker = try ThreadWorker()
        let done = worker.done
        worker.thread = try OSThread(name: "uffd-worker-\(generation)") {
            do {
                try PageServerWorker.serve(control: control, crash: { throw InjectedCrash() }, ensure: ensure)
                worker.outcome.withLock { $0 = "returned" }
            } catch is InjectedCrash {
                worker.outcome.withLock { $0 = "injected crash" }
            } catch {
                FaultlineLog.warn("page-server worker \(generation): \(error)")
                worker.outcome.withLock { $0 = "failed: \(error)" }
            }
            control.shutdown()
            done.signal()
        }
        return worker
    }

    final class ThreadWorker: WorkerHandle {
        let done: EventFD
        var thread: OSThread?
        let outcome = Locked("running")
        init() throws { done = try EventFD() }
        var exitDescriptor: Int32 { done.fd }
        var pid: Int32? { nil }
        func kill() {}
        func reap() -> String {
            thread?.join()
            return outcome.withLock { $0 }
        }
    }
}
