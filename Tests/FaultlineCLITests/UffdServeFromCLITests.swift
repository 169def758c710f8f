import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `uffd-serve --from`: a Firecracker-side client's guest memory filled from a snapshot that a
/// `serve-snapshot` serves, while it is still being fetched. The server holds its background
/// stream for a few seconds after the commit, so the first faults can only be served on
/// demand; every byte is checked against the snapshot's memory file.
@Suite("uffd-serve --from a snapshot server (processes)", .serialized, .timeLimit(.minutes(6)), .gate(.uffdServeFromServer))
struct UffdServeFromCLITests {
    /// The fields of the server's report these tests look at.
    struct Report: Decodable {
        struct Fetch: Decodable { let error: String?, digest_match: Bool, demand_pages: Int, reconnects: Int }
        let faults_served: UInt64
        let pages_unavailable: UInt64
        let fetch: Fetch?
    }
    typealias ClientResult = UffdServeCLITests.ClientResult

    func decode<T: Decodable>(_ type: T.Type, lastLineOf text: String) -> T? {
        guard let line = text.split(separator: "\n").last(where: { $0.hasPrefix("{\"") && !$0.hasPrefix("{\"chaos\"") }) else { return nil }
        return try? JSONDecoder().decode(T.self, from: Data(line.utf8))
    }

    /// The snapshot `s16`'s memory served to a client over 16 MiB from offset 0 by a
    /// `uffd-serve --from` with `extra` arguments; both sides' results and the server's output.
    func session(streamDelay: Double, extra: [String] = []) throws -> (Report?, ClientResult?, (status: Int32, stdout: String, stderr: String, timedOut: Bool)) {
        let (snapshotServer, endpoint) = try RemoteRestoreCLITests.startServer(["--stream-delay-seconds", "\(streamDelay)"])
        defer { snapshotServer.kill() }
        let socket = "/tmp/faultline-uffd-from-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let server = try Child(["uffd-serve", "--from", endpoint, "--snapshot", "s16", "--socket", socket, "--exit-on-hangup", "--json"] + extra)
        let deadline = MonotonicClock.deadline(after: 60)
        var info = stat()
        while stat(socket, &info) != 0 && MonotonicClock.nanoseconds() < deadline { MonotonicClock.sleep(microseconds: 10_000) }
        let client = try run(["uffd-serve", "client", "--socket", socket, "--memory", RemoteRestoreCLITests.library + "/s16/memory.bin",
                              "--regions", "16M", "--threads", "2", "--json"], timeout: 120)
        #expect(client.status == 0, "client: \(client.stdout) \(client.stderr)")
        let served = server.finish(timeout: 120)
        return (decode(Report.self, lastLineOf: served.stdout), decode(ClientResult.self, lastLineOf: client.stdout), served)
    }

    @Test("faults before the stream comes are fetched on demand; every byte verifies; the fetched digest matches")
    func servesWhileFetching() throws {
        let (report, client, served) = try session(streamDelay: 3)
        #expect(served.status == 0, "\(served.stdout)\n\(served.stderr)")
        #expect(client?.pages == 4096 && client?.mismatched_pages == 0, "\(String(describing: client))")
        #expect(report?.faults_served == 4096 && report?.pages_unavailable == 0, "\(served.stdout)")
        let fetch = report?.fetch
        #expect(fetch?.error == nil && fetch?.digest_match == true, "\(served.stdout)")
        #expect((fetch?.demand_pages ?? 0) > 0, "the stream was held: the first faults were fetched on demand: \(served.stdout)")
    }

    @Test("a cut of the demand connection while faults wait on it is resumed, and every byte still verifies")
    func cutFetchIsResumed() throws {
        // The stream is held: the demand replies cross the fault connection, and the cut hits one.
        let (report, client, served) = try session(streamDelay: 3, extra: ["--chaos-event", "postcopy:fault:to_destination:3:cut"])
        #expect(served.status == 0, "\(served.stdout)\n\(served.stderr)")
        let chaos = served.stdout.split(separator: "\n").compactMap {
            (try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])?["chaos"] as? [String: Any]
        }.first
        #expect((chaos?["fired"] as? [String])?.count == 1, "the cut happened: \(served.stdout)")
        #expect(client?.pages == 4096 && client?.mismatched_pages == 0, "\(String(describing: client))")
        #expect(report?.fetch?.digest_match == true && (report?.fetch?.reconnects ?? 0) >= 1, "\(served.stdout)\n\(served.stderr)")
    }

    @Test("the snapshot server dies for good mid-way: pages that never arrived are poisoned, never served wrong")
    func deadServerPoisons() throws {
        let (snapshotServer, endpoint) = try RemoteRestoreCLITests.startServer(["--stream-delay-seconds", "60"])
        let socket = "/tmp/faultline-uffd-from-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let server = try Child(["uffd-serve", "--from", endpoint, "--snapshot", "s16", "--socket", socket, "--exit-on-hangup",
                                "--reconnect-seconds", "2", "--json"])
        let deadline = MonotonicClock.deadline(after: 60)
        var info = stat()
        while stat(socket, &info) != 0 && MonotonicClock.nanoseconds() < deadline { MonotonicClock.sleep(microseconds: 10_000) }
        // One thread, slowly: the server is killed once 100 pages are in; the rest can never come.
        let client = try Child(["uffd-serve", "client", "--socket", socket, "--memory", RemoteRestoreCLITests.library + "/s16/memory.bin",
                                "--regions", "16M", "--threads", "1", "--touch-delay-us", "500", "--announce-after", "100", "--json"])
        #expect(client.readLine(timeout: 60) == "touched 100 pages")
        snapshotServer.kill()
        let c = client.finish(timeout: 120)
        #expect(c.status == 128 + SIGBUS, "the client's access to a page that never arrived is a memory error: \(c.status) \(c.stdout) \(c.stderr)")
        let served = server.finish(timeout: 120)
        #expect(served.status == 1, "\(served.stdout)\n\(served.stderr)")
        let report = decode(Report.self, lastLineOf: served.stdout)
        #expect((report?.pages_unavailable ?? 0) >= 1, "\(served.stdout)")
        #expect(report?.fetch?.error != nil, "\(served.stdout)")
    }

    @Test("a snapshot the server does not have, or --memory with --from, is refused before listening")
    func refusals() throws {
        let (snapshotServer, endpoint) = try RemoteRestoreCLITests.startServer()
        defer { snapshotServer.kill() }
        let missing = try run(["uffd-serve", "--from", endpoint, "--snapshot", "nope", "--socket", "/tmp/faultline-never.sock"], timeout: 60)
        #expect(missing.status != 0 && missing.stderr.contains("refused the restore"), "\(missing.stderr)")
        let both = try run(["uffd-serve", "--from", endpoint, "--memory", "/dev/null", "--socket", "/tmp/faultline-never.sock"], timeout: 30)
        #expect(both.status != 0 && both.stderr.contains("not both"), "\(both.stderr)")
    }
}
