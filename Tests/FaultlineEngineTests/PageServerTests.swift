import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// The page server against Firecracker's side of the protocol, played exactly (FirecrackerPeer):
/// real userfaultfds, real faults from several threads, real REMOVEs from madvise, every byte
/// checked against the memory file.
@Suite("uffd-serve: Firecracker's classic protocol", .serialized, .timeLimit(.minutes(5)),
       .gate(.pageServerProtocol))
struct PageServerTests {
    @Test("several regions, four faulting threads, balloon REMOVEs read back as zeros")
    func servesFirecracker() throws {
        let file = try SnapshotFile(size: 24 << 20)
        let server = try RunningPageServer(file: file)
        // Two regions, the second placed further into the file than the first's end.
        let peer = try FirecrackerPeer(sizes: [8 << 20, 4 << 20], fileOffsets: [0, 16 << 20])
        try peer.connect(to: server.socketPath)
        _ = try peer.touchAll(threads: 4)
        // A balloon inflating: ranges already served, then one never touched (fresh pages
        // are faulted by `verify`).
        let removed = [(region: 0, offset: 1 << 20, length: 64 << 10), (region: 1, offset: 0, length: 8192),
                       (region: 1, offset: 3 << 20, length: 1 << 20)]
        for r in removed { try peer.remove(region: r.region, offset: r.offset, length: r.length) }
        let mismatches = peer.verify(against: file.mapped, removed: removed)
        #expect(mismatches.isEmpty, "\(mismatches.prefix(5))")
        let report = try server.finish()
        let pages = UInt64(peer.totalPages)
        #expect(report.pages == pages)
        #expect(report.pages_copied == pages)
        #expect(report.zero_pages == UInt64((64 << 10) + 8192 + (1 << 20)) / 4096)
        #expect(report.removes_seen == 3)
        #expect(report.faults_served >= pages)
        #expect(report.workers_started == 1)
    }
}
