import FaultlineCore
import Foundation
import Testing

/// Parses the last JSON line a command printed.
func lastJSON(_ text: String) -> [String: Any]? {
    guard let line = text.split(separator: "\n").last(where: { $0.hasPrefix("{") }) else { return nil }
    return try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
}

/// Starts `faultline receive` on an ephemeral loopback port; returns the process, its port
/// and a reader for the rest of its output.
func startReceiver(_ extra: [String] = []) throws -> (Process, UInt16, Pipe, Pipe) {
    let p = Process()
    p.executableURL = faultlineBinary()
    p.arguments = ["receive", "--listen", "127.0.0.1:0", "--json", "--accept-seconds", "20"] + extra
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    var line = ""
    while !line.hasSuffix("\n") {
        let d = out.fileHandleForReading.readData(ofLength: 1)
        if d.isEmpty { break }
        line += String(decoding: d, as: UTF8.self)
    }
    let port = UInt16(line.split(separator: ":").last?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "") ?? 0
    return (p, port, out, err)
}

/// A raw TCP client for speaking (or not speaking) the protocol to a receiver.
func rawSend(port: UInt16, _ bytes: [UInt8]) throws {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = port.bigEndian
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    #expect(rc == 0)
    _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
    usleep(200_000)
}

func finish(_ p: Process, _ err: Pipe) -> (Int32, String) {
    let e = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    return (p.terminationStatus, e)
}

@Suite("Live migration", .serialized, .enabled(if: kvmUsable && isRoot, "needs /dev/kvm and a privileged userfaultfd"))
struct MigrationTests {
    @Test(arguments: [
        [],  // the default: --fault-mode auto
        ["--fault-mode", "vcpu-exit"],
        ["--fault-mode", "uffd-missing"],
        ["--fault-mode", "uffd-missing", "--uffd", "per-vcpu"],
        ["--fault-mode", "uffd-minor"],
        ["--fault-mode", "vcpu-exit", "--precopy-rounds", "0", "--workload", "dirtier"],
        ["--fault-mode", "uffd-missing", "--prealloc", "--precopy-rounds", "2"],
        ["--fault-mode", "uffd-minor", "--prealloc", "--precopy-rounds", "0"],
    ])
    func everyFaultModeMigratesWithMatchingDigests(args: [String]) throws {
        let r = try run(["demo", "--memory", "64M", "--json", "--migrate-after", "0.5", "--run-after", "0.5"] + args, timeout: 300)
        #expect(r.status == 0, "\(args): \(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect(j?["digest_match"] as? Bool == true, "\(args)")
        #expect(j?["guest_check"] as? Bool == true, "\(args)")
        #expect(j?["guest_mismatches"] as? Int == 0)
        #expect((j?["passes_after_migration"] as? Int ?? 0) > 0, "the guest kept running on the destination")
        for key in ["total_seconds", "downtime_ms", "precopy_pages", "demand_pages", "background_pages", "zero_pages",
                    "bytes_sent", "faults", "fault_latency_us", "fault_mode", "fault_mode_reason"] {
            #expect(j?[key] != nil, "missing \(key)")
        }
        let reason = j?["fault_mode_reason"] as? String ?? ""
        let expectedPrefix = args.contains("--fault-mode") ? "requested" : "auto: "
        #expect(reason.hasPrefix(expectedPrefix), "\(reason)")
    }

    @Test func aCutConnectionResumesAndCompletes() throws {
        let r = try run(["demo", "--memory", "64M", "--json", "--precopy-rounds", "0", "--inject-disconnect-after-pages", "3000"],
                        timeout: 300)
        #expect(r.status == 0, "\(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect((j?["reconnects"] as? Int ?? 0) >= 1)
        #expect(j?["digest_match"] as? Bool == true)
        #expect(j?["guest_check"] as? Bool == true)
    }

    @Test func aCorruptedPageIsRefusedAndFetchedAgain() throws {
        let r = try run(["demo", "--memory", "64M", "--json", "--precopy-rounds", "0", "--inject-corrupt-page"], timeout: 300)
        #expect(r.status == 0, "\(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect((j?["corrupt_pages_rejected"] as? Int ?? 0) >= 1)
        #expect(j?["digest_match"] as? Bool == true)
        #expect(j?["guest_check"] as? Bool == true)
    }

    @Test func aWriteTheDirtyLogMissedFailsTheMigration() throws {
        // The source leaves one changed page out of the final dirty set: the destination keeps
        // the stale pre-copy copy, and the digest (recomputed from the paused memory for pages
        // carried over from pre-copy) must catch it.
        let r = try run(["demo", "--memory", "64M", "--json", "--workload", "dirtier", "--precopy-rounds", "1",
                         "--migrate-after", "0.5", "--run-after", "0.2", "--inject-missed-dirty-page"], timeout: 300)
        #expect(r.status != 0)
        #expect(r.stderr.contains("memory digest mismatch"), "\(r.stderr)")
    }

