import Atomics
import FaultlineCore
import FaultlineLinux

/// A snapshot's memory as it arrives from a `serve-snapshot` server: a restore whose "guest"
/// is a memory file in this process (a memfd laid out as the snapshot's memory file) that a
/// page server serves from. The restore's machinery fetches it - the stream in the
/// background, and a page a fault needs first on demand - with its resume after a cut and
/// its checks (no page is written here that failed one, and the digest is read back at the
/// end).
///
/// ``FetchedMemoryMachine`` stands in for the guest (it has no vCPUs: the page server's worker
/// is the one thread that waits for pages) and ``FetchedMemoryMapper`` writes what arrives
/// into the file, noting each page present.
final class FetchedMemoryMapper: PageMapper, @unchecked Sendable {
    let memory: SharedMemory
    let pages: Int
    /// Pages written, by snapshot page index (the file's page index).
    let present: PageBitmap

    init(layout: MachineLayout) throws(SystemError) {
        pages = layout.totalPages
        memory = try SharedMemory(size: layout.totalPages * 4096, label: "fetched snapshot memory")
        present = PageBitmap(count: layout.totalPages)
    }

    func store(_ page: Int, bytes: UnsafeRawPointer?) throws {
        write(page, count: 1, data: bytes)
    }

    func discard(_ range: Range<Int>) throws {
        (memory.base + range.lowerBound * 4096).initializeMemory(as: UInt8.self, repeating: 0, count: range.count * 4096)
        for page in range { _ = present.remove(page) }
    }

    func armFaults() throws {}

    func map(first page: Int, count: Int, data: UnsafeRawPointer?, fromPool: Bool, demand: Bool) throws -> Bool {
        var metPresent = false
        for i in 0..<count {
            if present.contains(page + i) { metPresent = true; continue }  // as EEXIST: never written twice
            write(page + i, count: 1, data: data.map { $0 + i * 4096 })
        }
        return !metPresent
    }

    /// The bytes first, then the bit (a store-release): a reader that sees the page present
    /// reads its bytes.
    private func write(_ page: Int, count: Int, data: UnsafeRawPointer?) {
        let target = memory.base + page * 4096
        if let data { target.copyMemory(from: data, byteCount: count * 4096) }
        else { target.initializeMemory(as: UInt8.self, repeating: 0, count: count * 4096) }
        for p in page..<page + count { present.insert(p) }
    }

    func takePool(_ pages: Int) -> UnsafeMutableRawPointer? { nil }
    func group(of page: Int) -> Int { 0 }
    func wake(_ page: Int) throws {}
    func disarmFaults() {}
    func bytes(of page: Int) -> UnsafeRawPointer { UnsafeRawPointer(memory.base + page * 4096) }
}

/// The restore's "guest": no vCPUs. Starting it hands over the fault handler, through which
/// the page server's worker asks for a page it needs before the stream has brought it.
final class FetchedMemoryMachine: DestinationMachine, @unchecked Sendable {
    let layout: MachineLayout
    let counters: GuestCounters
    private let started = TimedCondition()
    private var handler: RAMFaultHandler?
    private var stopped = false

    init(layout: MachineLayout) {
        self.layout = layout
        counters = GuestCounters(vcpus: layout.vcpus)
    }

    var vcpuError: String? { nil }
    func loadVcpuState(_ id: Int, blob: [UInt8]) throws {}

    func startGuest(faultHandler: RAMFaultHandler?, scheduling: VcpuScheduling) throws {
        started.withLock { handler = faultHandler }
        started.broadcast()
    }

    func setVcpuScheduling(_ scheduling: VcpuScheduling) {}
    func pauseGuest() {}
    func resumeGuest() {}

    func stopGuest() -> String? {
        started.withLock { stopped = true }
        started.broadcast()
        return nil
    }

    func collectGuestWrites(into pages: PageBitmap) throws {}
    func vcpu(forThread tid: UInt32) -> Int { -1 }

    /// The fault handler once the restore has committed (nil: it ended first, or `seconds` passed).
    func handlerOnceStarted(seconds: Double) -> RAMFaultHandler? {
        _ = started.wait(timeoutNanoseconds: UInt64(seconds * 1e9)) { handler != nil || stopped }
        return started.withLock { handler }
    }
}
