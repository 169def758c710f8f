import FaultlineCore
import FaultlineLinux

/// Firecracker's side of the classic page-fault handler protocol, done as Firecracker does it
/// (docs/page-server.md): guest memory mapped as anonymous private memory (hugetlb for 2 MiB
/// pages), a userfaultfd opened O_CLOEXEC | O_NONBLOCK with UFFD_FEATURE_EVENT_REMOVE (the
/// balloon), every region registered MISSING, then one message - the regions as JSON with the
/// userfaultfd attached - on a Unix socket that stays open. For tests and benchmarks of page
/// servers: it touches the memory from several threads, removes ranges as a balloon does, and
/// checks every byte against the memory file.
public final class FirecrackerPeer: @unchecked Sendable {
    public struct Region {
        public let memory: AnonymousMapping
        /// Where the region's contents start in the memory file.
        public let fileOffset: UInt64
    }

    public let uffd: Userfaultfd
    public let pageSize: UInt64
    public let regions: [Region]
    public private(set) var connection: UnixConnection?

    /// Maps one region per entry of `sizes` (bytes), whose contents are the file's from
    /// `fileOffsets` (default: one after another from 0), and registers them.
    public init(sizes: [UInt64], fileOffsets: [UInt64]? = nil, pageSize: UInt64 = 4096, balloon: Bool = true) throws {
        uffd = try Userfaultfd(required: balloon ? [.eventRemove] : [], flags: [.nonBlocking], label: "firecracker uffd")
        self.pageSize = pageSize
        var offset: UInt64 = 0
        var regions: [Region] = []
        for (i, size) in sizes.enumerated() {
            let memory = try AnonymousMapping(size: Int(size), reserve: false, hugePages: pageSize > 4096, label: "guest region \(i)")
            try uffd.register(start: memory.hostAddress, length: size, mode: .missing)
            regions.append(Region(memory: memory, fileOffset: fileOffsets?[i] ?? offset))
            offset += size
        }
        self.regions = regions
    }

    /// The regions as Firecracker describes them (both page-size fields, in bytes).
    public var message: [FirecrackerRegion] {
        regions.map {
            FirecrackerRegion(base: $0.memory.hostAddress.rawValue, size: UInt64($0.memory.size), offset: $0.fileOffset,
                              pageSize: pageSize, pageSizeKib: pageSize)
        }
    }

    /// Connects to `socketPath` and sends `bytes` (default: `message` as JSON) with
    /// `descriptors` attached (default: the userfaultfd). The connection stays open.
    public func connect(to socketPath: String, bytes: [UInt8]? = nil, descriptors: [Int32]? = nil) throws {
        let connection = try UnixConnection.connect(to: socketPath)
        try connection.send(bytes ?? FirecrackerMessage.encode(message), descriptors: descriptors ?? [uffd.fd.rawValue])
        self.connection = connection
    }

    /// Closes the connection (a peer that goes away; `--exit-on-hangup` servers stop).
    public func hangUp() { connection = nil }

    /// Pages in all regions.
    public var totalPages: Int { regions.reduce(0) { $0 + $1.memory.size / Int(pageSize) } }

    /// Reads a byte of every page from `threads` threads at once (thread t takes pages t,
    /// t + threads, ... of each region), each access a fault the server must fill. Returns the
    /// seconds from the threads' common start to the last one's end. `delayMicroseconds`
    /// paces each thread between pages (a slow guest); `announce` runs once, on the thread
    /// whose page brings the count to `announceAfter`.
    public func touchAll(threads: Int, delayMicroseconds: UInt64 = 0, announceAfter: Int? = nil,
                         announce: (@Sendable () -> Void)? = nil) throws -> Double {
        let gate = TimedCondition()
        var open = false
        var workers: [OSThread] = []
        let step = max(threads, 1), pageSize = Int(self.pageSize)
        let bases = regions.map { ($0.memory.base, $0.memory.size / pageSize) }
        let counted = announceAfter != nil && announce != nil
        let done = Locked(0)
        for t in 0..<step {
            workers.append(try OSThread(name: "fc-vcpu-\(t)") {
                gate.wait { open }
                var sum: UInt64 = 0
                for (base, pages) in bases {
                    var p = t
                    while p < pages {
                        sum &+= UInt64(base.load(fromByteOffset: p * pageSize, as: UInt8.self))
                        p += step
                        if counted, done.withLock({ $0 += 1; return $0 }) == announceAfter { announce?() }
                        if delayMicroseconds > 0 { MonotonicClock.sleep(microseconds: delayMicroseconds) }
                    }
                }
                sink.withLock { $0 &+= sum }
            })
        }
        let start = MonotonicClock.nanoseconds()
        gate.withLock { open = true }
        gate.broadcast()
        for w in workers { w.join() }
        return Double(MonotonicClock.nanoseconds() - start) / 1e9
    }

    /// Drops `length` bytes of region `region` from `offset` as a balloon does
    /// (madvise(MADV_DONTNEED)): the server sees a REMOVE, and the range reads zeros after.
    public func remove(region: Int, offset: Int, length: Int) throws {
        try regions[region].memory.discard(offset: offset, length: length)
    }

    /// A page whose contents are not what they should be.
    public struct Mismatch: Equatable, CustomStringConvertible {
        public let region: Int
        public let page: Int
        public let expectedZero: Bool
        public var description: String {
            "region \(region) page \(page): not \(expectedZero ? "zeros (it was removed)" : "the memory file's bytes")"
        }
    }

    /// Checks every byte of every region: the memory file's bytes, or zeros where `removed`
    /// (region, byte offset, length) says. Reading a page not yet filled faults it in first.
    public func verify(against file: MappedFile, removed: [(region: Int, offset: Int, length: Int)] = []) -> [Mismatch] {
        var mismatches: [Mismatch] = []
        let pageSize = Int(self.pageSize)
        for (r, region) in regions.enumerated() {
            for page in 0..<(region.memory.size / pageSize) {
                let at = page * pageSize
                let zero = removed.contains { $0.region == r && at >= $0.offset && at < $0.offset + $0.length }
                let actual = UnsafeRawPointer(region.memory.base + at)
                let same = zero ? MemoryBytes.allZero(actual, count: pageSize)
                    : MemoryBytes.equal(actual, file.base + Int(region.fileOffset) + at, count: pageSize)
                if !same { mismatches.append(Mismatch(region: r, page: page, expectedZero: zero)) }
            }
        }
        return mismatches
    }

    /// Which of region `region`'s pages are resident (mincore): a page the server filled is.
    public func residentPages(region: Int) throws -> Int {
        let memory = regions[region].memory
        var bytes = [UInt8](repeating: 0, count: memory.size / 4096)
        let result: Result<Void, SystemError> = bytes.withUnsafeMutableBufferPointer { b in
            Result { () throws(SystemError) in try memory.residency(into: b.baseAddress!) }
        }
        try result.get()
        return bytes.filter { $0 & 1 != 0 }.count
    }
}

/// Keeps the touch loops' sums observable, so the reads are not optimized away.
private let sink = Locked<UInt64>(0)
