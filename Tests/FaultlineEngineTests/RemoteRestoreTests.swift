import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation
import Testing

/// An in-process `serve-snapshot` on loopback, serving `folder` until the test ends; every
/// request's record is kept.
final class TestSnapshotServer {
    let service: SnapshotService
    private var thread: OSThread?
    private let records = Locked<[ServedRestore]>([])
    private let changed = TimedCondition()

    init(folder: String, configure: (inout SnapshotService.Options) -> Void = { _ in }) throws {
        var options = SnapshotService.Options(folder: folder, listen: SocketEndpoint(host: "127.0.0.1", port: 0))
        options.source.faultPathCPU = .unpinned
        options.source.peerTimeoutSeconds = 5
        options.source.reconnectSeconds = 3
        options.requestSeconds = 2
        configure(&options)
        let records = records, changed = changed
        service = try SnapshotService(options: options) { record in
            changed.withLock { records.withLock { $0.append(record) } }
            changed.broadcast()
        }
        thread = try OSThread(name: "test snapshot server") { [service] in service.serve() }
    }

    deinit { stop() }

    func stop() {
        service.stop()
        thread?.join()
        thread = nil
    }

    var endpoint: SocketEndpoint { service.endpoint }

    /// The records of the first `count` requests, once they have ended (at most 30 s).
    func records(_ count: Int) -> [ServedRestore] {
        changed.wait(timeoutNanoseconds: 30_000_000_000) { records.withLock { $0.count } >= count }
        return records.withLock { $0 }
    }
}

/// One raw exchange with a server: `bytes` sent as they are, the answer's JSON (nil: none).
func rawExchange(_ server: SocketEndpoint, _ bytes: [UInt8]) throws -> [String: Any]? {
    let socket = try StreamSocket.connect(to: server, timeoutSeconds: 5)
    socket.setReceiveTimeout(seconds: 10)
    try socket.sendAll(bytes)
    var got: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = try buffer.withUnsafeMutableBytes { try socket.receive(into: $0) }
        if n == 0 { break }
        got += buffer[0..<n]
    }
    guard got.count >= ServiceFrame.headerSize else { return nil }
    let (length, crc) = try ServiceFrame.header(Array(got[0..<ServiceFrame.headerSize]))
    let payload = Array(got[ServiceFrame.headerSize..<(ServiceFrame.headerSize + length)])
    try ServiceFrame.check(payload: payload, crc: crc)
    return try JSONSerialization.jsonObject(with: Data(payload)) as? [String: Any]
}

struct HarnessFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

@Suite("Remote restore against fakes (no kernel)", .serialized)
struct RemoteRestoreTests {
    /// A library folder holding the snapshot `good` (and what a test adds), and the machine it was written from.
    func library(_ name: String = #function) throws -> (SnapshotFolder, MemoryMachine) {
        let folder = SnapshotFolder(name)
        try FileManager.default.createDirectory(atPath: folder.path, withIntermediateDirectories: true)
        let machine = try patternedMachine()
        _ = try SnapshotWriter.write(machine, to: folder.path + "/good", workload: "test")
        return (folder, machine)
    }

    func restore(from server: TestSnapshotServer, name: String?, retries: Int = 0,
                 configure: (inout SnapshotRestore.Options) -> Void = { _ in }) -> (Result<RestoreReport, Error>, MemoryPageMapper?) {
        var options = SnapshotRestore.Options()
        options.retries = retries
        options.acceptSeconds = 10
        options.destination.runAfterSeconds = 0
        options.destination.faultPathCPU = .unpinned
        options.destination.reconnectSeconds = 3
        options.destination.idleSeconds = 5
        let mapperBox = Locked<MemoryPageMapper?>(nil)
        options.destination.machineFactory = { layout in
            let mapper = MemoryPageMapper(pages: layout.totalPages)
            mapperBox.withLock { $0 = mapper }
            return (MemoryMachine(layout: layout), mapper)
        }
        configure(&options)
        let result = Result {
            try SnapshotRestore.run(from: server.endpoint, snapshot: name, options: options, started: MonotonicClock.nanoseconds())
        }
        return (result, mapperBox.withLock { $0 })
    }

