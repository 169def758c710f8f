/// The kinds of ``RunningWorkload``.
public enum RunningWorkloadKind: String, CaseIterable, Sendable {
    /// Rewrites two words of every working-set page on each pass: a steady, tunable dirty rate.
    case dirtier
    /// Checks every page still holds what the previous pass wrote, then overwrites it: any page
    /// lost or corrupted by a migration is reported by the guest itself.
    case selfcheck
    /// Checks every page on every pass as selfcheck does, but after pass 1 (which fills the
    /// whole chunk) rewrites only the working set; the other pages keep pass 1's tag and are
    /// only read: a guest that reads all its memory and writes a known part of it.
    case readmostly
}

/// The order a dirtier visits its working set in.
public enum AccessOrder: String, CaseIterable, Sendable {
    /// Page after page, from the chunk's start.
    case sequential
    /// A fixed permutation of the chunk's N pages: page `(i x stride) mod N` at step `i`, with
    /// an odd stride near `0.618 N`, so consecutive touches land far apart (no read-ahead or
    /// fault-around helps). A pass takes the first working-set-many steps, so the working set
    /// is spread over the whole chunk. The chunk must be a power of two pages.
    case scattered
}

/// Reasons a ``RunningWorkload`` cannot be built.
public enum RunningWorkloadError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidPageCount(Int)
    case tooManyPages(Int, limit: Int)
    case invalidWorkingSet(Int, pagesPerVcpu: Int)
    case selfcheckNeedsWholeChunk(workingSetPages: Int, pagesPerVcpu: Int)
    case scatteredNeedsPowerOfTwo(pagesPerVcpu: Int)

    public var description: String {
        switch self {
        case .invalidPageCount(let count):
            "running workload: pages per vCPU must be at least 1 (got \(count))"
        case .tooManyPages(let count, let limit):
            "running workload: \(count) pages per vCPU exceeds the limit of \(limit) (a chunk must fit the guest's address range)"
        case .invalidWorkingSet(let pages, let chunk):
            "running workload: working set must be 1...\(chunk) pages, the size of the chunk (got \(pages))"
        case .selfcheckNeedsWholeChunk(let pages, let chunk):
            "running workload: selfcheck checks every page of the chunk, so its working set must be all \(chunk) pages (got \(pages))"
        case .scatteredNeedsPowerOfTwo(let pages):
            "running workload: a scattered order needs a dirtier whose chunk is a power of two pages, at most 2^19 (got \(pages) per vCPU)"
        }
    }
}

/// The general registers of one vCPU running a ``RunningWorkload``, as the VMM copies them
/// into `kvm_regs` at start (zero-extended) and reads back from `KVM_GET_REGS`.
public struct RunningWorkloadRegisters: Equatable, Sendable {
    public var eax, ecx, edx, ebx, esp, ebp, esi, edi: UInt32

    public init(eax: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0, ebx: UInt32 = 0,
                esp: UInt32 = 0, ebp: UInt32 = 0, esi: UInt32 = 0, edi: UInt32 = 0) {
        (self.eax, self.ecx, self.edx, self.ebx) = (eax, ecx, edx, ebx)
        (self.esp, self.ebp, self.esi, self.edi) = (esp, ebp, esi, edi)
    }

    /// The register numbered as in ModRM fields.
    public subscript(register: X86Assembler.Register32) -> UInt32 {
        get {
            switch register {
            case .eax: eax
            case .ecx: ecx
            case .edx: edx
            case .ebx: ebx
            case .esp: esp
            case .ebp: ebp
            case .esi: esi
            case .edi: edi
            }
        }
        set {
            switch register {
            case .eax: eax = newValue
            case .ecx: ecx = newValue
            case .edx: edx = newValue
            case .ebx: ebx = newValue
            case .esp: esp = newValue
            case .ebp: ebp = newValue
            case .esi: esi = newValue
            case .edi: edi = newValue
            }
        }
    }
}

