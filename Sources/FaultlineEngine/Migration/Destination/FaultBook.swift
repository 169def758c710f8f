import Atomics
import FaultlineCore
import FaultlineLinux
import Histogram

/// What the destination knows about faults: which pages were requested, when and by which
/// vCPU, and how long each wait lasted. Shared by the requester and the installers; nothing
/// here allocates per fault.
final class FaultBook: @unchecked Sendable {
    let requested: PageBitmap
    let requestTime: UnsafeMutablePointer<UInt64>
    /// The requesting vCPU plus one (0: none).
    let requestVcpu: UnsafeMutablePointer<Int32>
    /// When the request for a faulting page left, and when the source's reply to it arrived
    /// (0: not yet): where a slow fault's wait went.
    let sentTime: UnsafeMutablePointer<UInt64>
    let replyTime: UnsafeMutablePointer<UInt64>
    let stallNanoseconds: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    let vcpus: Int
    let faults = ManagedAtomic<Int>(0)
    /// vcpu-exit: a vCPU waits on its own, and accounts its own stall.
    let vcpusAccountOwnStall: Bool
    /// Power-of-two buckets in microseconds, overall and per vCPU (QEMU 10.1's form).
    let latencyLog2: Log2Histogram
    /// Faults that waited at least ``slowNanoseconds``: how many, and the first
    /// ``slowKept`` of them (when, how long, which vCPU and page) - where a tail comes from.
    static let slowNanoseconds: UInt64 = 1_000_000
    static let slowKept = 16
    let slowCount = ManagedAtomic<Int>(0)
    private let slowRecords: UnsafeMutablePointer<SlowFault>
    /// The first fault's time: slow faults are placed relative to it.
    private let origin = ManagedAtomic<UInt64>(0)
    private let latency = Locked(Histogram<UInt32>(lowestDiscernibleValue: 1, highestTrackableValue: 120_000_000_000,
                                                  numberOfSignificantValueDigits: .two))

    /// The per-page tables, in zero-filled memory (nothing is touched until a fault writes it).
    private let tables: (ZeroedTable<UInt64>, ZeroedTable<Int32>, ZeroedTable<UInt64>, ZeroedTable<UInt64>)

    init(pages: Int, vcpus: Int, vcpusAccountOwnStall: Bool, allocator: ZeroFilledAllocator? = nil) {
        requested = PageBitmap(count: pages)
        // The request's time and vCPU are written on every fault (`allocator`: memory allocated
        // ahead); when a request left and when its reply came only for a source's answer.
        tables = (ZeroedTable(count: pages, allocator: allocator), ZeroedTable(count: pages, allocator: allocator),
                  ZeroedTable(count: pages, allocator: AnonymousMapping.zeroFilled),
                  ZeroedTable(count: pages, allocator: AnonymousMapping.zeroFilled))
        requestTime = tables.0.base
        requestVcpu = tables.1.base
        sentTime = tables.2.base
        replyTime = tables.3.base
        stallNanoseconds = .allocate(capacity: max(vcpus, 1))
        stallNanoseconds.initialize(repeating: .init(0), count: max(vcpus, 1))
        self.vcpus = vcpus
        latencyLog2 = Log2Histogram(vcpus: vcpus)
        self.vcpusAccountOwnStall = vcpusAccountOwnStall
        slowRecords = .allocate(capacity: Self.slowKept)
        slowRecords.initialize(repeating: SlowFault(), count: Self.slowKept)
    }

    deinit {
        slowRecords.deallocate()
        stallNanoseconds.deallocate()
    }

    /// Marks a page requested; false when a request is already outstanding.
    func noteRequest(_ page: Int, vcpu: Int, at time: UInt64) -> Bool {
        guard requested.insert(page) else { return false }
        requestVcpu[page] = Int32(vcpu + 1)
        requestTime[page] = time
        _ = origin.compareExchange(expected: 0, desired: time, ordering: .relaxed)
        faults.wrappingIncrement(ordering: .relaxed)
        return true
    }

    /// The request for `page` was handed to the fault connection.
    @inline(__always) func noteSent(_ page: Int, at time: UInt64) { sentTime[page] = time }

    /// The source's reply to the request for `page` arrived (before it is installed).
    @inline(__always) func noteReply(_ page: Int, at time: UInt64) {
        if page >= 0 && page < requested.count && requested.contains(page) && replyTime[page] == 0 { replyTime[page] = time }
    }

