import FaultlineCore
import FaultlineLinux

/// Pages the destination can read in its own process (a snapshot file being restored): a
/// demand fault is then served on the faulting thread itself - the vCPU thread in vcpu-exit,
/// the userfaultfd reader otherwise - with no request on the wire and no other thread woken.
/// The background fill still comes from the source as usual.
public protocol LocalPageSupplier: AnyObject, Sendable {
    /// Appends `pages` to `encoder`'s open batch (zero pages as markers). Throws when they must
    /// not be installed (a chunk that fails its checksum). Called from many threads at once.
    func appendPages(_ pages: Range<Int>, to encoder: inout WireEncoder) throws
}

/// The fault path's side of a ``LocalPageSupplier``: encodes the pages a fault asks for and
/// installs them through the installer, as a reply from the source would be.
final class LocalDemand: @unchecked Sendable {
    let supplier: LocalPageSupplier
    let installer: PageInstaller
    /// A working set being replayed, with each page's place in it (-1: not in it).
    private let replay: [Int]
    private let placeInReplay: [Int32]
    /// Pages of the working set a fault on one of them brings in after it.
    static let replayAheadPages = 64

    init(supplier: LocalPageSupplier, installer: PageInstaller, replaying workingSet: [Int] = []) {
        self.supplier = supplier
        self.installer = installer
        replay = workingSet
        var place = [Int32](repeating: -1, count: workingSet.isEmpty ? 0 : installer.table.count)
        for (i, page) in workingSet.enumerated() where page >= 0 && page < place.count && place[page] < 0 { place[page] = Int32(i) }
        placeInReplay = place
    }

    /// Pages one call of ``serve(_:encoder:scratch:)`` may encode at most, beyond the fault's own.
    var aheadPages: Int { replay.isEmpty ? 0 : Self.replayAheadPages }

    /// Serves `pages` on the calling thread. `encoder` and `scratch` are the thread's own.
    ///
    /// Replaying a working set, a fault on one of its pages means the guest has caught up with
    /// the prefetch there; the pages recorded after it are the ones it touches next, so they
    /// come in with it (the prefetch skips what is in by the time it gets there).
    func serve(_ pages: Range<Int>, encoder: inout WireEncoder, scratch: PageInstaller.Scratch) throws {
        encoder.removeAll()
        encoder.beginPages(pageSize: 4096)
        try supplier.appendPages(pages, to: &encoder)
        let batch = encoder.endPagesAsBatch()
        try installer.install(batch, demand: true, scratch: scratch, runPages: 64)
        guard !replay.isEmpty, pages.lowerBound < placeInReplay.count else { return }
        let place = Int(placeInReplay[pages.lowerBound])
        guard place >= 0 else { return }
        encoder.removeAll()
        encoder.beginPages(pageSize: 4096)
        var gathered = 0
        for page in replay[(place + 1)..<min(place + 1 + Self.replayAheadPages, replay.count)]
        where page >= 0 && page < installer.table.count && !installer.table.installed.contains(page) {
            try supplier.appendPages(page..<page + 1, to: &encoder)
            gathered += 1
        }
        guard gathered > 0 else { return }
        // Not as demand: a page the prefetch has claimed already is left to it.
        try installer.install(encoder.endPagesAsBatch(), demand: false, scratch: scratch, runPages: 64)
    }
}
