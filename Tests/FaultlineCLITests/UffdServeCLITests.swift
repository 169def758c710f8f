import FaultlineLinux
import Foundation
import FaultlineTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `faultline uffd-serve` as separate processes: the supervisor, its worker processes, and
/// Firecracker's side (`uffd-serve client`, which checks every byte it reads). The worker dies
/// in the middle of serving - by an injected crash at a chosen point, and by a real `kill -9`
/// - and the faulting threads carry on once the next worker attaches.
@Suite("faultline uffd-serve (processes)", .serialized, .timeLimit(.minutes(10)),
       .gate(.uffdServeCLI))
struct UffdServeCLITests {
    /// The server's JSON report, the fields these tests look at.
    struct Report: Decodable {
        let workers_started: Int
        let faults_served: UInt64
        let pages_copied: UInt64
        let zero_pages: UInt64
        let removes_replayed: UInt64
        let ended_by: String
    }

    struct ClientResult: Decodable {
        let pages: Int
        let mismatched_pages: Int?
        let first_mismatch: String?
    }

    /// A memory file of random bytes, removed afterwards.
    final class MemoryFile {
        let path = "/tmp/faultline-uffd-cli-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).mem"
        init(mib: Int) throws {
            let random = try FileHandle(forReadingFrom: URL(fileURLWithPath: "/dev/urandom"))
            defer { try? random.close() }
            try random.readData(ofLength: mib << 20).write(to: URL(fileURLWithPath: path))
        }
        deinit { unlink(path) }
    }

    func socketPath() -> String { "/tmp/faultline-uffd-cli-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock" }

    /// Waits (at most `seconds`) until the server is listening at `path`.
    func waitForSocket(_ path: String, within seconds: Double = 20) -> Bool {
        let deadline = MonotonicClock.deadline(after: seconds)
        while MonotonicClock.nanoseconds() < deadline {
            var info = stat()
            if stat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFSOCK { return true }
            MonotonicClock.sleep(microseconds: 10_000)
        }
        return false
    }

    /// The server's serving worker: the child holding a userfaultfd (the standby holds none).
    func servingWorkers(of server: Int32) -> [ProcessTable.Entry] {
        ProcessTable.all().filter { $0.parent == server && holdsUserfaultfd($0.pid) }
    }

    func holdsUserfaultfd(_ pid: Int32) -> Bool {
        let dir = "/proc/\(pid)/fd"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return names.contains { (try? FileManager.default.destinationOfSymbolicLink(atPath: "\(dir)/\($0)")) == "anon_inode:[userfaultfd]" }
    }

    func decode<T: Decodable>(_ type: T.Type, lastLineOf text: String) -> T? {
        guard let line = text.split(separator: "\n").last(where: { $0.hasPrefix("{") }) else { return nil }
        return try? JSONDecoder().decode(T.self, from: Data(line.utf8))
    }

    /// One served session: a supervisor with `serverArguments`, a client with
    /// `clientArguments`; returns both sides' results (nil where one failed).
    func session(file: MemoryFile, serverArguments: [String], clientArguments: [String],
                 duringClient: ((Child, Child) -> Void)? = nil) throws -> (Report?, ClientResult?, String) {
        let socket = socketPath()
        let server = try Child(["uffd-serve", "--socket", socket, "--memory", file.path, "--exit-on-hangup", "--json"] + serverArguments)
        guard waitForSocket(socket) else {
            let r = server.finish(timeout: 5)
            Issue.record("the server never listened: \(r.stderr)")
            return (nil, nil, r.stderr)
        }
        let client = try Child(["uffd-serve", "client", "--socket", socket, "--memory", file.path, "--json"] + clientArguments)
        duringClient?(server, client)
        let c = client.finish(timeout: 120)
        let s = server.finish(timeout: 60)
        #expect(c.status == 0, "client: \(c.stdout) \(c.stderr)")
        #expect(s.status == 0, "server: \(s.stderr)")
        return (decode(Report.self, lastLineOf: s.stdout), decode(ClientResult.self, lastLineOf: c.stdout), s.stderr)
    }

    @Test("the worker is killed by an injected crash mid-serving, 10 runs: every byte verifies every time")
    func injectedCrashLoop() throws {
        let file = try MemoryFile(mib: 32)
        var passed = 0
        for run in 1...10 {
            let (report, client, log) = try session(
                file: file, serverArguments: ["--inject-worker-exit-after-faults", "\(200 + 150 * run)"],
                clientArguments: ["--regions", "16M,16M", "--threads", "4"])
            let ok = client?.mismatched_pages == 0 && client?.pages == 8192 && report?.workers_started == 2
                && report?.pages_copied == 8192 && log.contains("ended (SIGKILL)")
            #expect(ok, "run \(run): client \(String(describing: client)), server \(String(describing: report)), log: \(log)")
            if ok { passed += 1 }
        }
        print("uffd-serve injected worker crash: \(passed) of 10 runs passed")
        #expect(passed == 10)
    }

    @Test("the worker dies right after reading a REMOVE: the range still reads zeros")
    func injectedCrashAfterRemove() throws {
        let file = try MemoryFile(mib: 16)
        let (report, client, log) = try session(
            file: file, serverArguments: ["--inject-worker-exit-after-removes", "1"],
            clientArguments: ["--regions", "8M,8M", "--threads", "2", "--remove", "0:1M:256K", "--remove", "1:0:64K"])
        #expect(client?.mismatched_pages == 0, "\(String(describing: client))")
        #expect(report?.workers_started == 2, "\(log)")
        #expect(report?.removes_replayed == 1)
        #expect(report?.zero_pages == UInt64((256 << 10) + (64 << 10)) / 4096)
    }

