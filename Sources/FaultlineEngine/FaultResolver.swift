import FaultlineCore
import FaultlineLinux
import Histogram

/// How a resolver makes a page present.
public enum InstallMethod: Sendable {
    /// UFFDIO_COPY from the fetched bytes (anonymous memory, MISSING faults).
    case copy
    /// pwrite the bytes into the backing file, then UFFDIO_CONTINUE (memfd, MINOR faults):
    /// nobody can see the page before it is complete.
    case writeThenContinue
}

/// Per-thread state of a fault-handling thread (a uffd reader or a vCPU): scratch for
/// fetched pages, counters and a latency histogram, all allocated before the run so that
/// resolving a fault allocates nothing.
public final class FaultThreadState: @unchecked Sendable {
    /// Keeps the counters below off the cache lines of the neighbouring thread's state
    /// (these objects are allocated one after another; without it every fault of one vCPU
    /// would invalidate a line another vCPU is writing).
    private let leadingPad: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
    public let scratch: UnsafeMutableRawPointer
    public let scratchSize: Int
    public var resolved = 0
    public var raced = 0
    /// Nanoseconds from the fault being seen to the page being installed.
    public var latency: Histogram<UInt32>
    private let trailingPad: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)

    public init(pageSize: Int) {
        scratchSize = pageSize
        scratch = .allocate(byteCount: pageSize, alignment: 4096)
        latency = Histogram<UInt32>(lowestDiscernibleValue: 1, highestTrackableValue: 120_000_000_000,
                                    numberOfSignificantValueDigits: .two)
    }

    deinit { scratch.deallocate() }
}

/// The single fault path shared by every delivery mode: fetch the page from the source,
/// install it (with the EEXIST/EAGAIN policy of `Userfaultfd`), mark it present.
public final class FaultResolver: @unchecked Sendable {
    public let region: GuestMemoryRegion
    public let source: PageSource
    public let present: PageBitmap
    public let method: InstallMethod
    /// Installation granularity: 4 KiB, or 2 MiB on hugetlb.
    public let pageSize: UInt64
    public let pageShift: UInt64

    public init(region: GuestMemoryRegion, source: PageSource, present: PageBitmap, method: InstallMethod) {
        self.region = region
        self.source = source
        self.present = present
        self.method = method
        self.pageSize = region.backing.pageSize
        self.pageShift = UInt64(pageSize.trailingZeroBitCount)
    }

    /// Makes the page holding byte `offset` of the region present, through `uffd`.
    /// `wake`: wake threads waiting on the range (uffd readers); vCPU-exit resolution
    /// passes false (nobody waits).
    @inlinable
    public func resolve(offset: UInt64, uffd: Userfaultfd, wake: Bool, state: FaultThreadState) throws {
        let t0 = MonotonicClock.nanoseconds()
        let pageOffset = offset & ~(pageSize - 1)
        let page = Int(pageOffset >> pageShift)
        if present.contains(page) {
            // Someone installed it since the fault was raised; a waiter may still sleep.
            if wake { try uffd.wake(start: region.hostAddress.adding(pageOffset)!, length: pageSize) }
            state.raced += 1
            return
        }
        let data = try source.fetch(offset: pageOffset, length: Int(pageSize), scratch: state.scratch)
        let destination = HostAddress(rawValue: region.hostAddress.rawValue + pageOffset)
        let outcome: UffdInstallOutcome
        switch method {
        case .copy:
            outcome = try uffd.copy(to: destination, from: data, length: pageSize, dontWake: !wake)
        case .writeThenContinue:
            try region.writeFile(at: pageOffset, from: data, length: Int(pageSize))
            outcome = try uffd.continue(at: destination, length: pageSize, dontWake: !wake)
        }
        present.insert(page)
        if outcome == .installed { state.resolved += 1 } else { state.raced += 1 }
        _ = state.latency.record(MonotonicClock.nanoseconds() &- t0)
    }
}
