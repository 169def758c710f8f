import FaultlineCore
import FaultlineTestSupport
import Foundation
import Testing

/// Parses the last JSON line a command printed.
func lastJSON(_ text: String) -> [String: Any]? {
    guard let line = text.split(separator: "\n").last(where: { $0.hasPrefix("{") }) else { return nil }
    return try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
}

/// Starts `faultline receive` on an ephemeral loopback port; returns it and its port.
func startReceiver(_ extra: [String] = [], sourceLocation: SourceLocation = #_sourceLocation) throws -> (receiver: Child, port: UInt16) {
    let receiver = try Child(["receive", "--listen", "127.0.0.1:0", "--json", "--accept-seconds", "20"] + extra)
    let line = receiver.readLine(timeout: 30) ?? ""
    let port = UInt16(line.split(separator: ":").last?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "") ?? 0
    guard port != 0 else {
        let stderr = receiver.finish(timeout: 5, sourceLocation: sourceLocation).stderr
        Issue.record("the receiver printed '\(line)' instead of its port; stderr: \(stderr)", sourceLocation: sourceLocation)
        throw HarnessError("faultline receive did not listen")
    }
    return (receiver, port)
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
    _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    usleep(200_000)
}

@Suite("Live migration", .serialized, .gate(.liveMigration))
struct MigrationTests {
    @Test(.gate(.everyFaultModeMigrates), arguments: [
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
                    "bytes_sent", "faults", "fault_latency_us", "fault_mode", "fault_mode_reason", "fault_requests",
                    "fault_requests_for_sent_pages", "recycled_pages", "recycled_pages_reused"] {
            #expect(j?[key] != nil, "missing \(key)")
        }
        #expect((j?["fault_requests_for_sent_pages"] as? Int ?? 0) <= (j?["fault_requests"] as? Int ?? 0))
        let reason = j?["fault_mode_reason"] as? String ?? ""
        let expectedPrefix = args.contains("--fault-mode") ? "requested" : "auto: "
        #expect(reason.hasPrefix(expectedPrefix), "\(reason)")
    }

    @Test(.gate(.cpuLatencyHeldDuringPostcopy))
    func bothSidesHoldTheCPULatencyRequestDuringPostcopyWhenAskedAndNoneByDefault() throws {
        // Off by default (no request); a number, 0 included (idle CPUs poll), is held on both
        // sides while post-copy runs (the device is writable here, so it is held).
        for (args, expected) in [([String](), Int32?.none), (["--postcopy-cpu-latency", "0"], 0), (["--postcopy-cpu-latency", "25"], 25)] {
            let r = try run(["demo", "--memory", "32M", "--json", "--precopy-rounds", "0", "--run-after", "0.3"] + args, timeout: 300)
            #expect(r.status == 0, "\(args): \(r.stderr)")
            let j = lastJSON(r.stdout)
            #expect(j?["digest_match"] as? Bool == true && j?["guest_check"] as? Bool == true, "\(args)")
            for key in ["postcopy_cpu_latency", "source_postcopy_cpu_latency"] {
                if let expected {
                    let o = j?[key] as? [String: Any]
                    #expect(o?["requested_us"] as? Int == Int(expected), "\(args) \(key): \(String(describing: o))")
                    #expect(o?["held"] as? Bool == true, "\(args) \(key): \(String(describing: o))")
                } else {
                    #expect(j?[key] is NSNull, "\(args) \(key): \(String(describing: j?[key]))")
                }
            }
        }
    }

    @Test func theYardstickCopyIsTimedAndTheGuestResumesAfterIt() throws {
        // --baseline: the destination parks its guest for the plain TCP copy, then resumes it.
        // The parking itself is not observable here; the resume is: a guest left parked
        // completes no pass, and the destination reports 0 passes after its 60 s patience.
        // The post-copy knobs are reported.
        let r = try run(["demo", "--memory", "32M", "--json", "--precopy-rounds", "0", "--baseline",
                         "--fault-around", "4", "--postcopy-vcpu-nice", "15", "--run-after", "0.5"], timeout: 300)
        #expect(r.status == 0, "\(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect((j?["tcp_baseline_seconds"] as? Double ?? 0) > 0, "no yardstick copy was timed")
        #expect(j?["fault_around_pages"] as? Int == 4)
        #expect(j?["digest_match"] as? Bool == true)
        #expect(j?["guest_check"] as? Bool == true)
        #expect((j?["passes_after_migration"] as? Int ?? 0) > 0, "the guest did not run on after the copy")
    }

