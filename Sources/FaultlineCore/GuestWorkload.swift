/// How a guest vCPU walks the pages of its chunk.
public enum AccessPattern: Sendable, Equatable, CustomStringConvertible {
    /// Store to every page in ascending order.
    case sequential
    /// Load the first word of every page in ascending order and sum them (no stores).
    case read
    /// Store to every page exactly once, in a pseudo-random order derived from `seed`.
    case random(seed: UInt32)
    /// Store to pages `0, s, 2s, …`, then `1, 1+s, …`, up to `s-1, …` (every page once).
    case stride(pages: Int)

    /// Seed used by `"random"` without an explicit value.
    public static let defaultSeed: UInt32 = 1
    /// Stride used by `"stride"` without an explicit value.
    public static let defaultStride = 8
    /// The pattern names accepted by ``init(name:)``.
    public static let names = ["sequential", "read", "random", "stride"]

    /// Parses a pattern name as used on the command line: `sequential`, `read`,
    /// `random` (seed ``defaultSeed``), `stride` (``defaultStride`` pages), or
    /// `random:SEED` / `stride:PAGES` with an explicit parameter. Returns `nil` for anything
    /// else. Range checks (e.g. a stride below 1) are left to ``GuestWorkload/init(pattern:pagesPerVcpu:)``.
    public init?(name: String) {
        let parts = name.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
        let parameter = parts.count == 2 ? String(parts[1]) : nil
        switch (parts[0].lowercased(), parameter) {
        case ("sequential", nil): self = .sequential
        case ("read", nil): self = .read
        case ("random", nil): self = .random(seed: Self.defaultSeed)
        case ("random", let text?):
            guard let seed = UInt32(text) else { return nil }
            self = .random(seed: seed)
        case ("stride", nil): self = .stride(pages: Self.defaultStride)
        case ("stride", let text?):
            guard let pages = Int(text) else { return nil }
            self = .stride(pages: pages)
        default: return nil
        }
    }

    /// The base name (`"random"`, `"stride"`, …) without parameters.
    public var name: String {
        switch self {
        case .sequential: "sequential"
        case .read: "read"
        case .random: "random"
        case .stride: "stride"
        }
    }

    /// `sequential`, `read`, `random:SEED` or `stride:PAGES`; accepted back by ``init(name:)``.
    public var description: String {
        switch self {
        case .sequential, .read: name
        case .random(let seed): "random:\(seed)"
        case .stride(let pages): "stride:\(pages)"
        }
    }
}

/// Reasons a ``GuestWorkload`` cannot be built.
public enum GuestWorkloadError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidPageCount(Int)
    case tooManyPages(Int, limit: Int)
    case invalidStride(Int)

    public var description: String {
        switch self {
        case .invalidPageCount(let count):
            "guest workload: pages per vCPU must be at least 1 (got \(count))"
        case .tooManyPages(let count, let limit):
            "guest workload: \(count) pages per vCPU exceeds the limit of \(limit) (4 GiB of 4 KiB pages)"
        case .invalidStride(let pages):
            "guest workload: stride must be at least 1 page (got \(pages))"
        }
    }
}

/// A guest program that touches the first 32-bit word of every page of a vCPU's chunk, in an
/// order given by an ``AccessPattern``, then halts.
///
/// One code page, loaded at ``codeAddress``, is shared by every vCPU. The VMM starts each vCPU
/// in 32-bit protected mode (flat segments, paging off) at ``codeAddress`` with:
///
/// | register | value |
/// | --- | --- |
/// | `esi` | guest-physical address of the vCPU's first page (page aligned) |
/// | `edi` | `esi + pagesPerVcpu * 4096` (end of the chunk, exclusive) |
/// | `eax` | ``storeValue(forVcpu:)`` |
/// | `ebp` | ``seed(forVcpu:)`` |
/// | others | 0 |
///
/// The whole layout (code page and every chunk) must lie below 4 GiB; the VMM checks that.
/// On `hlt`, for ``AccessPattern/read`` `edx` holds
/// ``expectedReadChecksum(firstWords:)`` of the words read. ``pageOrder(forVcpu:)`` computes
/// on the host the exact order in which the machine code touches the pages.
public struct GuestWorkload: Sendable {
    public let pattern: AccessPattern
    public let pagesPerVcpu: Int

