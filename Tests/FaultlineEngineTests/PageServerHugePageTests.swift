import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation
import FaultlineTestSupport
import Testing

/// Runs where 2 MiB pages are reserved before the test run (`hugetlb_reserved`): reserving
/// them here would race the suites that need none reserved.
@Suite("uffd-serve: 2 MiB pages (hugetlb)", .serialized, .timeLimit(.minutes(2)),
       .gate(.pageServerHugePages))
struct PageServerHugePageTests {
    @Test("hugetlb regions: whole huge pages copied; a removed huge page is a copy of zeros")
    func hugePages() throws {
        try #require(hugePagesFree() >= 4, "needs 4 free 2 MiB pages (HugePages_Free in /proc/meminfo)")
        let file = try SnapshotFile(size: 8 << 20)
        let server = try RunningPageServer(file: file)
        let peer = try FirecrackerPeer(sizes: [4 << 20, 2 << 20], fileOffsets: [0, 6 << 20], pageSize: 2 << 20)
        try peer.connect(to: server.socketPath)
        _ = try peer.touchAll(threads: 2)
        let removed = [(region: 0, offset: 2 << 20, length: 2 << 20)]
        try peer.remove(region: 0, offset: removed[0].offset, length: removed[0].length)
        let mismatches = peer.verify(against: file.mapped, removed: removed)
        let report = try server.finish()
        #expect(mismatches.isEmpty, "\(mismatches)")
        #expect(report.pages == 3)
        #expect(report.pages_copied == 3)
        #expect(report.zero_pages == 1)
        #expect(report.removed_pages == 1)
    }
}
