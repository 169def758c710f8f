import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `serve-snapshot` and `restore --from` end to end on the real kernel, over loopback: a
/// snapshot of a running guest is served and restored lazily, its memory read back against
/// the snapshot's digest and the guest's own check green; a cut after the commit is resumed,
/// one before it is a clean failure; a corrupt snapshot and invalid requests are refused with
/// the reason, on both sides, and the server serves on.
@Suite("Remote restore (CLI)", .serialized, .gate(.remoteRestore))
struct RemoteRestoreCLITests {
    /// A folder of snapshots: `s16` (16 MiB, a running selfcheck guest) and `bad`, a copy with a corrupt chunk.
    static let library: String = {
        let path = NSTemporaryDirectory() + "faultline-cli-remote-\(getpid())"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        _ = try? run(["run", "--vcpus", "2", "--memory", "16M", "--workload", "selfcheck", "--snapshot-to", path + "/s16",
                      "--snapshot-after", "0.5", "--json"], timeout: 120)
        try? FileManager.default.copyItem(atPath: path + "/s16", toPath: path + "/bad")
        if let handle = try? FileHandle(forUpdating: URL(fileURLWithPath: path + "/bad/memory.bin")) {
            try? handle.seek(toOffset: 4096 * 2000 + 7)
            try? handle.write(contentsOf: Data([0xEE, 0xEE]))
            try? handle.close()
        }
        return path
    }()

    /// A `serve-snapshot --json` of the library on a free loopback port, and that endpoint.
    static func startServer(_ extra: [String] = [], sourceLocation: SourceLocation = #_sourceLocation) throws -> (server: Child, endpoint: String) {
        let server = try Child(["serve-snapshot", library, "--listen", "127.0.0.1:0", "--json"] + extra)
        let line = server.readLine(timeout: 30) ?? ""
        guard line.hasPrefix("listening on ") else {
            let stderr = server.finish(timeout: 5, sourceLocation: sourceLocation).stderr
            Issue.record("serve-snapshot printed '\(line)'; stderr: \(stderr)", sourceLocation: sourceLocation)
            throw HarnessError("faultline serve-snapshot did not listen")
        }
        return (server, String(line.dropFirst("listening on ".count)))
    }

    /// The server's record of its next request (one JSON line).
    func nextRecord(_ server: Child) -> [String: Any]? {
        guard let line = server.readLine(timeout: 60) else { return nil }
        return try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
    }

    func restore(_ endpoint: String, _ extra: [String]) throws -> CLIRun {
        try run(["restore", "--from", endpoint, "--snapshot", "s16", "--lazy", "--run-after", "0.3", "--json"] + extra, timeout: 120)
    }

    @Test("a 16 MiB snapshot restored from a server: digest and guest check", .timeLimit(.minutes(3)))
    func remoteRestoreCompletes() throws {
        let (server, endpoint) = try Self.startServer()
        let r = try restore(endpoint, [])
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect(j?["from"] as? String == endpoint)
        #expect(j?["digest_match"] as? Bool == true, "\(r.stdout)")
        #expect(j?["guest_check"] as? Bool == true)
        #expect((j?["passes_after_restore"] as? Int ?? 0) > 0, "the restored guest ran")
        // Pages the guest rewrote after they arrived enter the digest with the checksum they came
        // with; how many depends on the guest's pace, so any page read back shows the read-back ran.
        #expect((j?["digest_pages_from_memory"] as? Int ?? 0) > 0, "the digest was read from the restored memory")
        #expect((j?["pages_before_start"] as? Int ?? -1) < 100, "lazy: the guest started before RAM was in")
        let record = nextRecord(server)
        #expect(record?["outcome"] as? String == "completed", "\(String(describing: record))")
        #expect(record?["snapshot"] as? String == "s16")
    }

