import Atomics
import FaultlineCore
import FaultlineLinux

/// Everything a page-server worker knows that must outlive it, kept in memory the supervisor
/// holds (a memfd shared with each worker in turn): counters and the latency histogram, the
/// bitmap of pages the peer removed (REMOVE events: they read back as zeros from then on),
/// and the landing buffer the worker reads userfaultfd events into.
///
/// A REMOVE is completed by the kernel when a read takes it off the queue, so a worker that
/// dies between reading one and recording it would lose it, and the next worker would fill
/// the removed pages from the file. Reading straight into the shared landing buffer closes
/// that window: the worker records the REMOVEs in the bitmap and then empties the slots
/// (in that order), and the next worker replays whatever it finds still in the slots.
///
/// Layout, in 8-byte words: a header (magic, total pages, landing capacity, bitmap words),
/// the counters, the histogram buckets, the landing buffer, the bitmap.
public final class PageServerLedger: @unchecked Sendable {
    /// What the counters count.
    public enum Counter: Int, CaseIterable, Sendable {
        /// Page-fault events read from the userfaultfd.
        case faultsRead
        /// Faults resolved: the page was filled, or was already there.
        case faultsServed
        case pagesCopied
        case zeroPages
        /// Faults whose page another fill had already mapped (EEXIST).
        case alreadyPresent
        case removeEvents
        /// Pages newly marked removed by REMOVE events.
        case removedPages
        /// Fills that met EAGAIN (a REMOVE pending) and were retried after reading events.
        case eagainRetries
        /// Faults on memory that was gone when filled (unmapped, or the peer exited).
        case faultsDropped
        /// Faults outside every region: poisoned (the access gets SIGBUS), never filled.
        case faultsOutsideRegions
        /// Faults beyond the pending queue's room: woken to fault again instead.
        case pendingOverflows
        /// REMOVE events a worker found in the landing buffer at attach (read by a dead worker).
        case removesReplayed
        /// Page-fault events a worker found in the landing buffer at attach (their threads
        /// were woken and faulted again).
        case faultsReplayed
        case workersAttached
        case firstFaultNanoseconds
        case lastFillNanoseconds
        case latencyMaxNanoseconds
        /// Faults on pages that could never be served (a remote snapshot's fetch failed for
        /// good before they arrived): poisoned - the access gets a memory error, not zeros.
        case pagesUnavailable
    }

    static let magic: UInt64 = 0x3144_454C_5350_4C46  // "FLPSLED1"
    static let headerWords = 8
    static let counterWords = 32

    public let memory: SharedMemory
    public let totalPages: UInt64
    public let landing: UffdLandingBuffer
    @usableFromInline let words: UnsafeMutablePointer<UInt64>
    @usableFromInline let counters: UnsafeMutablePointer<UInt64>
    @usableFromInline let histogram: UnsafeMutablePointer<UInt64>
    @usableFromInline let bitmap: UnsafeMutablePointer<UInt64>

    /// Bytes of shared memory for a layout of `totalPages` pages.
    public static func size(totalPages: UInt64, landingCapacity: Int) -> Int {
        let bitmapWords = Int((totalPages + 63) / 64)
        return (headerWords + counterWords + LatencyBuckets.count + bitmapWords) * 8 + landingCapacity * UffdLandingBuffer.messageSize
    }

    /// A new, zeroed ledger for `layout` (made by the supervisor).
    public static func create(for layout: SnapshotLayout, landingCapacity: Int = 64) throws(SystemError) -> PageServerLedger {
        let memory = try SharedMemory(size: size(totalPages: layout.totalPages, landingCapacity: landingCapacity), label: "page-server-ledger")
        let w = memory.base.assumingMemoryBound(to: UInt64.self)
        w[1] = layout.totalPages
        w[2] = UInt64(landingCapacity)
        w[3] = (layout.totalPages + 63) / 64
        w[0] = magic
        return PageServerLedger(memory: memory)
    }

    /// A ledger made elsewhere, checked against `layout` (a worker attaching).
    public static func attach(_ memory: SharedMemory, for layout: SnapshotLayout) throws(PageServerError) -> PageServerLedger {
        let w = memory.base.assumingMemoryBound(to: UInt64.self)
        guard memory.size >= headerWords * 8, w[0] == magic, w[1] == layout.totalPages,
              memory.size >= size(totalPages: w[1], landingCapacity: Int(w[2])) else {
            throw .worker("the shared ledger does not match the regions (\(layout.totalPages) pages)")
        }
        return PageServerLedger(memory: memory)
    }

    private init(memory: SharedMemory) {
        self.memory = memory
        words = memory.base.assumingMemoryBound(to: UInt64.self)
        totalPages = words[1]
        let landingCapacity = Int(words[2])
        counters = words + Self.headerWords
        histogram = counters + Self.counterWords
        let landingBase = UnsafeMutableRawPointer(histogram + LatencyBuckets.count)
        landing = UffdLandingBuffer(base: landingBase, capacity: landingCapacity)
        bitmap = (landingBase + landingCapacity * UffdLandingBuffer.messageSize).assumingMemoryBound(to: UInt64.self)
    }

    // MARK: counters (one writer at a time: the live worker)

    @inlinable @inline(__always)
    public subscript(counter: Counter) -> UInt64 {
        get { counters[counter.rawValue] }
        set { counters[counter.rawValue] = newValue }
    }

    @inlinable @inline(__always)
    public func add(_ counter: Counter, _ n: UInt64 = 1) { counters[counter.rawValue] &+= n }

    /// Records one fault's read-to-filled latency.
    @inlinable @inline(__always)
    public func recordLatency(nanoseconds: UInt64, filledAt now: UInt64) {
        histogram[LatencyBuckets.index(of: nanoseconds)] &+= 1
        if nanoseconds > counters[Counter.latencyMaxNanoseconds.rawValue] { counters[Counter.latencyMaxNanoseconds.rawValue] = nanoseconds }
        counters[Counter.lastFillNanoseconds.rawValue] = now
    }

    public var latencyCounts: [UInt64] { (0..<LatencyBuckets.count).map { histogram[$0] } }

    // MARK: removed pages

    /// Whether page `index` (layout-wide) was removed.
    @inlinable @inline(__always)
    public func isRemoved(_ index: UInt64) -> Bool {
        bitmap[Int(index >> 6)] & (1 << (index & 63)) != 0
    }

    /// Marks `pages` removed; returns how many were not already.
    @discardableResult
    public func markRemoved(_ pages: Range<UInt64>) -> UInt64 {
        var added: UInt64 = 0
        var i = pages.lowerBound
        while i < pages.upperBound {
            let word = Int(i >> 6), bit = i & 63
            let n = min(64 - bit, pages.upperBound - i)
            let mask: UInt64 = n == 64 ? ~0 : ((1 << n) - 1) << bit
            added += UInt64((mask & ~bitmap[word]).nonzeroBitCount)
            bitmap[word] |= mask
            i += n
        }
        return added
    }

    /// Orders the bitmap and counter stores before the landing slots are emptied: a worker
    /// killed in between leaves slots that are replayed (harmless twice), never an empty
    /// slot whose REMOVE was not recorded.
    @inlinable @inline(__always)
    public func publish() { atomicMemoryFence(ordering: .releasing) }
}