    @Test func aPeerThatIsNotFaultlineIsNamed() throws {
        let (p, port, _, err) = try startReceiver()
        try rawSend(port: port, Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        let (status, stderr) = finish(p, err)
        #expect(status == 2)
        #expect(stderr.contains("not a Faultline peer"), "\(stderr)")
    }

    @Test func aWrongProtocolVersionIsNamed() throws {
        let (p, port, _, err) = try startReceiver()
        let layout = try GuestMemoryLayout(regions: [GuestMemoryRange(start: GuestPhysicalAddress(0), size: 0x10000)!])
        var hello = WireMessage.Hello(role: .bulk, sessionID: 7, layout: layout, vcpuCount: 1, features: [])
        hello.version = 2
        try rawSend(port: port, try WireEncoder.encode(.hello(hello)))
        let (status, stderr) = finish(p, err)
        #expect(status == 2)
        #expect(stderr.contains("protocol version mismatch: we speak version 1, the peer speaks version 2"), "\(stderr)")
    }

    @Test func aTruncatedStreamIsNamed() throws {
        let (p, port, _, err) = try startReceiver()
        let layout = try GuestMemoryLayout(regions: [GuestMemoryRange(start: GuestPhysicalAddress(0), size: 0x10000)!])
        let frame = try WireEncoder.encode(.hello(WireMessage.Hello(role: .bulk, sessionID: 7, layout: layout, vcpuCount: 1, features: [])))
        try rawSend(port: port, Array(frame.prefix(frame.count / 2)))
        let (status, stderr) = finish(p, err)
        #expect(status == 2)
        #expect(stderr.contains("ended in the middle of a frame"), "\(stderr)")
    }

    @Test func theSourceNamesADestinationThatIsNotFaultline() throws {
        // A listener that answers with HTTP.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        listen(fd, 4)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        let port = UInt16(bigEndian: addr.sin_port)
        let server = Thread {
            for _ in 0..<2 {
                let c = accept(fd, nil, nil)
                guard c >= 0 else { return }
                let reply = Array("HTTP/1.1 400 Bad Request\r\n\r\n".utf8)
                _ = reply.withUnsafeBytes { send(c, $0.baseAddress, $0.count, 0) }
                usleep(300_000)
                close(c)
            }
        }
        server.start()
        let r = try run(["run", "--memory", "16M", "--migrate-to", "127.0.0.1:\(port)", "--migrate-after", "0.1",
                         "--reconnect-seconds", "2"], timeout: 120)
        #expect(r.status == 2)
        #expect(r.stderr.contains("not a Faultline peer"), "\(r.stderr)")
    }
}

/// Two network namespaces joined by a veth pair: the same commands between two "hosts".
@Suite("Migration between network namespaces", .serialized, .enabled(if: kvmUsable && isRoot, "needs root and /dev/kvm"))
struct NetnsMigrationTests {
    func sh(_ command: String) -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try? p.run()
        p.waitUntilExit()
        return p.terminationStatus
    }

    @Test func migratesAcrossAVethPair() throws {
        let a = "flA\(getpid())", b = "flB\(getpid())"
        let setup = """
        ip netns add \(a) && ip netns add \(b) && \
        ip link add va\(getpid() % 10000) netns \(a) type veth peer name vb\(getpid() % 10000) netns \(b) && \
        ip -n \(a) addr add 10.77.0.1/24 dev va\(getpid() % 10000) && ip -n \(b) addr add 10.77.0.2/24 dev vb\(getpid() % 10000) && \
        ip -n \(a) link set va\(getpid() % 10000) up && ip -n \(b) link set vb\(getpid() % 10000) up && \
        ip -n \(a) link set lo up && ip -n \(b) link set lo up
        """
        defer { _ = sh("ip netns del \(a); ip netns del \(b)") }
        guard sh(setup) == 0 else {
            print("SKIP netns migration: cannot create network namespaces and a veth pair here")
            return
        }
        let bin = faultlineBinary().path
        let receiver = Process()
        receiver.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        receiver.arguments = ["netns", "exec", b, bin, "receive", "--listen", "10.77.0.2:7177", "--json", "--accept-seconds", "60"]
        let out = Pipe()
        receiver.standardOutput = out
        receiver.standardError = FileHandle.nullDevice
        try receiver.run()
        let source = try run(["run", "--memory", "32M", "--migrate-to", "10.77.0.2:7177", "--migrate-after", "0.5", "--json",
                              "--precopy-rounds", "1"], as: ["/usr/sbin/ip", "netns", "exec", a], timeout: 300)
        let destinationOut = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        receiver.waitUntilExit()
        #expect(source.status == 0, "\(source.stderr)")
        #expect(receiver.terminationStatus == 0)
        #expect(lastJSON(source.stdout)?["digest_match"] as? Bool == true)
        let d = lastJSON(destinationOut)
        #expect(d?["digest_match"] as? Bool == true)
        #expect(d?["guest_check"] as? Bool == true)
    }
}
