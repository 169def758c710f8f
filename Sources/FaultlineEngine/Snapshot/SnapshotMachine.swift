import FaultlineCore
import FaultlineLinux

/// A snapshot seen as a migration source: the pages a destination asks for or streams in
/// come from the snapshot's memory file instead of a running guest. A restore is a migration
/// from this machine: the same fault modes, fault-around, staging, background fill, resume
/// after a cut and digest check serve both. It never runs: pause and resume do nothing, and
/// nothing is ever dirty. Each chunk is checked against its CRC32C before a page of it is
/// sent (``checkPages(_:)``), so a corrupt file fails the restore and never installs a page.
///
/// In the restoring process it is also the destination's ``LocalPageSupplier``: a fault is
/// served from the file on the faulting thread, with the same checks.
public final class SnapshotMachine: SourceMachine, LocalPageSupplier, @unchecked Sendable {
    public let snapshot: Snapshot
    public let layout: MachineLayout
    public let counters: GuestCounters
    public var vcpuError: String? { nil }
    /// One byte per RAM page, 1 where the file holds data (nil: unknown, every page is read).
    private let dataMap: [UInt8]?

    public init(snapshot: Snapshot) {
        self.snapshot = snapshot
        layout = snapshot.layout
        counters = GuestCounters(vcpus: layout.vcpus)
        var map = [UInt8](repeating: 1, count: layout.ramPages)
        let known = map.withUnsafeMutableBufferPointer { (try? snapshot.ramDataMap(into: $0.baseAddress!)) != nil }
        dataMap = known ? map : nil
    }

    public func appendPages(_ pages: Range<Int>, to encoder: inout WireEncoder) throws {
        try snapshot.checkPages(pages)
        for page in pages {
            let ram = page - layout.lowPages
            if ram >= 0, let dataMap, dataMap[ram] == 0 {
                encoder.appendZeroPage(index: UInt64(page))  // a hole
                continue
            }
            let bytes = UnsafeRawBufferPointer(start: snapshot.pagePointer(page), count: 4096)
            if PageBatch.isAllZero(bytes) { encoder.appendZeroPage(index: UInt64(page)) }
            else { encoder.appendPage(index: UInt64(page), bytes: bytes) }
        }
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
        guard let dataMap else { return false }
        dataMap.withUnsafeBufferPointer { bytes.update(from: $0.baseAddress!, count: $0.count) }
        return true
    }
}
