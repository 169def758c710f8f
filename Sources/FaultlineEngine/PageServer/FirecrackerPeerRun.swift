import FaultlineCore
import FaultlineLinux

/// One whole run of Firecracker's side against a page server (`faultline uffd-serve client`
/// and the benchmark): connect, fault every page in from several threads, let a balloon
/// remove ranges, check every byte.
public struct FirecrackerPeerRun: Codable, Sendable {
    public var pages: Int
    public var page_size: UInt64
    public var threads: Int
    /// From the faulting threads' start to the last one's end.
    public var seconds: Double
    public var pages_per_second: Double
    public var removed_bytes: Int
    /// Pages whose bytes were wrong (nil: not checked).
    public var mismatched_pages: Int?
    public var first_mismatch: String?

    public struct Plan: Sendable {
        public var sizes: [UInt64]
        public var pageSize: UInt64 = 4096
        public var threads = 1
        public var delayMicroseconds: UInt64 = 0
        /// (region, byte offset, length) removed after every page was touched.
        public var removes: [(region: Int, offset: Int, length: Int)] = []
        public var verify = true
        /// Runs once when this many pages have been touched.
        public var announceAfter: Int?
        public var announce: (@Sendable () -> Void)?
        public init(sizes: [UInt64]) { self.sizes = sizes }
    }

    /// Plays Firecracker against the server at `socketPath` serving `file`.
    public static func play(_ plan: Plan, socketPath: String, file: MappedFile) throws -> FirecrackerPeerRun {
        let peer = try FirecrackerPeer(sizes: plan.sizes, pageSize: plan.pageSize)
        try peer.connect(to: socketPath)
        let seconds = try peer.touchAll(threads: plan.threads, delayMicroseconds: plan.delayMicroseconds,
                                        announceAfter: plan.announceAfter, announce: plan.announce)
        for r in plan.removes { try peer.remove(region: r.region, offset: r.offset, length: r.length) }
        let mismatches = plan.verify ? peer.verify(against: file, removed: plan.removes) : nil
        peer.hangUp()
        return FirecrackerPeerRun(
            pages: peer.totalPages, page_size: plan.pageSize, threads: plan.threads, seconds: seconds,
            pages_per_second: seconds > 0 ? (Double(peer.totalPages) / seconds).rounded() : 0,
            removed_bytes: plan.removes.reduce(0) { $0 + $1.length },
            mismatched_pages: mismatches?.count, first_mismatch: mismatches?.first?.description)
    }
}
