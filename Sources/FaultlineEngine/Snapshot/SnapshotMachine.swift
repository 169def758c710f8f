import FaultlineCore
import FaultlineLinux

/// A snapshot seen as a migration source: the pages a destination asks for or streams in
/// come from the snapshot's memory file instead of a running guest. A restore is a migration
/// from this machine: the same fault modes, fault-around, staging, background fill, resume
/// after a cut and digest check serve both. It never runs: pause and resume do nothing, and
/// nothing is ever dirty. Each chunk is checked against its CRC32C before a page of it is
/// sent (``checkPages(_:)``), so a corrupt file fails the restore and never installs a page.
public final class SnapshotMachine: SourceMachine, @unchecked Sendable {
    public let snapshot: Snapshot
    public let layout: MachineLayout
    public let counters: GuestCounters
    public var vcpuError: String? { nil }

    public init(snapshot: Snapshot) {
        self.snapshot = snapshot
        layout = snapshot.layout
        counters = GuestCounters(vcpus: layout.vcpus)
    }

    public func pagePointer(_ page: Int) -> UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(mutating: snapshot.pagePointer(page))  // read only: the mapping is PROT_READ
    }

    public func checkPages(_ pages: Range<Int>) throws { try snapshot.checkPages(pages) }
    public func pause() {}
    public func resume() {}
    public func vcpuStateBlob(_ id: Int) throws -> [UInt8] { snapshot.manifest.vcpus[id].state }
    public func startDirtyLog() throws {}
    public func collectDirty(into dirty: PageBitmap) throws {}
    public func stopDirtyLog() throws {}

    /// Holes in the memory file are zero pages: sent as markers without being read.
    public func residency(into bytes: UnsafeMutablePointer<UInt8>) -> Bool {
        (try? snapshot.ramDataMap(into: bytes)) != nil
    }
}
