import FaultlineCore
import FaultlineLinux
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The supervisor-worker protocol, over a seqpacket socket pair (one message per packet,
/// JSON). A worker starts as a standby with nothing but its control socket, says `ready`,
/// and waits. The
/// supervisor sends it an assignment with the descriptors attached (SCM_RIGHTS: the
/// userfaultfd, the ledger memfd, the memory file, and the peer's pidfd when known); the
/// worker answers `attached` once it serves; any later supervisor packet means "stop", and
/// the worker answers `stopped`. A standby whose control socket closes exits quietly. A
/// worker whose supervisor goes away keeps serving until the peer exits (it holds the
/// userfaultfd, so the peer's memory stays served).
struct WorkerAssignment: Codable {
    var generation: Int
    var regions: [FirecrackerRegion]
    var crashAfterFaults: Int?
    var crashAfterRemoves: Int?
    var hasPeerWatch: Bool
}

struct WorkerNews: Codable {
    enum Kind: String, Codable { case ready, attached, stopped }
    var kind: Kind
    var pid: Int32
}

enum WorkerControl {
    static func send<T: Encodable>(_ value: T, on connection: UnixConnection, descriptors: [Int32] = []) throws {
        let bytes = Array(try JSONEncoder().encode(value))
        try connection.send(bytes, descriptors: descriptors)
    }

    static func receive<T: Decodable>(_ type: T.Type, from connection: UnixConnection) throws -> (T, [FileDescriptor])? {
        let (bytes, fds) = try connection.receiveMessage(maxBytes: 1 << 20)
        if bytes.isEmpty { return nil }  // the other end closed
        return (try JSONDecoder().decode(T.self, from: Data(bytes)), fds)
    }
}

/// The worker's side: take an assignment, serve, stop when told.
public enum PageServerWorker {
    /// Waits for an assignment from the supervisor at the other end of `control` and serves
    /// it until told to stop (or, if the supervisor is gone, until the peer exits). Returns at
    /// once, quietly, if the supervisor closes the socket first (a standby not needed). `crash`
    /// runs where the assignment asks for an injected crash; it must not return normally.
    /// `ensure`: see ``PageServer`` (a memory file still arriving; in-process workers only).
    public static func serve(control: UnixConnection, crash: @escaping () throws -> Void,
                             ensure: ((Range<Int>) throws -> Void)? = nil) throws {
        try? WorkerControl.send(WorkerNews(kind: .ready, pid: HostProcess.id), on: control)
        _ = try control.waitReadable(timeoutMilliseconds: -1)
        guard let (assignment, fds) = try WorkerControl.receive(WorkerAssignment.self, from: control) else { return }
        guard fds.count == (assignment.hasPeerWatch ? 4 : 3) else {
            throw PageServerError.worker("the assignment came with \(fds.count) descriptors")
        }
        let uffd = try Userfaultfd.adoptReceived(fds[0], label: "uffd (worker \(assignment.generation))")
        let file = try MappedFile(fds[2])
        let layout = try SnapshotLayout.validate(assignment.regions.map(\.fields), fileSize: file.size)
        let ledger = try PageServerLedger.attach(try SharedMemory(adopting: fds[1]), for: layout)
        var hooks = PageServer.Hooks()
        if assignment.crashAfterFaults != nil || assignment.crashAfterRemoves != nil {
            hooks.crash = crash
            hooks.crashAfterFaults = assignment.crashAfterFaults
            hooks.crashAfterRemoves = assignment.crashAfterRemoves
        }
        let server = try PageServer(uffd: uffd, layout: layout, file: file, ledger: ledger, hooks: hooks, ensure: ensure)
        try server.attach()
        try WorkerControl.send(WorkerNews(kind: .attached, pid: HostProcess.id), on: control)
        try server.run(until: control.fd.rawValue)
        if control.peerHasHungUp, assignment.hasPeerWatch {
            // The supervisor is gone: nobody would restart a worker now, so keep this one.
            FaultlineLog.warn("page-server worker \(HostProcess.id): the supervisor is gone; serving until the peer exits")
            try server.run(until: fds[3].rawValue)
            return
        }
        try? WorkerControl.send(WorkerNews(kind: .stopped, pid: HostProcess.id), on: control)
    }

    /// The assignment for worker `generation`.
    static func assignment(for layout: SnapshotLayout, generation: Int, crash: CrashInjection?, hasPeerWatch: Bool) -> WorkerAssignment {
        WorkerAssignment(
            generation: generation,
            regions: layout.regions.map { FirecrackerRegion(base: $0.base, size: $0.size, offset: $0.offset, pageSize: $0.pageSize) },
            crashAfterFaults: crash?.afterFaults, crashAfterRemoves: crash?.afterRemoves, hasPeerWatch: hasPeerWatch)
    }
}

/// A crash injected into the first worker, to test recovery deterministically: it dies right
/// after the read that brings its page-fault events to `afterFaults` (or its REMOVEs to
/// `afterRemoves`), before acting on any of them.
public struct CrashInjection: Sendable, Equatable {
    public var afterFaults: Int?
    public var afterRemoves: Int?
    public init(afterFaults: Int? = nil, afterRemoves: Int? = nil) {
        self.afterFaults = afterFaults
        self.afterRemoves = afterRemoves
    }
}
