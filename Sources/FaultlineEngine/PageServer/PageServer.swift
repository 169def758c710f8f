import FaultlineCore
import FaultlineLinux

/// Serves one peer's page faults from a snapshot's memory file: the fault loop of a
/// page-server worker (one thread; docs/page-server.md).
///
/// Each round drains every pending event before filling anything: REMOVEs are recorded in the
/// ledger's bitmap (the pages read back as zeros from then on), page faults join the pending
/// queue. Then each pending fault is filled - UFFDIO_COPY from the file, or zeros for a removed
/// page (UFFDIO_ZEROPAGE; a copy of zeros on hugetlb). A fill that meets EAGAIN raced a REMOVE
/// still queued or in progress: the fault stays pending and the next round reads the events
/// first. So a fault and a REMOVE of the same page end with zeros whichever comes first.
///
/// The loop allocates nothing per fault: the pending queue, the landing buffer and the
/// counters are set up before the first event.
public final class PageServer {
    /// Test seams and crash injection (all off by default).
    public struct Hooks {
        /// Called before each round of fills with the number of faults pending.
        public var beforeFilling: ((Int) -> Void)?
        /// Crash injection: called right after the read that brings this worker's page-fault
        /// events to `afterFaults` or its REMOVEs to `afterRemoves` - before any of the read
        /// events is acted on. It must not return normally (it crashes the process, or throws).
        public var crash: (() throws -> Void)?
        public var crashAfterFaults: Int?
        public var crashAfterRemoves: Int?
        public init() {}
    }

    struct PendingFault {
        var address: UInt64
        var readAt: UInt64
    }

    public let uffd: Userfaultfd
    public let layout: SnapshotLayout
    public let file: MappedFile
    public let ledger: PageServerLedger
    var hooks: Hooks
    let regions: UnsafeMutableBufferPointer<SnapshotRegion>
    /// 2 MiB of zeros: the source of a removed huge page's fill (hugetlb has no ZEROPAGE).
    let zeros: AnonymousMapping?
    let pending: UnsafeMutablePointer<PendingFault>
    let pendingCapacity: Int
    var pendingCount = 0
    let ensure: ((Range<Int>) throws -> Void)?
    var faultsReadHere = 0
    var removesReadHere = 0

    /// `ensure`: called with the memory file's page indexes a fill is about to copy, before it
    /// does (a file still arriving: it returns once they are in; throws
    /// ``PageServerError/pageUnavailable(_:)`` when they never will be). Nil: the file is whole.
    public init(uffd: Userfaultfd, layout: SnapshotLayout, file: MappedFile, ledger: PageServerLedger,
                hooks: Hooks = Hooks(), pendingCapacity: Int = 4096, ensure: ((Range<Int>) throws -> Void)? = nil) throws(SystemError) {
        self.ensure = ensure
        self.uffd = uffd
        self.layout = layout
        self.file = file
        self.ledger = ledger
        self.hooks = hooks
        regions = .allocate(capacity: layout.regions.count)
        _ = regions.initialize(from: layout.regions)
        let hugest = layout.regions.map(\.pageSize).max() ?? 4096
        zeros = hugest > 4096 ? try AnonymousMapping(size: Int(hugest), label: "zero huge page") : nil
        self.pendingCapacity = pendingCapacity
        pending = .allocate(capacity: pendingCapacity)
    }

    deinit {
        regions.deallocate()
        pending.deallocate()
    }

    /// Takes over from a worker that may have died mid-way: replays the events it left in the
    /// landing buffer (REMOVEs are recorded; faults are not kept - their threads are woken
    /// below), then wakes every thread waiting on any region, since fault events a dead
    /// worker read are never delivered again: woken, each thread faults anew and this worker
    /// sees the fault. Pages it had filled stay filled (a second fill finds them: EEXIST).
    public func attach() throws(SystemError) {
        let landing = ledger.landing
        for slot in 0..<landing.capacity {
            switch landing[slot] {
            case .remove(let start, let end)?:
                record(removeFrom: start.rawValue, to: end.rawValue)
                ledger.add(.removesReplayed)
            case .pagefault?: ledger.add(.faultsReplayed)
            default: break
            }
        }
        ledger.publish()
        landing.clear(count: landing.capacity)
        for r in layout.regions { try uffd.wake(start: HostAddress(rawValue: r.base), length: r.size) }
        ledger.add(.workersAttached)
    }

    /// Serves until `stop` (a descriptor) is readable or hung up. Throws what it cannot
    /// handle (and whatever the crash hook throws).
    public func run(until stop: Int32) throws {
        while true {
            if pendingCount == 0 {
                guard try uffd.waitReadable(orStop: stop) else { return }
            }
            try drainEvents()
            hooks.beforeFilling?(pendingCount)
            try fillPending()
            if pendingCount > 0 { ThreadScheduling.yield() }  // a REMOVE's madvise is finishing
        }
    }

