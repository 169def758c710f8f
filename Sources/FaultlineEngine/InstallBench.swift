import FaultlineCore
import FaultlineLinux

/// How fast each way of putting received pages into guest memory is, with no vCPU running
/// (what the destination does with pre-copy pages and the background stream): `runPages`
/// consecutive pages per call, data from a staging buffer the way the installer stages runs.
/// Each method gets fresh, unpopulated memory; `prepare` is what had to happen before the
/// first page (populating the pool, allocating the memfd), reported separately.
public enum InstallBench {
    public enum Method: String, CaseIterable, Sendable {
        /// Plain stores into unpopulated anonymous memory: a first-touch fault per page.
        case store
        /// UFFDIO_COPY into a MISSING-registered range: the kernel allocates the page.
        case copy
        /// UFFDIO_ZEROPAGE (zero pages only: maps the shared zero page).
        case zeropage
        /// Writes into pre-populated pool pages, then UFFDIO_MOVE (pool populated in `prepare`).
        case movePool = "move-pool"
        /// pwrite into a memfd, then UFFDIO_CONTINUE on a MINOR-registered mapping of it.
        case memfdContinue = "memfd-continue"
        /// As memfd-continue, with the file allocated (fallocate) in `prepare`.
        case memfdAllocatedContinue = "memfd-allocated-continue"
    }

    public struct Result: Sendable {
        public var method: Method
        public var pages: Int
        public var prepareSeconds: Double
        public var installSeconds: Double
        public var pagesPerSecond: Double { installSeconds > 0 ? Double(pages) / installSeconds : 0 }
        /// Install rate counting the preparation too.
        public var pagesPerSecondWithPrepare: Double {
            prepareSeconds + installSeconds > 0 ? Double(pages) / (prepareSeconds + installSeconds) : 0
        }
    }

    public static func run(_ method: Method, megabytes: Int, runPages: Int) throws -> Result {
        let pages = megabytes * 256
        let size = UInt64(pages) * 4096
        let staging = UnsafeMutableRawPointer.allocate(byteCount: runPages * 4096, alignment: 4096)
        defer { staging.deallocate() }
        for i in 0..<(runPages * 4096) { staging.storeBytes(of: UInt8(truncatingIfNeeded: i &* 7 &+ 1), toByteOffset: i, as: UInt8.self) }
        var prepare: UInt64 = 0
        let t0: UInt64
        switch method {
        case .store, .copy, .zeropage:
            let ram = try GuestMemoryRegion(backing: .anonymous, size: size, label: "bench-install")
            var uffd: Userfaultfd?
            if method != .store {
                let u = try Userfaultfd(required: [], label: "bench-install")
                _ = try u.register(start: ram.hostAddress, length: size, mode: .missing)
                uffd = u
            }
            t0 = MonotonicClock.nanoseconds()
            try forEachRun(pages: pages, runPages: runPages, ram: ram) { first, n, at in
                switch method {
                case .store: (ram.base + first * 4096).copyMemory(from: staging, byteCount: n * 4096)
                case .copy: _ = try uffd!.copy(to: at, from: staging, length: UInt64(n) * 4096)
                default: _ = try uffd!.zeroPage(at: at, length: UInt64(n) * 4096)
                }
            }
        case .movePool:
            let ram = try GuestMemoryRegion(backing: .anonymous, size: size, label: "bench-install")
            let tp = MonotonicClock.nanoseconds()
            let pool = try AnonymousMapping(size: Int(size), populate: true, label: "bench-pool")
            prepare = MonotonicClock.nanoseconds() - tp
            let u = try Userfaultfd(required: [.move], label: "bench-install")
            _ = try u.register(start: ram.hostAddress, length: size, mode: .missing)
            t0 = MonotonicClock.nanoseconds()
            try forEachRun(pages: pages, runPages: runPages, ram: ram) { first, n, at in
                let src = pool.base + first * 4096
                src.copyMemory(from: staging, byteCount: n * 4096)
                _ = try u.move(to: at, from: HostAddress(src), length: UInt64(n) * 4096)
            }
        case .memfdContinue, .memfdAllocatedContinue:
            let ram = try GuestMemoryRegion(backing: .memfd, size: size, label: "bench-install")
            if method == .memfdAllocatedContinue {
                let tp = MonotonicClock.nanoseconds()
                try ram.allocateFile()
                prepare = MonotonicClock.nanoseconds() - tp
            }
            let u = try Userfaultfd(required: [.minorShmem], label: "bench-install")
            _ = try u.register(start: ram.hostAddress, length: size, mode: .minor)
            t0 = MonotonicClock.nanoseconds()
            try forEachRun(pages: pages, runPages: runPages, ram: ram) { first, n, at in
                try ram.writeFile(at: UInt64(first) * 4096, from: staging, length: n * 4096)
                _ = try u.continue(at: at, length: UInt64(n) * 4096)
            }
        }
        let seconds = Double(MonotonicClock.nanoseconds() - t0) / 1e9
        return Result(method: method, pages: pages, prepareSeconds: Double(prepare) / 1e9, installSeconds: seconds)
    }

    /// Calls `body(first page, page count, host address of the first page)` for each run.
    static func forEachRun(pages: Int, runPages: Int, ram: GuestMemoryRegion,
                           _ body: (Int, Int, HostAddress) throws -> Void) throws {
        for first in stride(from: 0, to: pages, by: runPages) {
            try body(first, min(runPages, pages - first), HostAddress(rawValue: ram.hostAddress.rawValue + UInt64(first) * 4096))
        }
    }
}