    /// Guest-physical address the program is loaded at and started from.
    public static let codeAddress: UInt64 = 0x1000
    /// Size of a guest page: each touched page is this large and aligned to it.
    public static let pageSize = 4096
    /// Largest supported ``pagesPerVcpu`` (2^20 pages, i.e. 4 GiB).
    public static let maxPagesPerVcpu = 1 << 20

    /// Multiplier of the `random` pattern's LCG; ≡ 1 (mod 4), as a full period needs.
    static let lcgMultiplier: UInt32 = 0x41C6_4E6D

    /// - Throws: ``GuestWorkloadError`` if `pagesPerVcpu` is not in `1...maxPagesPerVcpu`
    ///   or a stride is below 1.
    public init(pattern: AccessPattern, pagesPerVcpu: Int) throws {
        guard pagesPerVcpu >= 1 else { throw GuestWorkloadError.invalidPageCount(pagesPerVcpu) }
        guard pagesPerVcpu <= Self.maxPagesPerVcpu else {
            throw GuestWorkloadError.tooManyPages(pagesPerVcpu, limit: Self.maxPagesPerVcpu)
        }
        if case .stride(let pages) = pattern, pages < 1 { throw GuestWorkloadError.invalidStride(pages) }
        self.pattern = pattern
        self.pagesPerVcpu = pagesPerVcpu
    }

    /// Bytes of one vCPU's chunk (`edi - esi`).
    public var chunkSize: UInt64 { UInt64(pagesPerVcpu) * UInt64(Self.pageSize) }

    /// Whether the program stores to guest memory (`false` only for ``AccessPattern/read``).
    public var writes: Bool { pattern != .read }

    /// The value the VMM loads into `eax`, and which writing programs store: `0xC0DE0000 | id`
    /// (the id's low 16 bits).
    public static func storeValue(forVcpu id: Int) -> UInt32 {
        0xC0DE_0000 | UInt32(truncatingIfNeeded: id) & 0xFFFF
    }

    /// The value the VMM loads into `ebp`: for ``AccessPattern/random(seed:)`` a deterministic
    /// mix of the seed and `id` (distinct for distinct ids); 0 (unused) for other patterns.
    public func seed(forVcpu id: Int) -> UInt32 {
        guard case .random(let seed) = pattern else { return 0 }
        // The murmur3 finalizer, a bijection, over seed + id·φ (distinct for distinct ids).
        var h = seed &+ UInt32(truncatingIfNeeded: id) &* 0x9E37_79B9
        h ^= h >> 16
        h &*= 0x85EB_CA6B
        h ^= h >> 13
        h &*= 0xC2B2_AE35
        h ^= h >> 16
        return h
    }

    /// Sum (wrapping) of the first words of every page, as the `read` program leaves in `edx`.
    public static func expectedReadChecksum(firstWords: some Sequence<UInt32>) -> UInt32 {
        firstWords.reduce(0, &+)
    }

    /// The order in which vCPU `id` touches its pages (indices in `0..<pagesPerVcpu`, each
    /// exactly once), bit-for-bit the order of the machine code from ``program()``.
    public func pageOrder(forVcpu id: Int) -> [Int] {
        let n = pagesPerVcpu
        switch pattern {
        case .sequential, .read:
            return Array(0..<n)
        case .stride(let pages):
            let step = min(pages, n)
            return (0..<step).flatMap { Swift.stride(from: $0, to: n, by: step) }
        case .random:
            let walk = RandomWalk(pages: n), seed = seed(forVcpu: id)
            let increment = RandomWalk.increment(seed: seed)
            var order: [Int] = []
            order.reserveCapacity(n)
            var x = seed & walk.mask
            for _ in 0..<walk.period {
                if x < UInt32(n) { order.append(Int(x)) }
                x = (x &* Self.lcgMultiplier &+ increment) & walk.mask
            }
            return order
        }
    }

    /// Machine code for ``codeAddress`` (position independent, well under one page).
    public func program() throws -> [UInt8] {
        var asm = X86Assembler()
        switch pattern {
        case .sequential: emitSequential(into: &asm)
        case .read: emitRead(into: &asm)
        case .random: emitRandom(into: &asm)
        case .stride(let pages): emitStride(min(pages, pagesPerVcpu), into: &asm)
        }
        asm.hlt()
        return try asm.assemble()
    }

    // MARK: Code generation

