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

    init(supplier: LocalPageSupplier, installer: PageInstaller) {
        self.supplier = supplier
        self.installer = installer
    }

    /// Serves `pages` on the calling thread. `encoder` and `scratch` are the thread's own.
    func serve(_ pages: Range<Int>, encoder: inout WireEncoder, scratch: PageInstaller.Scratch) throws {
        encoder.removeAll()
        encoder.beginPages(pageSize: 4096)
        try supplier.appendPages(pages, to: &encoder)
        let batch = encoder.endPagesAsBatch()
        try installer.install(batch, demand: true, scratch: scratch, runPages: 64)
    }
}