/// A guest program that never halts, for live migration: it keeps writing (and, for
/// ``RunningWorkloadKind/selfcheck`` and ``RunningWorkloadKind/readmostly``, verifying) its
/// vCPU's chunk until the VMM stops it.
///
/// The VMM loads ``program()`` at ``GuestWorkload/codeAddress`` (one code page shared by every
/// vCPU) and starts each vCPU there in ``mode``: 32-bit protected mode (flat segments, paging
/// off) or long mode (identity-mapped, ``LongModePageTables``), `rflags = 0x2` (interrupts stay
/// disabled, and no stack is used), with every general register from
/// ``initialRegisters(vcpu:chunkBase:)`` (``startRegisters(vcpu:chunkBase:)`` in either mode).
/// The chunk must be zero-filled at start.
///
/// In long mode the program is the same, with the pointer registers (`esi`, `edi`, `edx` and
/// `eax` while it holds an address) used at their full 64 bits (`rsi`, ...), so the chunk may
/// lie anywhere below the mode's RAM limit; tags, passes and offsets stay 32-bit.
///
/// All loop state lives in the general registers, `eip`, `rflags` and guest memory, so the
/// vCPU may be paused after any instruction, its registers and memory copied to another
/// machine, and resumed there. Registers while running:
///
/// | register | meaning |
/// | --- | --- |
/// | `esi`, `edi` | the chunk `[esi, edi)` (constant) |
/// | `ebp` | the current pass `k`, counting from 1 |
/// | `ebx` | ``tag(vcpu:pass:)`` of pass `k`: the value this pass writes |
/// | `ecx` | dirtier: ``dirtierSecondWordOffset(pass:)`` of pass `k`; selfcheck: the tag of pass `k - 1`, which every page must still hold (readmostly: every working-set page) |
/// | `edx` | the cursor: start of the next page to visit (selfcheck, readmostly: or the last word of the page being checked) |
/// | `eax` | scratch (loaded value, spin counter, `out` value) |
/// | `esp` | dirtier, selfcheck: unused (0); readmostly: ``readMostlyColdValue(vcpu:)``, set by the program's first instruction |
///
/// Port exits (`out imm8, eax`, so the 4 bytes of I/O data equal `eax`):
/// - ``progressPort`` after every full pass: `eax` = `ebp` = the pass just completed
///   (1, 2, …, wrapping at 2^32). For selfcheck, every page now holds `ebx` in both words.
/// - ``mismatchPort`` (selfcheck, readmostly): `eax` = the wrong value read, `edx` (`rdx` in long
///   mode) = the guest-physical address of that word, `ecx` = the value expected (readmostly's
///   pages outside the working set: `esp`), `ebp` = the pass. The VMM reads `edx`
///   (and `ecx`, `ebp` if it wants them) with `KVM_GET_REGS` during the exit. The guest then
///   goes on (overwriting the word) when resumed; whether to stop is the VMM's decision.
public struct RunningWorkload: Sendable {
    public let kind: RunningWorkloadKind
    public let pagesPerVcpu: Int
    /// Dirtier: pages `0..<workingSetPages` of the chunk are rewritten, the rest never touched.
    /// Readmostly: those are rewritten after pass 1, the rest only read. Selfcheck: always ``pagesPerVcpu``.
    public let workingSetPages: Int
    /// Busy-loop iterations (`dec eax; jne`) after each page, 0 for none: sets the dirty rate.
    public let spinIterations: UInt32
    /// The CPU mode the program is assembled for.
    public let mode: GuestMode
    /// Dirtier: the order of the pages within a pass (selfcheck is always sequential).
    public let order: AccessOrder

    /// Port written after each full pass, with `eax` = the pass number.
    public static let progressPort: UInt8 = 0x10
    /// Port selfcheck writes on a wrong word, with `eax` = the value and `edx` = its address.
    public static let mismatchPort: UInt8 = 0x11
    /// Offset in its page of the second word selfcheck checks (the page's last word).
    public static let lastWordOffset = GuestWorkload.pageSize - 4
    /// Largest ``pagesPerVcpu``: a chunk from `0x2000`, just above the code page, to
    /// `0xFFFF_F000`, so that its exclusive end still fits in a 32-bit register.
    public static let maxPagesPerVcpu = (1 << 20) - 3
    /// Largest ``pagesPerVcpu`` in long mode: a chunk as large as that mode's RAM.
    public static let maxLongModePagesPerVcpu = Int(GuestMode.long64.maxRAM) / GuestWorkload.pageSize

    /// Largest ``pagesPerVcpu`` in `mode`.
    public static func maxPagesPerVcpu(_ mode: GuestMode) -> Int {
        mode == .long64 ? maxLongModePagesPerVcpu : maxPagesPerVcpu
    }

    /// Tags cycle through `1...tagCycle` in their low 24 bits, so they are never 0 after pass 0.
    static let tagCycle: UInt32 = 0xFF_FFFF