    @Test("kill -9 of the worker while four threads fault, 10 runs: they continue under the next worker")
    func realKill() throws {
        let file = try MemoryFile(mib: 32)
        var passed = 0
        for run in 1...10 {
            var killed: Int32?
            let (report, client, log) = try session(
                file: file, serverArguments: [],
                clientArguments: ["--regions", "32M", "--threads", "4", "--touch-delay-us", "200", "--announce-after", "\(500 * run)"]
            ) { server, client in
                guard client.readLine(timeout: 60) == "touched \(500 * run) pages" else {
                    Issue.record("run \(run): the client never reported its progress")
                    return
                }
                let found = servingWorkers(of: server.pid)
                #expect(found.count == 1, "run \(run): workers \(found)")
                if let worker = found.first, let pinned = PinnedProcess(worker), pinned.signal(SIGKILL) { killed = worker.pid }
            }
            // A worker killed between a fill and counting it loses that one count (the page is
            // in: the client's check covers every byte).
            let ok = killed != nil && client?.mismatched_pages == 0 && client?.pages == 8192 && report?.workers_started == 2
                && (8191...8192).contains(report?.pages_copied ?? 0) && log.contains("worker 1 (pid \(killed ?? -1)) ended (SIGKILL)")
            #expect(ok, "run \(run): killed \(String(describing: killed)), client \(String(describing: client)), server \(String(describing: report)), log: \(log)")
            if ok { passed += 1 }
        }
        print("uffd-serve kill -9 of the worker: \(passed) of 10 runs passed")
        #expect(passed == 10)
    }

    @Test("kill -9 of the supervisor: its worker keeps serving until the peer exits")
    func supervisorKilled() throws {
        let file = try MemoryFile(mib: 16)
        let socket = socketPath()
        defer { unlink(socket) }  // a killed server leaves its socket file behind
        let server = try Child(["uffd-serve", "--socket", socket, "--memory", file.path])
        #expect(waitForSocket(socket))
        let client = try Child(["uffd-serve", "client", "--socket", socket, "--memory", file.path, "--regions", "16M",
                                "--threads", "2", "--touch-delay-us", "100", "--announce-after", "1000", "--json"])
        #expect(client.readLine(timeout: 60) == "touched 1000 pages")
        let worker = servingWorkers(of: server.pid)
        #expect(worker.count == 1)
        let watches = worker.compactMap { entry in (try? ProcessWatch(pid: entry.pid)).flatMap { ProcessTable.entry(entry.pid)?.start == entry.start ? $0 : nil } }
        #expect(Glibc.kill(server.pid, SIGKILL) == 0)  // not reaped yet: still the server
        let c = client.finish(timeout: 60)
        #expect(c.status == 0, "\(c.stderr)")
        #expect(decode(ClientResult.self, lastLineOf: c.stdout)?.mismatched_pages == 0, "\(c.stdout)")
        // The orphaned worker holds the server's output pipes until it sees the peer go.
        let s = server.finish(timeout: 30)
        #expect(s.status == 128 + SIGKILL)
        #expect(s.stderr.contains("the supervisor is gone; serving until the peer exits"), "\(s.stderr)")
        // Its output closes as it exits, a moment before the exit is complete: wait for that.
        let ended = watches.allSatisfy { (try? DescriptorPoll.wait([($0.fd.rawValue, .readable)], timeoutMilliseconds: 10_000))?.first?.isEmpty == false }
        #expect(watches.count == 1 && ended, "the worker outlived the peer")
    }

    @Test("without --exit-on-hangup the server ends when the peer process exits")
    func endsWhenPeerExits() throws {
        let file = try MemoryFile(mib: 4)
        let socket = socketPath()
        let server = try Child(["uffd-serve", "--socket", socket, "--memory", file.path, "--json"])
        #expect(waitForSocket(socket))
        let c = try run(["uffd-serve", "client", "--socket", socket, "--memory", file.path, "--regions", "4M"], timeout: 60)
        #expect(c.status == 0, "\(c.stdout) \(c.stderr)")
        let s = server.finish(timeout: 30)
        #expect(s.status == 0, "\(s.stderr)")
        #expect(decode(Report.self, lastLineOf: s.stdout)?.ended_by == "peer exited", "\(s.stdout)")
    }

    @Test("bad input from the peer: exit 2 with the reason, nothing served")
    func badInputExits() throws {
        let file = try MemoryFile(mib: 1)
        let socket = socketPath()
        let server = try Child(["uffd-serve", "--socket", socket, "--memory", file.path])
        #expect(waitForSocket(socket))
        // A region larger than the 1 MiB file.
        let client = try Child(["uffd-serve", "client", "--socket", socket, "--memory", file.path, "--regions", "2M"])
        let s = server.finish(timeout: 30)
        client.kill()
        #expect(s.status == 2)
        #expect(s.stderr.contains("faultline: error: bad regions: region 0 ends at file offset 2097152, past the end of the memory file (1048576 bytes)"), "\(s.stderr)")
    }

    @Test("a memory file that does not exist: exit 2 before listening")
    func missingMemoryFile() throws {
        let r = try run(["uffd-serve", "--socket", socketPath(), "--memory", "/nonexistent/snapshot.mem"], timeout: 30)
        #expect(r.status == 2)
        #expect(r.stderr.contains("memory file /nonexistent/snapshot.mem: open /nonexistent/snapshot.mem: ENOENT"), "\(r.stderr)")
    }
}
