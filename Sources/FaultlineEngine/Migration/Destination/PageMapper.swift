import FaultlineCore

/// How the destination puts pages into guest memory: the seam between the installer's
/// logic (which page, when, claimed by whom) and the kernel (userfaultfd, a pool, KVM).
/// `UffdPageMapper` is the real one; `MemoryPageMapper` keeps pages in plain memory for tests.
public protocol PageMapper: AnyObject, Sendable {
    /// Before the switch-over (no vCPU runs): the page's copy becomes `bytes` (nil: zeros),
    /// replacing any earlier copy.
    func store(_ page: Int, bytes: UnsafeRawPointer?) throws
    /// Before the switch-over: `count` consecutive pages, none of which has a copy here, get
    /// their first copy from contiguous `data`.
    func storeRun(first page: Int, count: Int, data: UnsafeRawPointer) throws
    /// Drops the copies of `pages` (stale pre-copied pages, at the switch-over).
    func discard(_ pages: Range<Int>) throws
    /// From now on a vCPU touching a page that is not mapped faults (userfaultfd registered).
    func armFaults() throws
    /// After the switch-over: maps `count` consecutive pages from contiguous `data` (nil:
    /// zero pages). False when some page was mapped already (the caller goes page by page).
    /// `fromPool`: `data` is pool memory that may be moved rather than copied. `demand`: a
    /// vCPU waits for these pages - take no lock that a bulk install may hold meanwhile.
    func map(first page: Int, count: Int, data: UnsafeRawPointer?, fromPool: Bool, demand: Bool) throws -> Bool
    /// Contiguous zeroed pool pages that runs may be written into, or nil.
    func takePool(_ pages: Int) -> UnsafeMutableRawPointer?
    /// Pages in one group may be mapped by one call (one userfaultfd each): the group of `page`.
    func group(of page: Int) -> Int
    /// Wakes anything waiting for `page` after someone else mapped it.
    func wake(_ page: Int) throws
    /// Every page is in: stop catching faults (the guest runs on plain memory).
    func disarmFaults()
    /// The page's bytes as guest memory holds them (reading them must not fault).
    func bytes(of page: Int) -> UnsafeRawPointer
    /// Stale pages kept when dropped, and how many of them took a new copy (0 where pages
    /// are not recycled).
    var recycledPages: (kept: Int, reused: Int) { get }
}

extension PageMapper {
    public var recycledPages: (kept: Int, reused: Int) { (0, 0) }

    public func storeRun(first page: Int, count: Int, data: UnsafeRawPointer) throws {
        for i in 0..<count { try store(page + i, bytes: data + i * 4096) }
    }
}
