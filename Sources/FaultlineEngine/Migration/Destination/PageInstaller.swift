import Atomics
import FaultlineCore
import FaultlineLinux

/// Installs verified page batches through a ``PageMapper``, keeping the ``DestinationPageTable``
/// right. Before the switch-over every page is a plain store that replaces any earlier copy
/// (a page sent again in a later round wins). After it, runs of consecutive missing pages of
/// one kind go in with one mapping call each; every page is claimed by one installer first.
final class PageInstaller: @unchecked Sendable {
    let table: DestinationPageTable
    let mapper: PageMapper
    let book: FaultBook
    let lowPages: Int
    /// MINOR writes the file before mapping: installs there stay exclusive. In MISSING modes a
    /// demand reply does not wait for a bulk installer that claimed the page first.
    let exclusiveInstalls: Bool
    let demandCount = ManagedAtomic<Int>(0)
    let backgroundCount = ManagedAtomic<Int>(0)
    let zeroCount = ManagedAtomic<Int>(0)
    let precopyCount = ManagedAtomic<Int>(0)
    let corruptCount = ManagedAtomic<Int>(0)
    /// Called after pages were installed (vcpu-exit wakes its waiting vCPUs).
    var afterBatch: (() -> Void)?
    /// Test hook: after this page is installed, damage one byte of it in guest memory.
    var damageAfterInstall: Int?

    init(table: DestinationPageTable, mapper: PageMapper, book: FaultBook, lowPages: Int, exclusiveInstalls: Bool) {
        self.table = table
        self.mapper = mapper
        self.book = book
        self.lowPages = lowPages
        self.exclusiveInstalls = exclusiveInstalls
    }

    func checkIndex(_ page: Int) throws {
        guard page >= 0, page < table.count else {
            throw MigrationError.protocolViolation("page \(page) is outside guest memory (\(table.count) pages)")
        }
    }

    /// Before the switch-over: every page of the batch becomes the current copy.
    func storePrecopy(_ batch: PageBatch) throws {
        for p in batch {
            let page = Int(truncatingIfNeeded: p.index)
            try checkIndex(page)
            if p.kind == .zero {
                try mapper.store(page, bytes: nil)
                table.recordPrecopy(page, crc: MemoryDigest.zeroPageCRC)
            } else {
                try p.withUnsafeBytes { try mapper.store(page, bytes: $0.baseAddress!) }
                table.recordPrecopy(page, crc: p.checksum)
            }
            precopyCount.wrappingIncrement(ordering: .relaxed)
        }
    }

    /// An installer thread's current chunk of pool pages (bulk runs are written straight into it).
    struct PoolCursor {
        var base: UnsafeMutableRawPointer?
        var used = 0
        var capacity = 0
        static let chunkPages = 1024
    }

    /// Scratch an installer thread owns: runs are staged here when they do not go to the pool.
    final class Scratch {
        let staging: UnsafeMutableRawPointer
        let pages: Int
        var crc: [UInt32]
        var pool = PoolCursor()
        init(pages: Int) {
            self.pages = pages
            staging = .allocate(byteCount: pages * 4096, alignment: 4096)
            crc = []
            crc.reserveCapacity(pages)
        }
        deinit { staging.deallocate() }
    }

