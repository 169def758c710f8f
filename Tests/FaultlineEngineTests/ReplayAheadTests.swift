import FaultlineCore
@testable import FaultlineEngine
import FaultlineLinux
import Testing

@Suite("Working-set replay: a fault brings in what the set says comes next (no kernel)")
struct ReplayAheadTests {
    /// A fault on a page of the working set being replayed means the guest has caught up with
    /// the prefetch there: the pages recorded after it come in with it, on the faulting thread.
    @Test func aFaultInTheWorkingSetBringsInThePagesRecordedAfterIt() throws {
        let folder = SnapshotFolder()
        let machine = try patternedMachine(ramPages: 2048)
        _ = try SnapshotWriter.write(machine, to: folder.path, workload: "test")
        let snapshot = try Snapshot(folder: folder.path)
        let layout = snapshot.layout
        let table = DestinationPageTable(count: layout.totalPages)
        _ = table.switchOver(owed: [])
        let mapper = MemoryPageMapper(pages: layout.totalPages)
        let book = FaultBook(pages: layout.totalPages, vcpus: 1, vcpusAccountOwnStall: true)
        let installer = PageInstaller(table: table, mapper: mapper, book: book, lowPages: layout.lowPages, exclusiveInstalls: false)
        // 100 scattered RAM pages, none next to another (no fault-around could explain them).
        let set = (0..<100).map { layout.lowPages + 3 + ($0 * 37) % 2000 }
        #expect(Set(set).count == set.count)
        let demand = LocalDemand(supplier: SnapshotMachine(snapshot: snapshot), installer: installer, replaying: set)
        var encoder = WireEncoder(reservingCapacity: 4096)
        let scratch = PageInstaller.Scratch(pages: 1)

        try demand.serve(set[10]..<set[10] + 1, encoder: &encoder, scratch: scratch)
        let ahead = LocalDemand.replayAheadPages
        let installedNow = set.filter { table.installed.contains($0) }
        #expect(installedNow == Array(set[10...(10 + ahead)]), "the faulted page and the \(ahead) recorded after it")
        for page in installedNow {
            let want = UnsafeRawBufferPointer(start: snapshot.pagePointer(page), count: 4096)
            let got = UnsafeRawBufferPointer(start: mapper.memory + page * 4096, count: 4096)
            #expect(want.elementsEqual(got), "page \(page) holds the snapshot's bytes")
        }

        // A page outside the set brings in only itself.
        let outside = layout.lowPages + 1
        #expect(!set.contains(outside))
        let before = (0..<layout.totalPages).filter { table.installed.contains($0) }.count
        try demand.serve(outside..<outside + 1, encoder: &encoder, scratch: scratch)
        #expect((0..<layout.totalPages).filter { table.installed.contains($0) }.count == before + 1)
    }
}