    @Test(arguments: [true, false])
    func aServedSnapshotArrivesWholeAndItsDigestIsTheManifests(lazy: Bool) throws {
        let (folder, machine) = try library("served\(lazy)")
        let server = try TestSnapshotServer(folder: folder.path)
        let (result, mapper) = restore(from: server, name: "good") { $0.lazy = lazy }
        let report = try result.get()
        #expect(report.digestMatch)
        #expect(report.snapshotDigest == (try Snapshot(folder: folder.path + "/good").manifest.memoryDigest))
        #expect(report.from == "\(server.endpoint)")
        #expect(report.snapshot == "\(server.endpoint)/good")
        #expect(report.mode == (lazy ? "lazy" : "eager"))
        let m = try #require(mapper)
        #expect(memcmp(m.memory, machine.memory, machine.layout.totalPages * 4096) == 0)
        let record = try #require(server.records(1).first)
        #expect(record.outcome == "completed" && record.committed && record.snapshot == "good" && record.mode == (lazy ? "lazy" : "eager"))
    }

    @Test func aCorruptSnapshotIsRefusedOnBothSidesAndTheServerServesTheNextRequest() throws {
        let (folder, machine) = try library()
        _ = try SnapshotWriter.write(machine, to: folder.path + "/bad", workload: "test")
        let memory = folder.path + "/bad/memory.bin"
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: memory))
        try handle.seek(toOffset: UInt64(machine.layout.lowPages + 100) * 4096 + 9)
        try handle.write(contentsOf: Data([0x5A]))
        try handle.close()
        let server = try TestSnapshotServer(folder: folder.path)
        let (refused, mapper) = restore(from: server, name: "bad")
        #expect { try refused.get() } throws: { error in
            error is RestoreRefused && "\(error)".contains("snapshot memory is corrupt") && "\(error)".contains("'bad'")
        }
        #expect(mapper == nil, "no guest was built for a refused snapshot")
        let (served, _) = restore(from: server, name: "good")
        #expect(try served.get().digestMatch)
        let records = server.records(2)
        #expect(records.map(\.outcome) == ["refused", "completed"])
        #expect(records.first?.error?.contains("snapshot memory is corrupt") == true, "the server says why too")
    }

    @Test func restoresRunSideBySide() throws {
        let (folder, machine) = try library()
        let server = try TestSnapshotServer(folder: folder.path)
        let results = Locked<[Result<RestoreReport, Error>]>([])
        let threads = try (0..<3).map { i in
            try OSThread(name: "restorer \(i)") {
                let (result, mapper) = restore(from: server, name: "good")
                let whole = mapper.map { memcmp($0.memory, machine.memory, machine.layout.totalPages * 4096) == 0 } ?? false
                results.withLock { $0.append(whole ? result : .failure(HarnessFailure("restorer \(i): memory differs"))) }
            }
        }
        for thread in threads { thread.join() }
        for result in results.withLock({ $0 }) { #expect(try result.get().digestMatch) }
        #expect(server.records(3).map(\.outcome) == ["completed", "completed", "completed"])
    }

    @Test func aSnapshotChangedOnDiskAfterItsCheckIsCheckedAgain() throws {
        let (folder, _) = try library()
        let server = try TestSnapshotServer(folder: folder.path)
        #expect(try restore(from: server, name: "good").0.get().digestMatch)
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: folder.path + "/good/memory.bin"))
        try handle.seek(toOffset: 4096 * 40 + 3)
        try handle.write(contentsOf: Data([0xA5, 0xA5]))
        try handle.close()
        #expect { try restore(from: server, name: "good").0.get() } throws: { "\($0)".contains("snapshot memory is corrupt") }
    }

    @Test func unknownAndInvalidRequestsAreRefusedWithTheReasonAndServingGoesOn() throws {
        let (folder, _) = try library()
        let server = try TestSnapshotServer(folder: folder.path)
        func request(_ json: String) -> [UInt8] { ServiceFrame.encode(Array(json.utf8)) }
        let cases: [([UInt8], String)] = [
            (Array("GET / HTTP/1.0\r\n\r\n".utf8), "does not speak the snapshot service protocol"),
            (request("not json"), "not a request"),
            (request(#"{"type":"shutdown","version":1}"#), "unknown request type 'shutdown'"),
            (request(#"{"type":"restore","version":7,"dial_back_port":9}"#), "request version 7 is not supported"),
            (request(#"{"type":"restore","version":1,"mode":"lazy","retries":0}"#), "no 'dial_back_port'"),
            (request(#"{"type":"restore","version":1,"dial_back_port":0,"mode":"lazy","retries":0}"#), "dial-back port 0"),
            (request(#"{"type":"restore","version":1,"dial_back_port":9,"snapshot":"../good","mode":"lazy","retries":0}"#),
             "is not a folder name"),
            (request(#"{"type":"restore","version":1,"dial_back_port":9,"snapshot":"absent","mode":"lazy","retries":0}"#),
             "has no manifest.json"),
            // The folder itself holds no snapshot (only a library of them).
            (request(#"{"type":"restore","version":1,"dial_back_port":9,"mode":"lazy","retries":0}"#), "has no manifest.json"),
        ]
        for (bytes, reason) in cases {
            let answer = try rawExchange(server.endpoint, bytes)
            #expect(answer?["type"] as? String == "refused", "\(reason): \(String(describing: answer))")
            #expect((answer?["error"] as? String)?.contains(reason) == true, "\(reason): \(String(describing: answer))")
        }
        // A connection that says nothing is dropped after the request timeout, refused.
        let silent = try StreamSocket.connect(to: server.endpoint, timeoutSeconds: 5)
        #expect(server.records(cases.count + 1).last?.error?.contains("no message") == true)
        silent.shutdown()
        #expect(try restore(from: server, name: "good").0.get().digestMatch, "the server serves on")
        #expect(server.records(cases.count + 2).filter { $0.outcome == "refused" }.count == cases.count + 1)
    }

    @Test func aCutAfterTheCommitIsResumedAndVerified() throws {
        let (folder, _) = try library()
        let server = try TestSnapshotServer(folder: folder.path) { $0.source.disconnectAfterPages = 200 }
        let report = try restore(from: server, name: "good").0.get()
        #expect(report.digestMatch)
        #expect(report.reconnects >= 1, "the cut was resumed")
        let record = try #require(server.records(1).first)
        #expect(record.outcome == "completed" && record.reconnects >= 1)
    }

    @Test func aCutBeforeTheCommitIsACleanFailureUnlessARetryIsAllowed() throws {
        let (folder, _) = try library()
        let server = try TestSnapshotServer(folder: folder.path)
        let cut = ChaosEvent(phase: .switchover, role: .bulk, direction: .toDestination, frame: 0, action: .cut)
        let proxies = Locked<[ChaosProxy]>([])
        func throughProxy(_ options: inout SnapshotRestore.Options) {
            options.dialThrough = { guest in
                let proxy = try ChaosProxy(upstream: guest, schedule: ChaosSchedule(seed: 0, events: [cut], retries: 0))
                proxies.withLock { $0.append(proxy) }
                return proxy.endpoint
            }
        }
        let (failed, _) = restore(from: server, name: "good", configure: throughProxy)
        #expect { try failed.get() } throws: { error in
            guard let f = error as? RestoreFailed else { return false }
            return !f.guestStarted && f.cause is SnapshotServerFailed && "\(f)".contains("before the restored guest started")
        }
        let (retried, _) = restore(from: server, name: "good", retries: 1, configure: throughProxy)
        #expect(try retried.get().digestMatch, "the second session completes")
        let records = server.records(2)
        #expect(records.map(\.outcome) == ["failed", "completed"])
        #expect(records.first?.committed == false)
        #expect(records.last?.failedAttempts.count == 1)
        for proxy in proxies.withLock({ $0 }) { proxy.stop() }
    }
}