    /// Reads every queued event: REMOVEs into the bitmap, faults into the pending queue.
    func drainEvents() throws {
        let landing = ledger.landing
        while true {
            let n = try landing.read(from: uffd)
            if n == 0 { return }
            let now = MonotonicClock.nanoseconds()
            try injectCrashIfDue(in: n)
            for slot in 0..<n {
                switch landing[slot] {
                case .pagefault(let address, _, _)?:
                    ledger.add(.faultsRead)
                    if ledger[.firstFaultNanoseconds] == 0 { ledger[.firstFaultNanoseconds] = now }
                    enqueue(address.rawValue, readAt: now)
                case .remove(let start, let end)?:
                    ledger.add(.removeEvents)
                    record(removeFrom: start.rawValue, to: end.rawValue)
                default:
                    break  // fork, remap and unmap events are refused at the handshake
                }
            }
            ledger.publish()
            landing.clear(count: n)
        }
    }

    /// The crash hook, when this read takes the worker past a crash threshold.
    func injectCrashIfDue(in n: Int) throws {
        guard let crash = hooks.crash else { return }
        let landing = ledger.landing
        var faults = 0, removes = 0
        for slot in 0..<n {
            switch landing[slot] {
            case .pagefault?: faults += 1
            case .remove?: removes += 1
            default: break
            }
        }
        faultsReadHere += faults
        removesReadHere += removes
        if let limit = hooks.crashAfterFaults, faults > 0, faultsReadHere >= limit { try crash() }
        if let limit = hooks.crashAfterRemoves, removes > 0, removesReadHere >= limit { try crash() }
    }

    func record(removeFrom start: UInt64, to end: UInt64) {
        layout.forEachPageRange(in: start, end) { pages in ledger.add(.removedPages, ledger.markRemoved(pages)) }
    }

    func enqueue(_ address: UInt64, readAt: UInt64) {
        guard pendingCount < pendingCapacity else {
            // No room: wake the thread instead; it faults again and comes back as a new event.
            ledger.add(.pendingOverflows)
            try? uffd.wake(start: HostAddress(rawValue: address & ~4095), length: 4096)
            return
        }
        pending[pendingCount] = PendingFault(address: address, readAt: readAt)
        pendingCount += 1
    }

    /// Fills each pending fault's page; keeps (in order) those that must wait for events.
    func fillPending() throws {
        var kept = 0
        for i in 0..<pendingCount {
            let fault = pending[i]
            if try fill(fault) {
                continue
            }
            pending[kept] = fault
            kept += 1
        }
        pendingCount = kept
    }

    /// One fault; false when it must be retried after reading events.
    @inline(__always)
    func fill(_ fault: PendingFault) throws -> Bool {
        guard let r = layout.regionIndex(containing: fault.address) else {
            ledger.add(.faultsOutsideRegions)
            _ = try? uffd.attemptPoison(at: HostAddress(rawValue: fault.address & ~4095), length: 4096)
            return true
        }
        let region = regions[r]
        let page = fault.address & ~(region.pageSize - 1)
        let index = region.firstPage + (page - region.base) / region.pageSize
        let zero = ledger.isRemoved(index)
        let outcome: UffdAttempt
        if zero, region.pageSize == 4096 {
            outcome = try uffd.attemptZeroPage(at: HostAddress(rawValue: page), length: 4096)
        } else {
            let offset = Int(region.offset + (page - region.base))
            if !zero, let ensure {
                do {
                    try ensure(offset / 4096..<(offset + Int(region.pageSize)) / 4096)
                } catch PageServerError.pageUnavailable {
                    ledger.add(.pagesUnavailable)
                    _ = try? uffd.attemptPoison(at: HostAddress(rawValue: page), length: region.pageSize)
                    return true
                }
            }
            let source = zero ? UnsafeRawPointer(zeros!.base) : file.base + offset
            outcome = try uffd.attemptCopy(to: HostAddress(rawValue: page), from: source, length: region.pageSize)
        }
        switch outcome {
        case .installed:
            ledger.add(zero ? .zeroPages : .pagesCopied)
        case .alreadyPresent:
            ledger.add(.alreadyPresent)
        case .retryAfterEvents:
            ledger.add(.eagainRetries)
            return false
        case .memoryGone:
            ledger.add(.faultsDropped)
            return true
        }
        ledger.add(.faultsServed)
        let now = MonotonicClock.nanoseconds()
        ledger.recordLatency(nanoseconds: now &- fault.readAt, filledAt: now)
        return true
    }
}
