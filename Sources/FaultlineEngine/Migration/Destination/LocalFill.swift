import FaultlineCore
import FaultlineLinux

/// Post-copy's background fill read in this process (a snapshot being restored): a thread
/// builds batches from the ``LocalPageSupplier`` - the working set to replay first, then every
/// page in address order - and hands them to the install pipeline, as the bulk receiver does
/// with the source's stream. Pages already in are skipped.
///
/// Once a working set has been handed over, the guest has what it is expected to touch: the
/// rest of the fill then gives way to the vCPUs (``afterFirst`` puts them back at normal
/// priority, and this thread drops to ``restNiceness``), as REAP runs a function once its
/// working set is in. A page outside the set is still served on demand, on the faulting thread.
final class LocalFill: @unchecked Sendable {
    private var thread: OSThread?
    /// The fill's niceness after a working set: behind the running guest.
    static let restNiceness: Int32 = 10

    init(supplier: LocalPageSupplier, pipeline: InstallPipeline, table: DestinationPageTable, first: [Int],
         failures: FailureSlot, afterFirst: (@Sendable () -> Void)? = nil, stopping: @escaping @Sendable () -> Bool) throws {
        let batchPages = 64
        thread = try OSThread(name: "local fill", niceness: OSThread.Niceness.postcopyInstaller) {
            var encoder = WireEncoder(reservingCapacity: (batchPages + 1) * (4096 + WireProtocol.pageDescriptorSize) + 4096)
            // One batch: a run of consecutive pages not in yet.
            func send(_ pages: Range<Int>) throws {
                encoder.removeAll()
                encoder.beginPages(pageSize: 4096)
                try supplier.appendPages(pages, to: &encoder)
                try pipeline.submit(encoder.endPagesAsBatch())
            }
            do {
                // The working set, in its order, batchPages pages a batch (scattered pages: a
                // batch each would cost a hand-over to the installer per page).
                var gathered = 0
                encoder.removeAll()
                encoder.beginPages(pageSize: 4096)
                for page in first where page >= 0 && page < table.count && !table.installed.contains(page) {
                    if stopping() { return }
                    try supplier.appendPages(page..<page + 1, to: &encoder)
                    gathered += 1
                    if gathered == batchPages {
                        try pipeline.submit(encoder.endPagesAsBatch())
                        encoder.removeAll()
                        encoder.beginPages(pageSize: 4096)
                        gathered = 0
                    }
                }
                if gathered > 0 { try pipeline.submit(encoder.endPagesAsBatch()) }
                if !first.isEmpty, let afterFirst {
                    afterFirst()
                    try? ThreadScheduling.setCurrentNiceness(Self.restNiceness)
                }
                var page = 0
                while page < table.count {
                    if stopping() { return }
                    guard !table.installed.contains(page) else { page += 1; continue }
                    var end = page + 1
                    while end < table.count && end - page < batchPages && !table.installed.contains(end) { end += 1 }
                    try send(page..<end)
                    page = end
                }
            } catch {
                if !stopping() { failures.record("local fill", error) }
            }
        }
    }

    /// Waits for the fill to end (idempotent).
    func join() {
        thread?.join()
        thread = nil
    }
}
