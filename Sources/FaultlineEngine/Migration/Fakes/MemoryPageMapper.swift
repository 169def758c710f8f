import FaultlineCore
import FaultlineLinux

/// A page mapper over plain memory, for tests: it behaves like userfaultfd where the
/// installer's logic can tell (a page maps once; a run that meets a mapped page maps the rest
/// and reports it), counts every mapping of every page, and can be told to fail.
public final class MemoryPageMapper: PageMapper, @unchecked Sendable {
    public let pages: Int
    public let memory: UnsafeMutableRawPointer
    public let mapped: PageBitmap
    /// How many times each page was mapped after the switch-over (must never exceed 1).
    public let mapCount: UnsafeMutablePointer<Int32>
    public private(set) var armed = false
    /// Throws from the `map` call with this number (1 = the first), as a failing kernel would.
    public var failMapCall: Int?
    /// Called with the first page and the count at the start of every bulk (not demand) `map`
    /// after the switch-over: a test holds the installer there, or notes what it maps.
    public var beforeBulkMap: ((Int, Int) -> Void)?
    private let calls = Locked(0)

    public init(pages: Int) {
        self.pages = pages
        memory = .allocate(byteCount: pages * 4096, alignment: 4096)
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: pages * 4096)
        mapped = PageBitmap(count: pages)
        mapCount = .allocate(capacity: pages)
        mapCount.initialize(repeating: 0, count: pages)
    }

    deinit {
        memory.deallocate()
        mapCount.deallocate()
    }

    public func store(_ page: Int, bytes: UnsafeRawPointer?) throws {
        let p = memory + page * 4096
        if let bytes { p.copyMemory(from: bytes, byteCount: 4096) } else { p.initializeMemory(as: UInt8.self, repeating: 0, count: 4096) }
    }

    public func discard(_ range: Range<Int>) throws {
        (memory + range.lowerBound * 4096).initializeMemory(as: UInt8.self, repeating: 0, count: range.count * 4096)
    }

    public func armFaults() throws { armed = true }

    public func map(first page: Int, count: Int, data: UnsafeRawPointer?, fromPool: Bool, demand: Bool) throws -> Bool {
        let call = calls.withLock { n -> Int in n += 1; return n }
        if call == failMapCall { throw SystemError("UFFDIO_COPY (fake) page \(page)", errno: 12) }
        guard armed else {
            for i in 0..<count { try store(page + i, bytes: data.map { $0 + i * 4096 }) }
            return true
        }
        if !demand { beforeBulkMap?(page, count) }
        var metMapped = false
        for i in 0..<count {
            guard mapped.insert(page + i) else { metMapped = true; continue }  // EEXIST: step over it
            try store(page + i, bytes: data.map { $0 + i * 4096 })
            (mapCount + page + i).pointee += 1
        }
        return !metMapped
    }

    public func takePool(_ count: Int) -> UnsafeMutableRawPointer? { nil }
    public func group(of page: Int) -> Int { 0 }
    public func wake(_ page: Int) throws {}
    public func disarmFaults() { armed = false }
    public func bytes(of page: Int) -> UnsafeRawPointer { UnsafeRawPointer(memory + page * 4096) }
}
