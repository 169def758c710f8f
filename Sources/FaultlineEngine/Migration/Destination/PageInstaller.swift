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
    /// Exclusive installs (MINOR): where staged pages are published, so that a bulk run seals
    /// its pages before writing them (set by the pipeline).
    var sealing: StagedPages?
    /// Background pages a fault found staged and installed itself (``installStaged``).
    let stagedFaultCount = ManagedAtomic<Int>(0)
    /// Exclusive installs: the thread between sealing a run and mapping it (0: none), and
    /// whether a fault that found its page sealed there made it real-time (``hurrySealedRun``).
    private let sealedRunThread = ManagedAtomic<Int32>(0)
    private let sealedRunHurried = ManagedAtomic<Bool>(false)
    /// Sealed runs a waiting fault hurried.
    let hurriedRuns = ManagedAtomic<Int>(0)
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

    /// Before the switch-over: every page of the batch becomes the current copy (see
    /// ``applyPrecopy(_:)``).
    func storePrecopy(_ batch: PageBatch, scratch: Scratch) throws {
        var pages = batch.makeIterator()
        var done = false
        while !done {
            scratch.reset()
            done = try stagePrecopy(&pages, into: scratch)
            try applyPrecopy(scratch)
        }
    }

    /// Stages pre-copy pages in arrival order, one staging page each (zero pages as zeros), until
    /// the batch ends (true) or the staging buffer is full (false).
    func stagePrecopy(_ pages: inout PageBatch.Iterator, into scratch: Scratch) throws -> Bool {
        while scratch.hasRoom {
            guard let p = pages.next() else { return true }
            let page = Int(truncatingIfNeeded: p.index)
            try checkIndex(page)
            let slot = scratch.staging + scratch.used * 4096
            if p.kind == .zero { slot.initializeMemory(as: UInt8.self, repeating: 0, count: 4096) }
            else { p.withUnsafeBytes { slot.copyMemory(from: $0.baseAddress!, byteCount: 4096) } }
            scratch.runs.append(StagedRun(first: page, count: 1, zero: p.kind == .zero, data: slot, inPool: false,
                                          crcStart: scratch.crc.count))
            scratch.crc.append(p.kind == .zero ? MemoryDigest.zeroPageCRC : p.checksum)
            scratch.used += 1
        }
        return false
    }

    /// Stores staged pre-copy pages in order. Runs of consecutive RAM pages that have no copy
    /// here yet (nothing mapped: their first copy, or one dropped as stale) go in with one call
    /// each (one UFFDIO_COPY in MISSING modes, one pwrite for MINOR); a page stored before is
    /// overwritten in place.
    func applyPrecopy(_ scratch: Scratch) throws {
        var runStart = -1, runCount = 0
        var runData = scratch.staging
        func flush() throws {
            guard runCount > 0 else { return }
            defer { runCount = 0 }
            try mapper.storeRun(first: runStart, count: runCount, data: runData)
        }
        for (e, entry) in scratch.runs.enumerated() {
            let page = entry.first
            let fresh = page >= lowPages && table.state(page) != .precopied
            if fresh && runCount > 0 && page == runStart + runCount && entry.data == runData + runCount * 4096
                && mapper.group(of: page) == mapper.group(of: runStart) {
                // joins the run
            } else {
                try flush()  // in order: a page repeated in the batch must not be overwritten by its older copy
                if fresh { runStart = page; runData = entry.data }
            }
            if fresh { runCount += 1 }
            else { try mapper.store(page, bytes: entry.zero ? nil : UnsafeRawPointer(entry.data)) }
            table.recordPrecopy(page, crc: scratch.crc[e])
            precopyCount.wrappingIncrement(ordering: .relaxed)
        }
        try flush()
    }

    /// An installer thread's current chunk of pool pages (bulk runs are written straight into it).
    struct PoolCursor {
        var base: UnsafeMutableRawPointer?
        var used = 0
        var capacity = 0
        static let chunkPages = 1024
    }

    /// A run of consecutive pages of one kind, staged for one mapping call.
    struct StagedRun {
        var first: Int
        var count: Int
        var zero: Bool
        /// Where the run's bytes are: the staging buffer or pool pages.
        var data: UnsafeMutableRawPointer
        var inPool: Bool
        /// Index of the run's first page in `Scratch.crc`.
        var crcStart: Int
    }

    /// Pages verified and claimed, staged in runs, not mapped yet: what one thread stages and
    /// the same or another thread maps (``apply(_:demand:)``). Staging memory is allocated
    /// once; nothing is allocated per batch.
    final class Scratch {
        let staging: UnsafeMutableRawPointer
        let pages: Int
        /// Staging pages in use by the runs.
        var used = 0
        var crc: [UInt32]
        var runs: [StagedRun]
        /// A vCPU waits for a page of this scratch: map it without delay.
        var urgent = false
        var pool = PoolCursor()
        /// Its place in a pipeline (``StagedPages`` entries name it), and how many times it has
        /// been retired; a fault-path thread copying from it holds a pin.
        let index: Int
        let generation = ManagedAtomic<UInt32>(0)
        let pins = ManagedAtomic<Int>(0)
        init(pages: Int, index: Int = 0) {
            self.pages = pages
            self.index = index
            staging = .allocate(byteCount: pages * 4096, alignment: 4096)
            crc = []
            crc.reserveCapacity(pages)
            runs = []
            runs.reserveCapacity(pages)
        }
        deinit { staging.deallocate() }
        var isEmpty: Bool { runs.isEmpty }
        var hasRoom: Bool { used < pages }
        /// The ``StagedPages`` entry of page `i` of `run` (one of this scratch's runs).
        func stagedEntry(_ run: StagedRun, _ i: Int, generation: UInt32) -> StagedPages.Entry {
            StagedPages.Entry(scratch: index, generation: generation, slot: run.zero ? 0 : (run.data - staging) / 4096 + i, zero: run.zero)
        }
        /// Ends the life of what is staged: ``StagedPages`` entries that name it stop matching,
        /// and a fault-path thread still copying from it is waited for (one page's copy).
        func retire() {
            generation.wrappingIncrement(ordering: .sequentiallyConsistent)
            while pins.load(ordering: .sequentiallyConsistent) != 0 { ThreadScheduling.yield() }
        }
        func reset() {
            retire()
            used = 0
            crc.removeAll(keepingCapacity: true)
            runs.removeAll(keepingCapacity: true)
            urgent = false
        }
    }

    /// A post-copy bulk run whose pages go into ``StagedPages`` (a pool run's pages are moved
    /// away, low pages are stored before the guest runs).
    @inline(__always) func publishes(_ run: StagedRun) -> Bool { !run.inPool && run.first >= lowPages }

    /// After the switch-over: installs a verified batch (`demand`: a reply a vCPU may wait for).
    func install(_ batch: PageBatch, demand: Bool, scratch: Scratch, runPages: Int) throws {
        var pages = batch.makeIterator()
        var done = false
        while !done {
            scratch.reset()
            done = try stage(&pages, demand: demand, into: scratch, pool: &scratch.pool, runPages: runPages)
            try apply(scratch, demand: demand)
        }
    }

    /// Claims and stages the pages of `pages` into `scratch`, in runs of at most `runPages`
    /// consecutive pages of one kind, until the batch ends (true) or the staging buffer is
    /// full (false: stage the rest into another scratch). Pages already installed, or claimed
    /// by another installer (where that excludes this one), are skipped.
    func stage(_ pages: inout PageBatch.Iterator, demand: Bool, into scratch: Scratch, pool: inout PoolCursor,
               runPages: Int) throws -> Bool {
        var open = false  // the last run of `scratch.runs` may grow
        var capacity = 0
        func close() {
            guard open, let run = scratch.runs.last else { return }
            open = false
            if run.inPool { pool.used += run.count }  // pool pages of a run are never handed out again
        }
        defer { close() }
        while scratch.hasRoom {
            guard let p = pages.next() else { return true }
            let page = Int(truncatingIfNeeded: p.index)
            try checkIndex(page)
            let claimedNow = table.claim(page)
            if table.installed.contains(page) || (!claimedNow && (exclusiveInstalls || !demand)) {
                close()
                continue
            }
            let zero = p.kind == .zero
            var contiguous = false
            if open, let run = scratch.runs.last {
                contiguous = page == run.first + run.count && zero == run.zero && run.count < capacity
                    && page >= lowPages && mapper.group(of: page) == mapper.group(of: run.first)
            }
            if !contiguous {
                close()
                // Bulk runs go straight into pool pages that the mapper then moves (no page
                // allocation, no second copy); a run ends where its pool chunk ends. Demand replies
                // are copied: a move flushes the pool mapping from every CPU's TLB, an IPI a
                // waiting vCPU should not pay for one page.
                var data = scratch.staging + scratch.used * 4096
                var inPool = false
                capacity = min(runPages, scratch.pages - scratch.used)
                if page >= lowPages && !demand {
                    if pool.capacity == pool.used, let chunk = mapper.takePool(PoolCursor.chunkPages) {
                        pool = PoolCursor(base: chunk, used: 0, capacity: PoolCursor.chunkPages)
                    }
                    if let base = pool.base, pool.capacity > pool.used {
                        data = base + pool.used * 4096
                        inPool = true
                        capacity = min(runPages, pool.capacity - pool.used)
                    }
                }
                scratch.runs.append(StagedRun(first: page, count: 0, zero: zero, data: data, inPool: inPool,
                                              crcStart: scratch.crc.count))
                open = true
            }
            let run = scratch.runs[scratch.runs.count - 1]
            if !zero {
                p.withUnsafeBytes { (run.data + run.count * 4096).copyMemory(from: $0.baseAddress!, byteCount: 4096) }
            }
            if !run.inPool && !zero { scratch.used += 1 }
            scratch.crc.append(zero ? MemoryDigest.zeroPageCRC : p.checksum)
            scratch.runs[scratch.runs.count - 1].count += 1
            // A vCPU is waiting for this page: map it now, not after the rest of the run.
            if book.requested.contains(page) {
                scratch.urgent = true
                close()
            }
        }
        return false
    }

    /// Maps the staged runs of `scratch` (on any one thread at a time). On a failure the
    /// claims of every run not mapped are given back (someone else may install them later).
    /// With exclusive installs and ``sealing``, each bulk run's pages are sealed just before
    /// they are written, and a page the fault path took first is left out of the run.
    func apply(_ scratch: Scratch, demand: Bool) throws {
        let counter = demand ? demandCount : backgroundCount
        let generation = scratch.generation.load(ordering: .relaxed)
        for (r, run) in scratch.runs.enumerated() where run.count > 0 {
            do {
                if let sealing, exclusiveInstalls, !demand, publishes(run) {
                    let tid = ThreadScheduling.currentThreadID()
                    sealedRunThread.store(tid, ordering: .releasing)
                    defer { endSealedRun(tid) }
                    var start = 0
                    for i in 0...run.count {
                        if i < run.count && sealing.seal(run.first + i, scratch.stagedEntry(run, i, generation: generation)) { continue }
                        if i > start { try map(run, pages: start..<i, scratch: scratch, counter: counter, demand: demand) }
                        start = i + 1
                    }
                } else {
                    try map(run, pages: 0..<run.count, scratch: scratch, counter: counter, demand: demand)
                }
                // A run ends at a page a vCPU waits for (``stage``): wake it now, not after the
                // rest of the batch (vcpu-exit; in uffd modes the mapping itself woke it).
                if r + 1 < scratch.runs.count && book.requested.contains(run.first + run.count - 1) { afterBatch?() }
            } catch {
                for later in scratch.runs[r...] {
                    for i in 0..<later.count where !table.installed.contains(later.first + i) { table.unclaim(later.first + i) }
                }
                throw error
            }
        }
        afterBatch?()
    }

    /// The fault path found its page sealed by a bulk run that is being written: the fault
    /// waits for that run. The installer runs at nice -5, and on the fault path's CPU the
    /// fault path's own real-time threads can keep it from finishing the run for
    /// milliseconds. So the waiting fault lends it the fault path's
    /// real-time priority until the run is mapped (priority inheritance, done by hand: the
    /// seal is not a lock the kernel knows). At worst the run after it also runs real-time.
    func hurrySealedRun() {
        let tid = sealedRunThread.load(ordering: .acquiring)
        guard tid != 0, !sealedRunHurried.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if (try? ThreadScheduling.setRealtimeFIFO(true, ofThread: tid)) != nil { hurriedRuns.wrappingIncrement(ordering: .relaxed) }
    }

    private func endSealedRun(_ tid: Int32) {
        sealedRunThread.store(0, ordering: .releasing)
        if sealedRunHurried.exchange(false, ordering: .acquiringAndReleasing) {
            try? ThreadScheduling.setRealtimeFIFO(false, ofThread: tid)  // back to SCHED_OTHER, its niceness kept
        }
    }

    /// Maps `pages` (offsets into `run`) with one call.
    private func map(_ run: StagedRun, pages: Range<Int>, scratch: Scratch, counter: ManagedAtomic<Int>, demand: Bool) throws {
        // A run in the pool is moved from there, zero runs included (pool pages are zero until
        // data is written into them): a UFFDIO_ZEROPAGE mapping would cost the guest a
        // copy-on-write fault, a page allocation and a TLB-flush IPI on its first write.
        let runData: UnsafeRawPointer? = run.zero && !run.inPool ? nil : UnsafeRawPointer(run.data)
        let first = run.first + pages.lowerBound
        if try mapper.map(first: first, count: pages.count, data: runData.map { $0 + pages.lowerBound * 4096 }, fromPool: run.inPool,
                          demand: demand) {
            for i in pages { finishPage(run.first + i, crc: scratch.crc[run.crcStart + i], counter: counter) }
        } else {
            // Raced with another installer: page by page. A page that turns out to be mapped
            // already holds these very bytes (the same verified page from the other
            // connection), so it is marked installed either way.
            for i in pages {
                let page = run.first + i
                if table.installed.contains(page) { continue }
                _ = try mapper.map(first: page, count: 1, data: runData.map { $0 + i * 4096 }, fromPool: run.inPool, demand: demand)
                finishPage(page, crc: scratch.crc[run.crcStart + i], counter: counter)
            }
        }
    }

    /// The fault path (a uffd reader, or a vCPU thread in vcpu-exit): maps one page the bulk
    /// stream staged and the bulk installer claimed, from the staged bytes (nil: zeros). In
    /// MISSING modes a second mapping of a page is refused by the kernel, never written over:
    /// whichever installer comes second steps over it. With exclusive installs (MINOR) the
    /// caller has taken the page from the bulk installer first (``StagedPages/take``).
    /// Counted as a background page.
    func installStaged(_ page: Int, data: UnsafeRawPointer?, crc: UInt32) throws {
        _ = try mapper.map(first: page, count: 1, data: data, fromPool: false, demand: true)
        if finishPage(page, crc: crc, counter: backgroundCount) { stagedFaultCount.wrappingIncrement(ordering: .relaxed) }
        afterBatch?()
    }

    /// Marks `page` installed; false when another installer did first.
    @inline(__always) @discardableResult
    private func finishPage(_ page: Int, crc: UInt32, counter: ManagedAtomic<Int>) -> Bool {
        guard table.markInstalled(page, crc: crc) else { return false }
        counter.wrappingIncrement(ordering: .relaxed)
        if crc == MemoryDigest.zeroPageCRC { zeroCount.wrappingIncrement(ordering: .relaxed) }
        if book.requested.contains(page) { book.noteInstalled(page, now: MonotonicClock.nanoseconds(), byReply: counter === demandCount) }
        if page == damageAfterInstall {
            // The injection: a page that arrived intact but is wrong in guest memory.
            let p = UnsafeMutableRawPointer(mutating: mapper.bytes(of: page))
            p.storeBytes(of: p.load(as: UInt8.self) ^ 0x5A, as: UInt8.self)
        }
        return true
    }
}

extension PageInstaller {
    /// A damaged batch was dropped (never installed).
    func countCorrupt() { corruptCount.wrappingIncrement(ordering: .relaxed) }
}
