import FaultlineCore
import FaultlineLinux

/// Post-copy's background fill read in this process (a snapshot being restored): a thread
/// builds batches from the ``LocalPageSupplier`` - the working set to replay first, then every
/// page in address order - and hands them to the install pipeline, as the bulk receiver does
/// with the source's stream. Pages already in are skipped.
final class LocalFill: @unchecked Sendable {
    private var thread: OSThread?

    init(supplier: LocalPageSupplier, pipeline: InstallPipeline, table: DestinationPageTable, first: [Int],
         failures: FailureSlot, stopping: @escaping @Sendable () -> Bool) throws {
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
                for page in first where page >= 0 && page < table.count && !table.installed.contains(page) {
                    if stopping() { return }
                    try send(page..<page + 1)
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