    /// - Parameter workingSetPages: defaults to the whole chunk; selfcheck accepts nothing else.
    /// - Throws: ``RunningWorkloadError`` if `pagesPerVcpu` is not in `1...maxPagesPerVcpu` or
    ///   the working set is not in `1...pagesPerVcpu` (or, for selfcheck, not all of it).
    public init(kind: RunningWorkloadKind, pagesPerVcpu: Int, workingSetPages: Int? = nil, spinIterations: UInt32 = 0,
                mode: GuestMode = .protected32, order: AccessOrder = .sequential) throws {
        guard pagesPerVcpu >= 1 else { throw RunningWorkloadError.invalidPageCount(pagesPerVcpu) }
        guard pagesPerVcpu <= Self.maxPagesPerVcpu(mode) else {
            throw RunningWorkloadError.tooManyPages(pagesPerVcpu, limit: Self.maxPagesPerVcpu(mode))
        }
        let workingSet = workingSetPages ?? pagesPerVcpu
        guard (1...pagesPerVcpu).contains(workingSet) else {
            throw RunningWorkloadError.invalidWorkingSet(workingSet, pagesPerVcpu: pagesPerVcpu)
        }
        guard kind != .selfcheck || workingSet == pagesPerVcpu else {
            throw RunningWorkloadError.selfcheckNeedsWholeChunk(workingSetPages: workingSet, pagesPerVcpu: pagesPerVcpu)
        }
        if order == .scattered {
            guard kind == .dirtier, pagesPerVcpu & (pagesPerVcpu - 1) == 0, pagesPerVcpu <= 1 << 19 else {
                throw RunningWorkloadError.scatteredNeedsPowerOfTwo(pagesPerVcpu: pagesPerVcpu)
            }
        }
        self.order = order
        self.kind = kind
        self.pagesPerVcpu = pagesPerVcpu
        self.workingSetPages = workingSet
        self.spinIterations = spinIterations
        self.mode = mode
    }

    /// Bytes of one vCPU's chunk (`edi - esi`).
    public var chunkSize: UInt64 { UInt64(pagesPerVcpu) * UInt64(GuestWorkload.pageSize) }

    /// The value vCPU `id` writes on pass `pass`: `0` for pass 0 (a zeroed chunk), else
    /// `(id << 24) | ((pass - 1) % 0xFFFFFF + 1)`, which is never 0. Only the low 8 bits of
    /// `id` are used. (Past pass 2^32 the guest's `ebp` wraps to 0 while its tags go on.)
    public static func tag(vcpu id: Int, pass: UInt32) -> UInt32 {
        guard pass > 0 else { return 0 }
        return UInt32(truncatingIfNeeded: id) << 24 | ((pass - 1) % tagCycle + 1)
    }

    /// Where in each page the dirtier writes its second word on pass `pass`:
    /// `4 + 64 * (pass % 64)`, a different cache line on each of 64 successive passes.
    public static func dirtierSecondWordOffset(pass: UInt32) -> Int { 4 + Int(pass << 6 & 0xFC0) }

    /// The registers vCPU `id` starts with when its chunk starts at guest-physical `chunkBase`
    /// (page aligned, with `chunkBase + chunkSize < 2^32`): pass 1, cursor at page 0.
    public func initialRegisters(vcpu id: Int, chunkBase: UInt64) -> RunningWorkloadRegisters {
        precondition(chunkBase % UInt64(GuestWorkload.pageSize) == 0 && chunkBase < 1 << 32 && chunkBase + chunkSize < 1 << 32,
                     "chunk at \(chunkBase) must be page aligned and end below 4 GiB")
        let base = UInt32(chunkBase)
        return RunningWorkloadRegisters(
            ecx: kind == .dirtier ? UInt32(Self.dirtierSecondWordOffset(pass: 1)) : Self.tag(vcpu: id, pass: 0),
            edx: base, ebx: Self.tag(vcpu: id, pass: 1), esp: order == .scattered ? UInt32(workingSetPages) : 0, ebp: 1,
            esi: base, edi: base + UInt32(chunkSize))
    }

