/// The state of one page on the destination.
public enum DestinationPageState: String, Sendable, Equatable {
    /// No copy here.
    case absent
    /// A pre-copy round delivered a copy; a later round may replace it. Not final until the
    /// switch-over says the source did not dirty it afterwards.
    case precopied
    /// A pre-copied copy the switch-over declared out of date: it was dropped and the page
    /// must arrive again.
    case stale
    /// Final: mapped into guest memory, the guest may use it. Never replaced.
    case installed
}

/// Per-page state of the destination, safe to update from several installer threads
/// (background stream, demand replies) without locks. Transitions:
/// absent/precopied -> precopied (a round re-sends the page: the new copy replaces the old);
/// at the switch-over, precopied -> stale for owed pages, precopied -> installed for the rest;
/// absent/stale -> installed once, by the one installer that claimed the page.
public final class DestinationPageTable: @unchecked Sendable {
    public let count: Int
    let precopied: PageBitmap
    let staleBits: PageBitmap
    /// Installed: final. Read on the fault path.
    public let installed: PageBitmap
    /// Set by the one installer that owns a page's installation (exclusive installs).
    public let claimed: PageBitmap
    /// CRC32C of each page's bytes as received (the per-page transfer check).
    public let receivedCRC: UnsafeMutablePointer<UInt32>
    private let crcTable: ZeroedTable<UInt32>
    public private(set) var switchedOver = false

    /// `allocator`: where the per-page CRCs live (zero-filled memory: nothing touched here).
    public init(count: Int, allocator: ZeroFilledAllocator? = nil) {
        self.count = count
        precopied = PageBitmap(count: count)
        staleBits = PageBitmap(count: count)
        installed = PageBitmap(count: count)
        claimed = PageBitmap(count: count)
        crcTable = ZeroedTable(count: count, allocator: allocator)
        receivedCRC = crcTable.base
    }

    public func state(_ page: Int) -> DestinationPageState {
        if installed.contains(page) { return .installed }
        if precopied.contains(page) { return .precopied }
        if staleBits.contains(page) { return .stale }
        return .absent
    }

    /// Before the switch-over: a copy of `page` arrived (replacing any earlier one).
    public func recordPrecopy(_ page: Int, crc: UInt32) {
        precondition(!switchedOver, "pre-copy page after the switch-over")
        receivedCRC[page] = crc
        precopied.insert(page)
    }

    /// The switch-over: every page in `owed` the source will send again. Returns the ranges
    /// of owed pages that had a (now stale) copy here, for the caller to drop. Every other
    /// pre-copied page becomes installed.
    public func switchOver(owed: [Range<Int>]) -> [Range<Int>] {
        let dropped = dropPrecopied(owed)
        precopied.forEachSetPage { installed.insert($0) }
        switchedOver = true
        return dropped
    }

    /// Before the switch-over (`discard`): the copies of these pages are out of date. Returns
    /// the ranges that had a copy here, for the caller to drop; the pages are owed again.
    public func dropPrecopied(_ ranges: [Range<Int>]) -> [Range<Int>] {
        precondition(!switchedOver, "discard after the switch-over")
        var dropped: [Range<Int>] = []
        for r in ranges {
            var runStart = -1
            for page in r {
                if precopied.remove(page) {
                    staleBits.insert(page)
                    if runStart < 0 { runStart = page }
                } else if runStart >= 0 {
                    dropped.append(runStart..<page)
                    runStart = -1
                }
            }
            if runStart >= 0 { dropped.append(runStart..<r.upperBound) }
        }
        return dropped
    }

    /// Claims the installation of a page that is not installed yet. False: someone else owns it.
    @inline(__always) public func claim(_ page: Int) -> Bool {
        !installed.contains(page) && claimed.insert(page)
    }

    /// Gives a claim back (the install failed; another installer may try).
    public func unclaim(_ page: Int) { claimed.remove(page) }

    /// After the switch-over: the page is mapped. False when it already was.
    @discardableResult
    @inline(__always) public func markInstalled(_ page: Int, crc: UInt32) -> Bool {
        receivedCRC[page] = crc
        guard installed.insert(page) else { return false }
        staleBits.remove(page)
        return true
    }

    public var installedCount: Int { installed.populationCount }
    public var isComplete: Bool { installed.isFull }
}