    /// A requested page was installed (`byReply`: from the source's reply to its request, not
    /// from the stream): record how long its fault waited.
    func noteInstalled(_ page: Int, now: UInt64, byReply: Bool) {
        let asked = requestTime[page]
        guard asked != 0 else { return }
        let waited = now &- asked
        let v = Int(requestVcpu[page]) - 1  // -1: no vCPU recorded
        recordWait(waited, vcpu: v)
        if waited >= Self.slowNanoseconds {
            let sent = sentTime[page], reply = replyTime[page]
            keepSlow(SlowFault(sinceFirstFault: asked &- origin.load(ordering: .relaxed), waited: waited, vcpu: Int32(v), page: page,
                               untilSent: sent >= asked ? sent &- asked : nil,
                               untilReply: reply >= asked ? reply &- asked : nil, byReply: byReply))
        }
    }

    /// A fault resolved where it was caught, with no request (its page was staged here):
    /// counted, and its wait recorded, like any other.
    func noteResolvedWithoutRequest(_ page: Int, vcpu: Int, faultTime: UInt64, now: UInt64) {
        _ = origin.compareExchange(expected: 0, desired: faultTime, ordering: .relaxed)
        faults.wrappingIncrement(ordering: .relaxed)
        let waited = now &- faultTime
        recordWait(waited, vcpu: vcpu)
        if waited >= Self.slowNanoseconds {
            keepSlow(SlowFault(sinceFirstFault: faultTime &- origin.load(ordering: .relaxed), waited: waited, vcpu: Int32(vcpu),
                               page: page, untilSent: nil, untilReply: nil, byReply: false))
        }
    }

    private func keepSlow(_ fault: SlowFault) {
        let i = slowCount.loadThenWrappingIncrement(ordering: .relaxed)
        if i < Self.slowKept { slowRecords[i] = fault }
    }

    private func recordWait(_ waited: UInt64, vcpu v: Int) {
        latency.withLock { _ = $0.record(waited) }
        latencyLog2.record(nanoseconds: waited, vcpu: v)
        if v >= 0 && v < vcpus && !vcpusAccountOwnStall { addStall(vcpu: v, nanoseconds: waited) }
    }

    /// One fault that waited at least ``slowNanoseconds``, and where the wait went: until its
    /// request left, until the source's reply arrived (nil: it had not when the page went in),
    /// and whether that reply or the stream installed the page.
    struct SlowFault {
        var sinceFirstFault: UInt64 = 0
        var waited: UInt64 = 0
        var vcpu: Int32 = -1
        var page = 0
        var untilSent: UInt64?
        var untilReply: UInt64?
        var byReply = false
    }

    /// The slow faults kept (read once the fault path has stopped).
    var slowFaults: [SlowFault] { (0..<min(slowCount.load(ordering: .relaxed), Self.slowKept)).map { slowRecords[$0] } }

    func addStall(vcpu: Int, nanoseconds: UInt64) {
        UnsafeAtomic<UInt64>(at: stallNanoseconds + vcpu).wrappingIncrement(by: nanoseconds, ordering: .relaxed)
    }

    var stallMilliseconds: [Double] {
        (0..<vcpus).map { Double(UnsafeAtomic<UInt64>(at: stallNanoseconds + $0).load(ordering: .relaxed)) / 1e6 }
    }

    /// Every page a fault asked for, ordered by when it was first asked for.
    func pagesInRequestOrder() -> [Int] {
        var pages: [Int] = []
        requested.forEachSetPage { if requestTime[$0] != 0 { pages.append($0) } }  // re-requests after a cut carry no time
        return pages.sorted { requestTime[$0] < requestTime[$1] }
    }

    /// p50, p90, p99 and max in microseconds (zeros without faults).
    var latencyMicroseconds: (p50: Double, p90: Double, p99: Double, max: Double) {
        latency.withLock { h in
            guard h.totalCount > 0 else { return (0, 0, 0, 0) }
            return (Double(h.valueAtPercentile(50)) / 1000, Double(h.valueAtPercentile(90)) / 1000,
                    Double(h.valueAtPercentile(99)) / 1000, Double(h.max) / 1000)
        }
    }
}