    /// What selfcheck page `page` must hold in its first and last word when vCPU `id` is paused
    /// with `registers`: `ebx` (this pass's tag) for pages the cursor `edx` has passed, `ecx`
    /// (the previous pass's tag) for the others. `nil` for the page being checked (`edx` at its
    /// last word, where one word may already be rewritten), for a page outside the chunk, for a
    /// dirtier, and for registers that are not a selfcheck state of vCPU `id` for this chunk size.
    public func expectedSelfcheckWords(vcpu id: Int, registers r: RunningWorkloadRegisters, page: Int) -> (first: UInt32, last: UInt32)? {
        guard kind == .selfcheck, (0..<pagesPerVcpu).contains(page),
              UInt64(r.edi &- r.esi) == chunkSize, r.edx &- r.esi <= r.edi &- r.esi else { return nil }
        let (current, within) = Int(r.edx &- r.esi).quotientAndRemainder(dividingBy: GuestWorkload.pageSize)
        guard within == 0 || within == Self.lastWordOffset, !(page == current && within != 0) else { return nil }
        let expected = page < current ? r.ebx : r.ecx
        let isTag = expected >> 24 == UInt32(truncatingIfNeeded: id) & 0xFF && expected & Self.tagCycle != 0
        guard isTag || (expected == 0 && page >= current) else { return nil }
        return (expected, expected)
    }

    /// Machine code for ``GuestWorkload/codeAddress`` (position independent, well under a page).
    public func program() throws -> [UInt8] {
        var asm = X86Assembler(mode: mode)
        switch kind {
        case .dirtier where order == .scattered: emitScatteredDirtier(into: &asm)
        case .dirtier: emitDirtier(into: &asm)
        case .selfcheck: emitSelfcheck(into: &asm)
        case .readmostly: emitReadMostly(into: &asm)
        }
        return try asm.assemble()
    }

    // MARK: Code generation

    /// `for edx in pages { [edx] = ebx; [edx + ecx] = ebx; spin }`, then the next pass.
    private func emitDirtier(into asm: inout X86Assembler) {
        let page = asm.makeLabel()
        asm.bind(page)
        emitDirtierPageWrites(into: &asm)
        asm.addPointer(.edx, imm: Int32(GuestWorkload.pageSize))
        emitSpin(into: &asm)
        emitWorkingSetEnd(into: &asm)
        asm.cmpPointer(.edx, .eax)
        asm.jb(page)                                // while edx < end of the working set
        emitDirtierPassEnd(into: &asm)
        asm.movPointer(.edx, .esi)
        asm.jmp(page)
    }

    /// A dirtier's writes to the page at `edx`: `ebx` to its first word and to the word at this
    /// pass's offset `ecx`.
    func emitDirtierPageWrites(into asm: inout X86Assembler) {
        asm.storePointed(.ebx, to: .edx)            // first word
        asm.movPointer(.eax, .edx)
        asm.addPointer(.eax, .ecx)
        asm.storePointed(.ebx, to: .eax)            // second word, at this pass's offset
    }

    /// Bytes of the working set from the start of the chunk.
    var workingSetBytes: UInt64 { UInt64(workingSetPages) * UInt64(GuestWorkload.pageSize) }

    /// `eax` = the end of this vCPU's working set (`esi` + its size).
    func emitWorkingSetEnd(into asm: inout X86Assembler) {
        if mode == .long64 {                        // may exceed a sign-extended imm32
            asm.mov(.rax, imm: workingSetBytes)
            asm.add(.rax, .rsi)
        } else {
            asm.mov(.eax, .esi)
            asm.add(.eax, imm: UInt32(workingSetBytes))
        }
    }

    /// The end of a dirtier's pass: counted, then the next pass's tag in `ebx` and its
    /// second-word offset in `ecx`.
    private func emitDirtierPassEnd(into asm: inout X86Assembler) {
        emitPassEnd(into: &asm)
        asm.inc(.ebp)
        emitNextTag(into: &asm)
        asm.mov(.ebx, .eax)
        asm.mov(.ecx, .ebp)
        asm.shl(.ecx, by: 6)
        asm.and(.ecx, imm: 0xFC0)
        asm.add(.ecx, imm: 4)                       // ecx = dirtierSecondWordOffset(ebp)
    }

