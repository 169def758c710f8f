import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation
import Testing

/// Huge pages reserved for the hugetlb test: as many more as it needs are added to
/// /proc/sys/vm/nr_hugepages (root), and taken away again by `release`.
final class HugePageReservation: @unchecked Sendable {
    static let path = "/proc/sys/vm/nr_hugepages"
    private var added: Int

    /// Made when the suite's condition is first evaluated (never for a run that filters it out).
    static let forTest: (reservation: HugePageReservation?, why: String) = {
        let r = reserve(4)
        if r.0 == nil { print("uffd-serve hugetlb test skipped: \(r.1)") }
        return r
    }()

    /// Nil, with the reason, when `pages` free 2 MiB pages cannot be had.
    static func reserve(_ pages: Int) -> (HugePageReservation?, String) {
        let free = hugePagesFree()
        if free >= pages { return (HugePageReservation(added: 0), "") }
        guard let text = HostProcess.firstLine(ofFile: path), let total = Int(text) else { return (nil, "\(path) is not readable") }
        let want = total + (pages - free)
        guard (try? "\(want)\n".write(toFile: path, atomically: false, encoding: .utf8)) != nil else {
            return (nil, "cannot write \(path) (needs root)")
        }
        let reservation = HugePageReservation(added: pages - free)
        guard hugePagesFree() >= pages else {
            reservation.release()
            return (nil, "asked the kernel for \(pages) free 2 MiB pages, it has \(hugePagesFree()) (memory too fragmented?)")
        }
        return (reservation, "")
    }

    private init(added: Int) { self.added = added }

    /// Gives the pages added back.
    func release() {
        guard added > 0, let text = HostProcess.firstLine(ofFile: Self.path), let total = Int(text) else { return }
        try? "\(max(total - added, 0))\n".write(toFile: Self.path, atomically: false, encoding: .utf8)
        added = 0
    }
}

@Suite("uffd-serve: 2 MiB pages (hugetlb)", .serialized, .timeLimit(.minutes(2)),
       .enabled(if: PageServerGate.uffd, PageServerGate.reason),
       .enabled("needs 4 free 2 MiB pages: as root, adds them to /proc/sys/vm/nr_hugepages (the reason is printed when it cannot)") {
           HugePageReservation.forTest.reservation != nil
       })
struct PageServerHugePageTests {
    @Test("hugetlb regions: whole huge pages copied; a removed huge page is a copy of zeros")
    func hugePages() throws {
        defer { HugePageReservation.forTest.reservation?.release() }
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
