import Atomics
import FaultlineCore
import FaultlineLinux

/// Encodes guest pages for the wire on the source, remembering the CRC32C each page was last
/// sent with (the digest of pages sent after the pause is built from these). Zero pages, and
/// pages the guest never touched, go out as data-less markers.
final class PageSender: @unchecked Sendable {
    let machine: SourceMachine
    let layout: MachineLayout
    let sentCRC: UnsafeMutablePointer<UInt32>
    /// One byte per RAM page from mincore(2): a page the guest never touched is not resident
    /// and is zero, so it is sent as a marker without reading (and faulting in) the page.
    /// Trusted only while `residencyValid`: from a snapshot taken before the round that uses
    /// it (a page touched after it is in the next dirty log) or while the vCPUs are paused.
    let residency: UnsafeMutablePointer<UInt8>
    let residencyValid = ManagedAtomic<Bool>(false)
    /// Both tables in zero-filled memory: nothing is touched before the pages are sent.
    private let tables: (ZeroedTable<UInt32>, ZeroedTable<UInt8>)
    let zeroCount = ManagedAtomic<Int>(0)
    let batchPages: Int

    init(machine: SourceMachine, batchPages: Int) {
        self.machine = machine
        layout = machine.layout
        self.batchPages = batchPages
        tables = (ZeroedTable(count: layout.totalPages, allocator: AnonymousMapping.zeroFilled),
                  ZeroedTable(count: layout.ramPages, allocator: AnonymousMapping.zeroFilled))
        sentCRC = tables.0.base
        residency = tables.1.base
    }

    func takeResidency() {
        residencyValid.store(false, ordering: .sequentiallyConsistent)
        if machine.residency(into: residency) { residencyValid.store(true, ordering: .releasing) }  // else: every page is read
    }

    func invalidateResidency() { residencyValid.store(false, ordering: .sequentiallyConsistent) }

    @inline(__always) func isUntouched(_ page: Int) -> Bool {
        let i = page - layout.lowPages
        return i >= 0 && i < layout.ramPages && residencyValid.load(ordering: .acquiring) && residency[i] & 1 == 0
    }

    /// Appends one page to the open batch; true when it carried data (not a zero marker).
    @inline(__always) func encode(_ page: Int, into encoder: inout WireEncoder) -> Bool {
        let ptr = UnsafeRawBufferPointer(start: machine.pagePointer(page), count: 4096)
        if isUntouched(page) || PageBatch.isAllZero(ptr) {
            encoder.appendZeroPage(index: UInt64(page))
            zeroCount.wrappingIncrement(ordering: .relaxed)
            sentCRC[page] = MemoryDigest.zeroPageCRC
            return false
        }
        sentCRC[page] = encoder.appendPage(index: UInt64(page), bytes: ptr)
        return true
    }

    /// Appends a page and sends the batch when full. `corrupt`: flip a byte of this page's
    /// data after its checksum (fault injection).
    func append(_ page: Int, to encoder: inout WireEncoder, channel: WireChannel, corrupt: Bool = false) throws -> Bool {
        try machine.checkPages(page..<page + 1)
        let data = encode(page, into: &encoder)
        if corrupt && data {
            encoder.endPages()
            var bytes = encoder.bytes
            bytes[bytes.count - 1] ^= 0x01  // the last byte of this page's data: its CRC no longer matches
            encoder.removeAll()
            try channel.sendRaw(bytes)
            encoder.beginPages(pageSize: 4096)
        }
        if !encoder.canAppendPage || encoder.openBatchPageCount >= batchPages {
            encoder.endPages()
            try channel.flush(&encoder)
            encoder.beginPages(pageSize: 4096)
        }
        return data
    }

    func finish(_ encoder: inout WireEncoder, channel: WireChannel) throws {
        encoder.endPages()
        try channel.flush(&encoder)
    }
}