    /// For each page: check both words against `ecx`, write `ebx` to both, spin; then the next
    /// pass. `edx` is either at a page start (page untouched) or at the page's last word (being
    /// checked), which is what ``expectedSelfcheckWords(vcpu:registers:page:)`` relies on.
    private func emitSelfcheck(into asm: inout X86Assembler) {
        let page = asm.makeLabel(), firstOK = asm.makeLabel(), lastOK = asm.makeLabel()
        let lastWord = Int32(Self.lastWordOffset)
        asm.bind(page)
        asm.loadPointed(.eax, from: .edx)
        asm.cmp(.eax, .ecx)
        asm.je(firstOK)
        asm.out(port: Self.mismatchPort)            // eax = bad value, edx = its address
        asm.bind(firstOK)
        asm.addPointer(.edx, imm: lastWord)
        asm.loadPointed(.eax, from: .edx)
        asm.cmp(.eax, .ecx)
        asm.je(lastOK)
        asm.out(port: Self.mismatchPort)
        asm.bind(lastOK)
        asm.storePointed(.ebx, to: .edx)            // last word
        asm.movPointer(.eax, .edx)
        asm.subPointer(.eax, imm: lastWord)
        asm.storePointed(.ebx, to: .eax)            // first word
        asm.addPointer(.edx, imm: 4)                // next page: this one is done
        emitSpin(into: &asm)
        asm.cmpPointer(.edx, .edi)
        asm.jb(page)
        emitPassEnd(into: &asm)
        emitNextTag(into: &asm)                     // edx = edi, so ecx is unused here
        // The order keeps every page's expected value in ebx (before edx) or ecx (from edx on).
        asm.mov(.ecx, .ebx)                         // expected = tag(k)
        asm.movPointer(.edx, .esi)                  // rewind: every page now "after" the cursor
        asm.mov(.ebx, .eax)                         // write tag(k + 1)
        asm.inc(.ebp)
        asm.jmp(page)
    }

    /// The step between consecutive pages of a scattered pass: odd, so `i x stride mod N`
    /// visits every page of the power-of-two chunk once in N steps.
    public var scatterStride: Int { pagesPerVcpu <= 2 ? 1 : Int(Double(pagesPerVcpu) * 0.6180339887) | 1 }

    /// The page step `i` of a scattered pass visits (the order ``program()`` walks).
    public func scatteredPage(step i: Int) -> Int { (i &* scatterStride) & (pagesPerVcpu - 1) }

    /// Like the dirtier, but the cursor moves through the chunk by ``scatterStride`` pages
    /// (modulo its size) and `esp` counts the steps left in the pass; a pass starts again at
    /// the chunk's start.
    private func emitScatteredDirtier(into asm: inout X86Assembler) {
        let page = asm.makeLabel()
        asm.bind(page)
        emitDirtierPageWrites(into: &asm)
        asm.mov(.eax, .edx)                         // offset in the chunk (it fits 32 bits)
        asm.sub(.eax, .esi)
        asm.add(.eax, imm: UInt32(scatterStride * GuestWorkload.pageSize))
        asm.and(.eax, imm: UInt32(pagesPerVcpu * GuestWorkload.pageSize - 1))
        asm.movPointer(.edx, .esi)
        asm.addPointer(.edx, .eax)                  // the next page of the permutation
        emitSpin(into: &asm)
        asm.dec(.esp)
        asm.jne(page)
        emitDirtierPassEnd(into: &asm)
        asm.mov(.esp, imm: UInt32(workingSetPages))
        asm.movPointer(.edx, .esi)
        asm.jmp(page)
    }

    /// `eax = spinIterations; do { eax -= 1 } while eax != 0`, or nothing for 0 iterations.
    func emitSpin(into asm: inout X86Assembler) {
        guard spinIterations > 0 else { return }
        let spin = asm.makeLabel()
        asm.mov(.eax, imm: spinIterations)
        asm.bind(spin)
        asm.dec(.eax)
        asm.jne(spin)
    }

    /// `out progressPort` with `eax` = the pass just completed.
    func emitPassEnd(into asm: inout X86Assembler) {
        asm.mov(.eax, .ebp)
        asm.out(port: Self.progressPort)
    }

    /// `eax` = the tag after `ebx`: `ebx + 1`, wrapping the low 24 bits from `tagCycle` back to
    /// 1 (never 0) without touching the vCPU id. Clobbers `ecx`.
    func emitNextTag(into asm: inout X86Assembler) {
        let done = asm.makeLabel()
        asm.mov(.eax, .ebx)
        asm.inc(.eax)
        asm.mov(.ecx, .eax)
        asm.shl(.ecx, by: 8)                        // ZF: the low 24 bits overflowed
        asm.jne(done)
        asm.sub(.eax, imm: Self.tagCycle)
        asm.bind(done)
    }
}
