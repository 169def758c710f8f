import CFaultlineShim
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Every kind of bad input from the peer gets a clear error, and nothing is installed in the
/// peer's memory (no page of it becomes resident).
@Suite("uffd-serve: bad input is refused and nothing is installed", .serialized, .timeLimit(.minutes(3)),
       .gate(.pageServerBadInput))
struct PageServerBadInputTests {
    /// Starts a server on `file`, lets `send` play the peer, and checks the server failed as
    /// `expected` says, naming it (`mentions`), with none of `peer`'s memory touched.
    func expectRefusal(file: SnapshotFile? = nil, peer: FirecrackerPeer? = nil, mentions: String,
                       options: PageServerSupervisor.Options = PageServerSupervisor.Options(),
                       sourceLocation: SourceLocation = #_sourceLocation,
                       _ expected: (PageServerError) -> Bool, send: (FirecrackerPeer, String) throws -> Void) throws {
        let file = try file ?? SnapshotFile(size: 1 << 20)
        let peer = try peer ?? FirecrackerPeer(sizes: [1 << 20])
        let server = try RunningPageServer(file: file, options: options)
        try send(peer, server.socketPath)
        let outcome = try server.outcome(within: 20)
        guard case .failure(let error) = outcome else {
            Issue.record("the server accepted it", sourceLocation: sourceLocation)
            return
        }
        guard let error = error as? PageServerError else {
            Issue.record("not a PageServerError: \(error)", sourceLocation: sourceLocation)
            return
        }
        #expect(expected(error), "unexpected error: \(error)", sourceLocation: sourceLocation)
        #expect("\(error)".contains(mentions), "\"\(error)\" does not mention \"\(mentions)\"", sourceLocation: sourceLocation)
        for r in peer.regions.indices {
            #expect(try peer.residentPages(region: r) == 0, "region \(r) has pages installed", sourceLocation: sourceLocation)
        }
    }

    func sendJSON(_ text: String) -> (FirecrackerPeer, String) throws -> Void {
        { peer, path in try peer.connect(to: path, bytes: Array(text.utf8)) }
    }

    func sendRegions(_ edit: @escaping (inout [FirecrackerRegion]) -> Void) -> (FirecrackerPeer, String) throws -> Void {
        { peer, path in
            var regions = peer.message
            edit(&regions)
            try peer.connect(to: path, bytes: FirecrackerMessage.encode(regions))
        }
    }

    @Test func notJSON() throws {
        try expectRefusal(mentions: "not valid JSON", { if case .badMessage = $0 { true } else { false } },
                          send: sendJSON("[{\"base_host_virt_addr\": 140000000000, \"size\": 4096, oops]"))
    }

    @Test func notAnArray() throws {
        try expectRefusal(mentions: "not an array of regions", { if case .badMessage = $0 { true } else { false } },
                          send: sendJSON("{\"base_host_virt_addr\": 1}"))
    }

    @Test func negativeSize() throws {
        try expectRefusal(mentions: "region 0 \"size\": -4096 is negative", { if case .badMessage = $0 { true } else { false } },
                          send: sendJSON("[{\"base_host_virt_addr\": 4096, \"size\": -4096, \"offset\": 0, \"page_size\": 4096}]"))
    }

    @Test func noRegions() throws {
        try expectRefusal(mentions: "no regions", { if case .badRegions(.noRegions) = $0 { true } else { false } }, send: sendJSON("[]"))
    }

    @Test func missingPageSize() throws {
        try expectRefusal(mentions: "has no \"page_size\"", { if case .badRegions(.missingField) = $0 { true } else { false } },
                          send: sendRegions { $0[0].page_size = nil; $0[0].page_size_kib = nil })
    }

    @Test func descriptorIsNotAUserfaultfd() throws {
        let file = try SnapshotFile(size: 1 << 20)
        try expectRefusal(file: file, mentions: "not a userfaultfd", { if case .badUserfaultfd(.notAUserfaultfd) = $0 { true } else { false } }) { peer, path in
            try peer.connect(to: path, descriptors: [file.fd.rawValue])
        }
    }

    @Test func noDescriptor() throws {
        try expectRefusal(mentions: "no userfaultfd with them", { if case .noDescriptor = $0 { true } else { false } }) { peer, path in
            try peer.connect(to: path, descriptors: [])
        }
    }

    @Test("the peer connects and closes at once: retried, then refused")
    func closedAtOnce() throws {
        try expectRefusal(mentions: "closed the connection", { if case .peerClosedEarly(attempts: 5) = $0 { true } else { false } }) { _, path in
            _ = try UnixConnection.connect(to: path)
        }
    }

    @Test("the peer connects and sends nothing: refused once the wait is over")
    func silentPeer() throws {
        var options = PageServerSupervisor.Options()
        options.timing.firstMessageSeconds = 0.5
        let held = Locked<UnixConnection?>(nil)
        try expectRefusal(mentions: "sent nothing in 0.9 s", options: options, { if case .silentPeer = $0 { true } else { false } }) { _, path in
            let connection = try UnixConnection.connect(to: path)
            held.withLock { $0 = connection }
        }
    }

    @Test("three descriptors: the secret-free protocol, not this one")
    func threeDescriptors() throws {
        let file = try SnapshotFile(size: 1 << 20)
        try expectRefusal(file: file, mentions: "secret-free", { if case .unexpectedDescriptors(count: 3) = $0 { true } else { false } }) { peer, path in
            try peer.connect(to: path, descriptors: [peer.uffd.fd.rawValue, file.fd.rawValue, file.fd.rawValue])
        }
    }

