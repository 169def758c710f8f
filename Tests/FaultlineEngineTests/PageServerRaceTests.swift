import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// A fault and a REMOVE of the same page, in both orders, forced with the server held before
/// its fills: the page must end as zeros either way (the balloon took it).
@Suite("uffd-serve: a fault and a REMOVE of the same page", .serialized, .timeLimit(.minutes(2)),
       .gate(.pageServerRace))
struct PageServerRaceTests {
    /// A gate the server waits at the first time it has faults to fill.
    final class Gate: @unchecked Sendable {
        private let condition = TimedCondition()
        private var arrived = false, isOpen = false
        func arrive() {
            condition.withLock { arrived = true }
            condition.broadcast()
            condition.wait { isOpen }
        }
        func awaitArrival() -> Bool { condition.wait(timeoutNanoseconds: 10_000_000_000) { arrived } }
        func open() {
            condition.withLock { isOpen = true }
            condition.broadcast()
        }
    }

    /// A PageServer on the peer's own userfaultfd (the handshake is tested elsewhere), run on
    /// a thread until `stop`.
    final class DirectServer: @unchecked Sendable {
        let ledger: PageServerLedger
        let server: PageServer
        let stop = try! EventFD()
        var thread: OSThread?

        init(peer: FirecrackerPeer, file: SnapshotFile, hooks: PageServer.Hooks) throws {
            let layout = try SnapshotLayout.validate(peer.message.map(\.fields), fileSize: UInt64(file.size))
            ledger = try PageServerLedger.create(for: layout)
            server = try PageServer(uffd: peer.uffd, layout: layout, file: file.mapped, ledger: ledger, hooks: hooks)
            let server = self.server, stop = self.stop
            thread = try OSThread(name: "page server") { try? server.run(until: stop.fd) }
        }

        func finish() {
            stop.signal()
            thread?.join()
        }
    }

    @Test("the fault is read first, then the REMOVE arrives before its fill: EAGAIN, events first, zeros")
    func faultThenRemove() throws {
        let file = try SnapshotFile(size: 1 << 20)
        let peer = try FirecrackerPeer(sizes: [1 << 20])
        let gate = Gate()
        var once = false
        var hooks = PageServer.Hooks()
        hooks.beforeFilling = { pending in
            if pending > 0 && !once { once = true; gate.arrive() }
        }
        let server = try DirectServer(peer: peer, file: file, hooks: hooks)
        let page = 5 * 4096
        let seen = Locked<UInt64>(.max)
        let base = peer.regions[0].memory.base
        let toucher = try OSThread(name: "vcpu") { let v = base.load(fromByteOffset: page, as: UInt64.self); seen.withLock { $0 = v } }
        #expect(gate.awaitArrival(), "the server never saw the fault")
        let remover = try OSThread(name: "balloon") { try? peer.remove(region: 0, offset: page, length: 4096) }
        // The REMOVE is queued (and fills fail with EAGAIN) once the userfaultfd is readable.
        #expect(try peer.uffd.waitReadable(orStop: -1, timeoutMs: 10_000))
        gate.open()
        toucher.join()
        remover.join()
        #expect(seen.withLock { $0 } == 0, "the faulting thread read the file's bytes of a removed page")
        let mismatches = peer.verify(against: file.mapped, removed: [(0, page, 4096)])
        server.finish()
        #expect(mismatches.isEmpty, "\(mismatches.prefix(3))")
        #expect(server.ledger[.eagainRetries] >= 1)
        #expect(server.ledger[.removeEvents] == 1)
    }

    @Test("the REMOVE comes first, then the fault: zeros, never the file's bytes")
    func removeThenFault() throws {
        let file = try SnapshotFile(size: 1 << 20)
        let peer = try FirecrackerPeer(sizes: [1 << 20])
        let server = try DirectServer(peer: peer, file: file, hooks: PageServer.Hooks())
        let page = 9 * 4096
        // madvise returns once the server has read the REMOVE.
        try peer.remove(region: 0, offset: page, length: 4096)
        let value = peer.regions[0].memory.base.load(fromByteOffset: page, as: UInt64.self)
        #expect(value == 0)
        let mismatches = peer.verify(against: file.mapped, removed: [(0, page, 4096)])
        server.finish()
        #expect(mismatches.isEmpty, "\(mismatches.prefix(3))")
        #expect(server.ledger[.zeroPages] == 1)
        #expect(server.ledger[.pagesCopied] == 255)
    }
}