    /// After the switch-over: installs a verified batch (`demand`: a reply a vCPU may wait for).
    func install(_ batch: PageBatch, demand: Bool, scratch: Scratch, runPages: Int) throws {
        var runStart = -1, runCount = 0, runZero = false
        var runBuffer = scratch.staging
        var runInPool = false
        var runCapacity = runPages
        scratch.crc.removeAll(keepingCapacity: true)
        let counter = demand ? demandCount : backgroundCount
        func flush() throws {
            guard runCount > 0 else { return }
            // A run in the pool is moved from there, zero runs included (pool pages are zero until
            // data is written into them): a UFFDIO_ZEROPAGE mapping would cost the guest a
            // copy-on-write fault, a page allocation and a TLB-flush IPI on its first write.
            let runData: UnsafeRawPointer? = runZero && !runInPool ? nil : UnsafeRawPointer(runBuffer)
            defer {
                if runInPool { scratch.pool.used += runCount }  // pool pages of a run are never handed out again
                runCount = 0
                scratch.crc.removeAll(keepingCapacity: true)
            }
            let mappedRun: Bool
            do {
                mappedRun = try mapper.map(first: runStart, count: runCount, data: runData, fromPool: runInPool)
            } catch {
                for i in 0..<runCount { table.unclaim(runStart + i) }  // someone else may install them later
                throw error
            }
            if mappedRun {
                for i in 0..<runCount { finishPage(runStart + i, crc: scratch.crc[i], counter: counter) }
            } else {
                // Raced with another installer: page by page. A page that turns out to be mapped
                // already holds these very bytes (the same verified page from the other
                // connection), so it is marked installed either way.
                for i in 0..<runCount {
                    let page = runStart + i
                    if table.installed.contains(page) { continue }
                    _ = try mapper.map(first: page, count: 1, data: runData.map { $0 + i * 4096 }, fromPool: runInPool)
                    finishPage(page, crc: scratch.crc[i], counter: counter)
                }
            }
        }
        for p in batch {
            let page = Int(truncatingIfNeeded: p.index)
            try checkIndex(page)
            let claimedNow = table.claim(page)
            if table.installed.contains(page) || (!claimedNow && (exclusiveInstalls || !demand)) {
                try flush()
                continue
            }
            let zero = p.kind == .zero
            let contiguous = runCount > 0 && page == runStart + runCount && zero == runZero && runCount < runCapacity
                && page >= lowPages && mapper.group(of: page) == mapper.group(of: runStart)
            if !contiguous {
                try flush()
                runStart = page
                runZero = zero
                // Bulk runs go straight into pool pages that the mapper then moves (no page
                // allocation, no second copy); a run ends where its pool chunk ends. Demand replies
                // are copied: a move flushes the pool mapping from every CPU's TLB, an IPI a
                // waiting vCPU should not pay for one page.
                runInPool = false
                runBuffer = scratch.staging
                runCapacity = runPages
                if page >= lowPages && !demand {
                    if scratch.pool.capacity == scratch.pool.used, let chunk = mapper.takePool(PoolCursor.chunkPages) {
                        scratch.pool = PoolCursor(base: chunk, used: 0, capacity: PoolCursor.chunkPages)
                    }
                    if let base = scratch.pool.base, scratch.pool.capacity > scratch.pool.used {
                        runBuffer = base + scratch.pool.used * 4096
                        runInPool = true
                        runCapacity = min(runPages, scratch.pool.capacity - scratch.pool.used)
                    }
                }
            }
            if !zero { p.withUnsafeBytes { (runBuffer + runCount * 4096).copyMemory(from: $0.baseAddress!, byteCount: 4096) } }
            scratch.crc.append(zero ? MemoryDigest.zeroPageCRC : p.checksum)
            runCount += 1
            // A vCPU is waiting for this page: map it now, not after the rest of the run.
            if book.requested.contains(page) { try flush() }
        }
        try flush()
        afterBatch?()
    }

    @inline(__always) private func finishPage(_ page: Int, crc: UInt32, counter: ManagedAtomic<Int>) {
        guard table.markInstalled(page, crc: crc) else { return }
        counter.wrappingIncrement(ordering: .relaxed)
        if crc == MemoryDigest.zeroPageCRC { zeroCount.wrappingIncrement(ordering: .relaxed) }
        if book.requested.contains(page) { book.noteInstalled(page, now: MonotonicClock.nanoseconds()) }
        if page == damageAfterInstall {
            // The injection: a page that arrived intact but is wrong in guest memory.
            let p = UnsafeMutableRawPointer(mutating: mapper.bytes(of: page))
            p.storeBytes(of: p.load(as: UInt8.self) ^ 0x5A, as: UInt8.self)
        }
    }
}

extension PageInstaller {
    /// A damaged batch was dropped (never installed).
    func countCorrupt() { corruptCount.wrappingIncrement(ordering: .relaxed) }
}
