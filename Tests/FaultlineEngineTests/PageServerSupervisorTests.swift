import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// The supervisor restarts a worker that dies while pages are owed; with thread workers here
/// (the process boundary is exercised by the CLI suite). The injected crash leaves what a death
/// leaves: events read and not acted on, no goodbye.
@Suite("uffd-serve: a worker dies, another takes over", .serialized, .timeLimit(.minutes(3)),
       .gate(.pageServerSupervisor))
struct PageServerSupervisorTests {
    @Test("a worker dies with faults read and unfilled: its threads fault again for the next one")
    func crashWithFaultsOwed() throws {
        let file = try SnapshotFile(size: 16 << 20)
        var options = PageServerSupervisor.Options()
        options.crash = CrashInjection(afterFaults: 300)
        let server = try RunningPageServer(file: file, options: options)
        let peer = try FirecrackerPeer(sizes: [16 << 20])
        try peer.connect(to: server.socketPath)
        _ = try peer.touchAll(threads: 4)
        let mismatches = peer.verify(against: file.mapped)
        let report = try server.finish()
        #expect(mismatches.isEmpty, "\(mismatches.prefix(5))")
        #expect(report.workers_started == 2)
        #expect(report.pages_copied == UInt64(peer.totalPages))
        #expect(report.faults_replayed >= 1, "the dead worker's unfilled faults were not in the landing buffer")
        let log = server.logLines.withLock { $0 }
        #expect(log.contains { $0.contains("worker 1 (thread) ended (injected crash)") }, "\(log)")
    }

    @Test("a worker dies right after reading a REMOVE: the next one replays it, the pages read zeros")
    func crashWithRemoveUnrecorded() throws {
        let file = try SnapshotFile(size: 8 << 20)
        var options = PageServerSupervisor.Options()
        options.crash = CrashInjection(afterRemoves: 1)
        let server = try RunningPageServer(file: file, options: options)
        let peer = try FirecrackerPeer(sizes: [8 << 20])
        try peer.connect(to: server.socketPath)
        _ = try peer.touchAll(threads: 2)
        // Returns once worker 1 has read the REMOVE (and died with it unrecorded).
        let removed = [(region: 0, offset: 2 << 20, length: 256 << 10)]
        try peer.remove(region: 0, offset: removed[0].offset, length: removed[0].length)
        // These faults wait for worker 2; it must know the range was removed.
        let mismatches = peer.verify(against: file.mapped, removed: removed)
        let report = try server.finish()
        #expect(mismatches.isEmpty, "\(mismatches.prefix(5))")
        #expect(report.workers_started == 2)
        #expect(report.removes_replayed == 1)
        #expect(report.zero_pages == 64)
    }

    @Test("balloon REMOVEs while four threads fault the same pages, in any order: removed pages end as zeros")
    func removesRacingFaults() throws {
        let file = try SnapshotFile(size: 8 << 20)
        let server = try RunningPageServer(file: file)
        let peer = try FirecrackerPeer(sizes: [8 << 20])
        try peer.connect(to: server.socketPath)
        // Every 8th 64 KiB chunk is removed while the threads fault their way through it.
        let removed = stride(from: 0, to: 8 << 20, by: 512 << 10).map { (region: 0, offset: $0, length: 64 << 10) }
        let balloon = try OSThread(name: "balloon") {
            for r in removed { try? peer.remove(region: r.region, offset: r.offset, length: r.length) }
        }
        _ = try peer.touchAll(threads: 4)
        balloon.join()
        let mismatches = peer.verify(against: file.mapped, removed: removed)
        let report = try server.finish()
        #expect(mismatches.isEmpty, "\(mismatches.prefix(5))")
        #expect(report.removes_seen == UInt64(removed.count))
    }
}