    /// The parameters of the `random` walk: an LCG `x = x·a + c mod 2^k` with
    /// `2^k = period >= pages`; states `>= pages` are skipped (cycle walking). The start state is
    /// the seed's low `k` bits and the increment `c = (seed >> 16) | 1` is odd, so with
    /// `a ≡ 1 (mod 4)` the period is exactly `2^k` and every page is visited once. Deriving `c`
    /// from the seed makes different seeds give different cycles, not rotations of one cycle.
    private struct RandomWalk {
        /// `2^k`, the next power of two `>= pages`.
        let period: UInt32
        /// `2^k - 1`.
        let mask: UInt32

        init(pages: Int) {
            period = UInt32(1 << (Int.bitWidth - (pages - 1).leadingZeroBitCount))
            mask = period - 1
        }

        /// The LCG's odd increment `c` for a vCPU seed: `seed >> incrementShift | 1`.
        static func increment(seed: UInt32) -> UInt32 { seed >> incrementShift | 1 }
        static let incrementShift: UInt8 = 16
    }

    /// `do { [esi] = eax; esi += 4096 } while esi < edi` — exactly the C reference's loop.
    private func emitSequential(into asm: inout X86Assembler) {
        let loop = asm.makeLabel()
        asm.bind(loop)
        asm.store(.eax, to: .esi)
        asm.add(.esi, imm: UInt32(Self.pageSize))
        asm.cmp(.esi, .edi)
        asm.jb(loop)
    }

    /// `edx = 0; do { edx += [esi]; esi += 4096 } while esi < edi`.
    private func emitRead(into asm: inout X86Assembler) {
        let loop = asm.makeLabel()
        asm.xor(.edx, .edx)
        asm.bind(loop)
        asm.load(.ecx, from: .esi)
        asm.add(.edx, .ecx)
        asm.add(.esi, imm: UInt32(Self.pageSize))
        asm.cmp(.esi, .edi)
        asm.jb(loop)
    }

    /// Stores `eax` to page `index` (in `index`), clobbering `edx`.
    private func emitStore(toPage index: X86Assembler.Register32, into asm: inout X86Assembler) {
        asm.mov(.edx, index)
        asm.shl(.edx, by: UInt8(Self.pageSize.trailingZeroBitCount))
        asm.add(.edx, .esi)
        asm.store(.eax, to: .edx)
    }

    /// ebx = state, ebp = increment, ecx = iterations left; see ``RandomWalk``.
    private func emitRandom(into asm: inout X86Assembler) {
        let walk = RandomWalk(pages: pagesPerVcpu)
        let loop = asm.makeLabel(), skip = asm.makeLabel()
        asm.mov(.ebx, .ebp)
        asm.and(.ebx, imm: walk.mask)       // x = seed & mask
        asm.shr(.ebp, by: RandomWalk.incrementShift)
        asm.or(.ebp, imm: 1)                // c = seed >> 16 | 1
        asm.mov(.ecx, imm: walk.period)
        asm.bind(loop)
        asm.cmp(.ebx, imm: UInt32(pagesPerVcpu))
        asm.jae(skip)                       // cycle walking: states >= n are not pages
        emitStore(toPage: .ebx, into: &asm)
        asm.bind(skip)
        asm.imul(.ebx, .ebx, imm: Int32(bitPattern: Self.lcgMultiplier))
        asm.add(.ebx, .ebp)
        asm.and(.ebx, imm: walk.mask)       // x = (x * a + c) mod 2^k
        asm.dec(.ecx)
        asm.jne(loop)
    }

    /// `for ebx in 0..<step { for ecx in stride(from: ebx, to: n, by: step) { page[ecx] = eax } }`.
    private func emitStride(_ step: Int, into asm: inout X86Assembler) {
        let outer = asm.makeLabel(), inner = asm.makeLabel(), next = asm.makeLabel()
        asm.xor(.ebx, .ebx)
        asm.bind(outer)
        asm.mov(.ecx, .ebx)
        asm.bind(inner)
        asm.cmp(.ecx, imm: UInt32(pagesPerVcpu))
        asm.jae(next)
        emitStore(toPage: .ecx, into: &asm)
        asm.add(.ecx, imm: UInt32(step))
        asm.jmp(inner)
        asm.bind(next)
        asm.inc(.ebx)
        asm.cmp(.ebx, imm: UInt32(step))
        asm.jb(outer)
    }
}
