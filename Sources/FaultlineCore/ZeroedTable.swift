/// Memory that reads as zeros until written, released when its owner goes. Per-page tables
/// are megabytes at a GiB of guest RAM; placed in such memory (an anonymous mapping, made by
/// the Linux layer) building one touches nothing, and each page of the table costs its first
/// write instead of a store at set-up. That set-up lies on the path to a restored guest's
/// first instruction.
public protocol ZeroFilledMemory: AnyObject, Sendable {
    var base: UnsafeMutableRawPointer { get }
    var size: Int { get }
}

/// Makes zero-filled memory of at least `bytes` bytes, or nil (the table then zeroes heap
/// memory itself).
public typealias ZeroFilledAllocator = @Sendable (_ bytes: Int) -> ZeroFilledMemory?

/// `count` elements whose all-zero bit pattern is their initial value (integers, their
/// atomic storage), in zero-filled memory when an allocator is given.
public final class ZeroedTable<Element>: @unchecked Sendable {
    public let base: UnsafeMutablePointer<Element>
    public let count: Int
    private let memory: ZeroFilledMemory?

    public init(count: Int, allocator: ZeroFilledAllocator?) {
        precondition(count >= 0 && _isPOD(Element.self), "a zeroed table holds plain values")
        self.count = count
        let capacity = max(count, 1), bytes = capacity * MemoryLayout<Element>.stride
        if let memory = allocator?(bytes), memory.size >= bytes {
            self.memory = memory
            base = memory.base.bindMemory(to: Element.self, capacity: capacity)
        } else {
            memory = nil
            let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: max(MemoryLayout<Element>.alignment, 16))
            raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
            base = raw.bindMemory(to: Element.self, capacity: capacity)
        }
    }

    deinit { if memory == nil { UnsafeMutableRawPointer(base).deallocate() } }

    @inlinable @inline(__always)
    public subscript(index: Int) -> Element {
        get { base[index] }
        set { base[index] = newValue }
    }
}