    @Test func overlappingRegions() throws {
        let peer = try FirecrackerPeer(sizes: [1 << 20, 1 << 20])
        try expectRefusal(file: try SnapshotFile(size: 2 << 20), peer: peer, mentions: "regions 0 and 1 overlap",
                          { if case .badRegions(.overlap(0, 1)) = $0 { true } else { false } },
                          send: sendRegions { $0[1].base_host_virt_addr = $0[0].base_host_virt_addr! + 4096 })
    }

    @Test("a region that starts past the end of the file")
    func regionPastTheFile() throws {
        try expectRefusal(mentions: "past the end of the memory file", { if case .badRegions(.startsPastEndOfFile) = $0 { true } else { false } },
                          send: sendRegions { $0[0].offset = 1 << 20 })
    }

    @Test("a file shorter than the regions")
    func shortFile() throws {
        try expectRefusal(file: try SnapshotFile(size: 1 << 20), peer: try FirecrackerPeer(sizes: [2 << 20]),
                          mentions: "the file is 1048576 bytes short",
                          { if case .badRegions(.endsPastEndOfFile) = $0 { true } else { false } }, send: sendRegions { _ in })
    }

    @Test func unsupportedPageSize() throws {
        try expectRefusal(mentions: "page size 8192 is neither", { if case .badRegions(.unsupportedPageSize(index: 0, 8192)) = $0 { true } else { false } },
                          send: sendRegions { $0[0].page_size = 8192; $0[0].page_size_kib = 8192 })
    }

    @Test("page_size_kib in KiB (4) is refused, saying the field carries bytes")
    func pageSizeKibInKiB() throws {
        try expectRefusal(mentions: "even in page_size_kib", { if case .badRegions(.unsupportedPageSize(index: 0, 4)) = $0 { true } else { false } },
                          send: sendRegions { $0[0].page_size = nil; $0[0].page_size_kib = 4 })
    }

    @Test func conflictingPageSizes() throws {
        try expectRefusal(mentions: "disagree", { if case .badRegions(.conflictingPageSizes) = $0 { true } else { false } },
                          send: sendRegions { $0[0].page_size_kib = 2 << 20 })
    }

    @Test func sizeNotPageAligned() throws {
        try expectRefusal(mentions: "size 0x3100 is not a multiple of 4096",
                          { if case .badRegions(.misaligned(index: 0, field: "size", _, _)) = $0 { true } else { false } },
                          send: sendRegions { $0[0].size = 3 * 4096 + 256 })
    }

    @Test func baseNotPageAligned() throws {
        try expectRefusal(mentions: "base_host_virt_addr",
                          { if case .badRegions(.misaligned(index: 0, field: "base_host_virt_addr", _, _)) = $0 { true } else { false } },
                          send: sendRegions { $0[0].base_host_virt_addr! += 512 })
    }

    @Test("a blocking userfaultfd (not Firecracker's O_NONBLOCK)")
    func blockingUserfaultfd() throws {
        let blocking = try Userfaultfd(required: [.eventRemove], flags: [], label: "blocking uffd")
        try expectRefusal(mentions: "O_NONBLOCK", { if case .badUserfaultfd(.blocking) = $0 { true } else { false } }) { peer, path in
            try peer.connect(to: path, descriptors: [blocking.fd.rawValue])
        }
    }

    @Test("a userfaultfd whose API was never negotiated")
    func uninitializedUserfaultfd() throws {
        let raw = fl_userfaultfd_syscall(O_CLOEXEC | O_NONBLOCK)
        try #require(raw >= 0)
        let fresh = FileDescriptor(adopting: raw, label: "fresh uffd")
        try expectRefusal(mentions: "never initialized", { if case .badUserfaultfd(.notInitialized) = $0 { true } else { false } }) { peer, path in
            try peer.connect(to: path, descriptors: [fresh.rawValue])
        }
    }

    @Test("a userfaultfd asking for fork events")
    func unhandledFeatures() throws {
        let forking = try Userfaultfd(required: [.eventFork, .eventRemove], flags: [.nonBlocking], label: "forking uffd")
        try expectRefusal(mentions: "EVENT_FORK", { if case .badUserfaultfd(.unsupportedFeatures) = $0 { true } else { false } }) { peer, path in
            try peer.connect(to: path, descriptors: [forking.fd.rawValue])
        }
    }

    @Test("a peer whose uid is not allowed is refused; the server goes on waiting")
    func refusedUser() throws {
        var options = PageServerSupervisor.Options(policy: PeerPolicy(allowedUIDs: [HostProcess.effectiveUserID &+ 4242]))
        options.connectTimeoutSeconds = 1.5
        let file = try SnapshotFile(size: 1 << 20)
        let peer = try FirecrackerPeer(sizes: [1 << 20])
        let server = try RunningPageServer(file: file, options: options)
        // The send may meet a connection the server has already closed (EPIPE).
        try? peer.connect(to: server.socketPath)
        let outcome = try server.outcome(within: 20)
        guard case .failure(PageServerError.noPeer) = outcome else {
            Issue.record("expected no allowed peer, got \(outcome)")
            return
        }
        let log = server.logLines.withLock { $0 }
        #expect(log.contains { $0.contains("refused a connection") && $0.contains("uid \(HostProcess.effectiveUserID) is not allowed") }, "\(log)")
        #expect(try peer.residentPages(region: 0) == 0)
    }
}