    @Test(arguments: [
        (["demo", "--fault-around", "0"], "--fault-around must be 1...256"),
        (["demo", "--fault-around", "257"], "--fault-around must be 1...256"),
        (["demo", "--postcopy-vcpu-nice", "20"], "--postcopy-vcpu-nice must be 0...19"),
        (["receive", "--listen", "127.0.0.1:0", "--fault-around", "0"], "--fault-around must be 1...256"),
        (["receive", "--listen", "127.0.0.1:0", "--postcopy-vcpu-nice=-1"], "--postcopy-vcpu-nice must be 0...19"),
    ])
    func postcopyKnobsOutOfRangeAreRefused(args: [String], message: String) throws {
        let r = try run(args, timeout: 60)
        #expect(r.status != 0)
        #expect(r.stderr.contains(message), "\(args): \(r.stderr)")
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

    @Test func aPeerThatIsNotFaultlineIsNamedAndTurnedAway() throws {
        // A stranger on the socket is named and turned away; the receiver keeps waiting for a
        // real source (here until --accept-seconds runs out).
        let (receiver, port) = try startReceiver(["--accept-seconds", "3"])
        try rawSend(port: port, Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        let (status, _, stderr, _) = receiver.finish(timeout: 60)
        #expect(status == 2)
        #expect(stderr.contains("not a Faultline peer"), "\(stderr)")
        #expect(stderr.contains("timed out: waiting for the source"), "\(stderr)")
    }

    @Test func logLevelErrorKeepsWarningsOffStderrButNotTheError() throws {
        // The same stranger: its warning is below --log-level error; the final error is not a log line.
        let (receiver, port) = try startReceiver(["--accept-seconds", "3", "--log-level", "error"])
        try rawSend(port: port, Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        let (status, _, stderr, _) = receiver.finish(timeout: 60)
        #expect(status == 2)
        #expect(!stderr.contains("not a Faultline peer") && !stderr.contains("warning"), "\(stderr)")
        #expect(stderr.contains("timed out: waiting for the source"), "\(stderr)")
    }

    @Test func aWrongProtocolVersionIsNamed() throws {
        let (receiver, port) = try startReceiver()
        let layout = try GuestMemoryLayout(regions: [GuestMemoryRange(start: GuestPhysicalAddress(0), size: 0x10000)!])
        var hello = WireMessage.Hello(role: .bulk, sessionID: 7, layout: layout, vcpuCount: 1, features: [])
        hello.version = 7
        try rawSend(port: port, try WireEncoder.encode(.hello(hello)))
        let (status, _, stderr, _) = receiver.finish(timeout: 60)
        #expect(status == 2)
        #expect(stderr.contains("protocol version mismatch: we speak version \(WireProtocol.version), the peer speaks version 7"), "\(stderr)")
    }

    @Test func aTruncatedStreamIsNamedAndTurnedAway() throws {
        let (receiver, port) = try startReceiver(["--accept-seconds", "3"])
        let layout = try GuestMemoryLayout(regions: [GuestMemoryRange(start: GuestPhysicalAddress(0), size: 0x10000)!])
        let frame = try WireEncoder.encode(.hello(WireMessage.Hello(role: .bulk, sessionID: 7, layout: layout, vcpuCount: 1, features: [])))
        try rawSend(port: port, Array(frame.prefix(frame.count / 2)))
        let (status, _, stderr, _) = receiver.finish(timeout: 60)
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
        // Answers up to two connections, each within 60 s; the test waits for it before closing the socket.
        let served = DispatchSemaphore(value: 0)
        let server = Thread {
            defer { served.signal() }
            for _ in 0..<2 {
                var ready = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&ready, 1, 60_000) == 1 else { return }
                let c = accept(fd, nil, nil)
                guard c >= 0 else { return }
                let reply = Array("HTTP/1.1 400 Bad Request\r\n\r\n".utf8)
                _ = reply.withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                usleep(300_000)
                close(c)
            }
        }
        server.start()
        defer {
            shutdown(fd, Int32(SHUT_RDWR))
            if served.wait(timeout: .now() + 65) == .timedOut { Issue.record("the fake destination's thread did not end") }
        }
        let r = try run(["run", "--memory", "16M", "--migrate-to", "127.0.0.1:\(port)", "--migrate-after", "0.1",
                         "--reconnect-seconds", "2", "--json", "--run-after-failure", "3"], timeout: 120)
        // Before the switch-over: a clean failure, and the guest kept running.
        #expect(r.status == 3)
        #expect(r.stdout.contains("not a Faultline peer"), "\(r.stdout)")
        #expect(lastJSON(r.stdout)?["guest_running"] as? Bool == true)
    }
}

/// Two network namespaces joined by a veth pair: the same commands between two "hosts".
@Suite("Migration between network namespaces", .serialized, .gate(.netnsMigration))
struct NetnsMigrationTests {
    func sh(_ command: String) throws -> Int32 {
        try run(executable: "/bin/sh", arguments: ["-c", command], timeout: 60).status
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
        defer { _ = try? sh("ip netns del \(a); ip netns del \(b)") }
        try #require(try sh(setup) == 0, "cannot set up the namespaces and the veth pair: \(setup)")
        let receiver = try Child(["receive", "--listen", "10.77.0.2:7177", "--json", "--accept-seconds", "60"],
                                 as: ["/usr/sbin/ip", "netns", "exec", b])
        guard receiver.readLine(timeout: 30)?.hasPrefix("listening on") == true else {
            Issue.record("the receiver did not start: \(receiver.finish(timeout: 5).stderr)")
            return
        }
        let source = try run(["run", "--memory", "32M", "--migrate-to", "10.77.0.2:7177", "--migrate-after", "0.5", "--json",
                              "--precopy-rounds", "1"], as: ["/usr/sbin/ip", "netns", "exec", a], timeout: 300)
        let destination = receiver.finish(timeout: 60)
        #expect(source.status == 0, "\(source.stderr)")
        #expect(destination.status == 0, "\(destination.stderr)")
        #expect(lastJSON(source.stdout)?["digest_match"] as? Bool == true)
        let d = lastJSON(destination.stdout)
        #expect(d?["digest_match"] as? Bool == true)
        #expect(d?["guest_check"] as? Bool == true)
    }
}