    @Test("a cut after the commit is resumed; one before it fails cleanly and the server serves on", .timeLimit(.minutes(4)))
    func cutsAroundTheCommit() throws {
        let (server, endpoint) = try Self.startServer()
        let after = try restore(endpoint, ["--chaos-event", "postcopy:bulk:to_destination:3:cut"])
        #expect(after.status == 0, "\(after.stdout)\n\(after.stderr)")
        let chaos = after.stdout.split(separator: "\n").compactMap {
            (try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any])?["chaos"] as? [String: Any]
        }.first
        #expect((chaos?["fired"] as? [String])?.count == 1, "\(after.stdout)")
        let j = lastJSON(after.stdout)
        #expect(j?["digest_match"] as? Bool == true && j?["guest_check"] as? Bool == true)
        #expect((j?["reconnects"] as? Int ?? 0) >= 1, "resumed: \(after.stdout)")
        #expect(nextRecord(server)?["outcome"] as? String == "completed")

        let before = try restore(endpoint, ["--chaos-event", "switchover:bulk:to_destination:0:cut"])
        #expect(before.status == 3, "\(before.stdout)\n\(before.stderr)")
        #expect(lastJSON(before.stdout)?["outcome"] as? String == "failed_before_start")
        #expect(before.stderr.contains("before the restored guest started"), "\(before.stderr)")
        let failed = nextRecord(server)
        #expect(failed?["outcome"] as? String == "failed" && failed?["committed"] as? Bool == false, "\(String(describing: failed))")

        let retried = try restore(endpoint, ["--chaos-event", "switchover:bulk:to_destination:0:cut", "--retries", "1"])
        #expect(retried.status == 0, "a second session completes: \(retried.stdout)\n\(retried.stderr)")
        #expect(nextRecord(server)?["outcome"] as? String == "completed")
    }

    @Test("a corrupt snapshot is refused on both sides; the next request is served", .timeLimit(.minutes(3)))
    func corruptSnapshotRefused() throws {
        let (server, endpoint) = try Self.startServer()
        let r = try run(["restore", "--from", endpoint, "--snapshot", "bad", "--json"], timeout: 60)
        #expect(r.status == 2, "\(r.stdout)\n\(r.stderr)")
        #expect(r.stderr.contains("refused the restore") && r.stderr.contains("snapshot memory is corrupt"), "\(r.stderr)")
        #expect(lastJSON(r.stdout)?["outcome"] as? String == "refused")
        let record = nextRecord(server)
        #expect(record?["outcome"] as? String == "refused")
        #expect((record?["error"] as? String)?.contains("snapshot memory is corrupt") == true, "\(String(describing: record))")
        let good = try restore(endpoint, [])
        #expect(good.status == 0 && lastJSON(good.stdout)?["digest_match"] as? Bool == true, "\(good.stdout)\n\(good.stderr)")
        #expect(nextRecord(server)?["outcome"] as? String == "completed")
    }

    @Test("an unknown or invalid request is refused with the reason", .timeLimit(.minutes(3)))
    func invalidRequestsRefused() throws {
        let (server, endpoint) = try Self.startServer()
        let address = try #require(SocketEndpoint(parsing: endpoint))
        func exchange(_ bytes: [UInt8]) throws -> String {
            let socket = try StreamSocket.connect(to: address, timeoutSeconds: 5)
            socket.setReceiveTimeout(seconds: 20)
            try socket.sendAll(bytes)
            var got: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = try buffer.withUnsafeMutableBytes { try socket.receive(into: $0) }
                if n == 0 { break }
                got += buffer[0..<n]
            }
            return String(decoding: got.dropFirst(ServiceFrame.headerSize), as: UTF8.self)
        }
        let garbage = try exchange(Array("GET / HTTP/1.0\r\n\r\n".utf8))
        #expect(garbage.contains("\"refused\"") && garbage.contains("does not speak the snapshot service protocol"), "\(garbage)")
        let unknown = try exchange(ServiceFrame.encode(Array(#"{"type":"delete","version":1}"#.utf8)))
        #expect(unknown.contains("\"refused\"") && unknown.contains("unknown request type 'delete'"), "\(unknown)")
        let escape = try exchange(ServiceFrame.encode(Array(
            #"{"type":"restore","version":1,"dial_back_port":9,"snapshot":"../etc","mode":"lazy","retries":0}"#.utf8)))
        #expect(escape.contains("\"refused\"") && escape.contains("is not a folder name"), "\(escape)")
        for _ in 0..<3 { #expect(nextRecord(server)?["outcome"] as? String == "refused") }
        let good = try restore(endpoint, [])
        #expect(good.status == 0, "the server serves on: \(good.stdout)\n\(good.stderr)")
    }
}
