/// The 64-bit instruction forms long-mode guest programs use for addresses: a `REX.W` (`48`)
/// prefix widens the operation to 64 bits, so an address above 4 GiB is never truncated.
/// Only the eight legacy registers exist here (no `r8`-`r15`, so `REX.R`/`REX.B` stay clear).
/// In a protected-mode assembler each of them is recorded as a misuse and makes
/// ``X86Assembler/assemble()`` throw ``X86AssemblerError/needsLongMode(_:)``.
///
/// 32-bit operations keep their encodings in long mode, and writing a 32-bit register
/// zero-extends it into the 64-bit one: `mov ecx, ebp` leaves `rcx < 2^32`.
extension X86Assembler {
    /// The eight legacy 64-bit registers, numbered as in ModRM fields (as ``Register32``).
    public enum Register64: UInt8, Sendable, CaseIterable {
        case rax = 0, rcx, rdx, rbx, rsp, rbp, rsi, rdi
    }

    static let rexW: UInt8 = 0x48

    /// `mov dst, src` (`REX.W 89 /r`).
    public mutating func mov(_ dst: Register64, _ src: Register64) { emitWide("mov", 0x89, rm: dst, reg: src) }
    /// `add dst, src` (`REX.W 01 /r`).
    public mutating func add(_ dst: Register64, _ src: Register64) { emitWide("add", 0x01, rm: dst, reg: src) }
    /// `cmp lhs, rhs` (`REX.W 39 /r`, r/m = `lhs`): flags of `lhs - rhs`, unsigned over 64 bits.
    public mutating func cmp(_ lhs: Register64, _ rhs: Register64) { emitWide("cmp", 0x39, rm: lhs, reg: rhs) }

    /// `mov dst, imm64` (`REX.W B8+r io`, "movabs").
    public mutating func mov(_ dst: Register64, imm: UInt64) {
        guard requireLongMode("mov \(dst), imm64") else { return }
        emit([Self.rexW, 0xB8 + dst.rawValue] + (0..<8).map { UInt8(truncatingIfNeeded: imm >> (8 * $0)) })
    }

    /// `add dst, imm32` (`REX.W 81 /0 id`, the immediate sign-extended to 64 bits; `83 /0 ib`
    /// with ``prefersShortImmediates``).
    public mutating func add(_ dst: Register64, imm: Int32) { emitWideGroup1("add", extension: 0, dst, imm) }
    /// `sub dst, imm32` (`REX.W 81 /5 id`, sign-extended).
    public mutating func sub(_ dst: Register64, imm: Int32) { emitWideGroup1("sub", extension: 5, dst, imm) }

    /// `mov [base], src` (`89 /r`): the 32-bit `src` at the 64-bit address in `base` (long
    /// mode's default address size: no prefix).
    public mutating func store(_ src: Register32, to base: Register64) {
        guard requireLongMode("mov [\(base)], \(src)") else { return }
        emit(Self.indirect(0x89, reg: src.rawValue, base: base.rawValue))
    }

    /// `mov dst, [base]` (`8B /r`): the 32-bit word at the 64-bit address in `base`.
    public mutating func load(_ dst: Register32, from base: Register64) {
        guard requireLongMode("mov \(dst), [\(base)]") else { return }
        emit(Self.indirect(0x8B, reg: dst.rawValue, base: base.rawValue))
    }

    // MARK: Private helpers

    /// True in long mode; else records the misuse.
    private mutating func requireLongMode(_ instruction: String) -> Bool {
        if mode == .long64 { return true }
        record(.needsLongMode(instruction))
        return false
    }

    private mutating func emitWide(_ name: String, _ opcode: UInt8, rm: Register64, reg: Register64) {
        guard requireLongMode("\(name) \(rm), \(reg)") else { return }
        emit([Self.rexW, opcode, Self.modRM(3, reg.rawValue, rm.rawValue)])
    }

    private mutating func emitWideGroup1(_ name: String, extension ext: UInt8, _ dst: Register64, _ imm: Int32) {
        guard requireLongMode("\(name) \(dst), imm32") else { return }
        let modRM = Self.modRM(3, ext, dst.rawValue)
        if prefersShortImmediates, let short = Int8(exactly: imm) {
            emit([Self.rexW, 0x83, modRM, UInt8(bitPattern: short)])
        } else {
            emit([Self.rexW, 0x81, modRM] + Self.littleEndian(UInt32(bitPattern: imm)))
        }
    }
}

/// Pointer-sized operations: 32-bit in protected mode, 64-bit in long mode, so one guest
/// program generator serves both modes. In protected mode each emits exactly the 32-bit form
/// (`movPointer(.edx, .esi)` is `89 f2` there and `48 89 f2` in long mode).
extension X86Assembler {
    /// `mov dst, src` at pointer width.
    public mutating func movPointer(_ dst: Register32, _ src: Register32) {
        if mode == .long64 { mov(Register64(dst), Register64(src)) } else { mov(dst, src) }
    }
    /// `add dst, src` at pointer width.
    public mutating func addPointer(_ dst: Register32, _ src: Register32) {
        if mode == .long64 { add(Register64(dst), Register64(src)) } else { add(dst, src) }
    }
    /// `cmp lhs, rhs` at pointer width.
    public mutating func cmpPointer(_ lhs: Register32, _ rhs: Register32) {
        if mode == .long64 { cmp(Register64(lhs), Register64(rhs)) } else { cmp(lhs, rhs) }
    }
    /// `add dst, imm` at pointer width (sign-extended in long mode).
    public mutating func addPointer(_ dst: Register32, imm: Int32) {
        if mode == .long64 { add(Register64(dst), imm: imm) } else { add(dst, imm: UInt32(bitPattern: imm)) }
    }
    /// `sub dst, imm` at pointer width (sign-extended in long mode).
    public mutating func subPointer(_ dst: Register32, imm: Int32) {
        if mode == .long64 { sub(Register64(dst), imm: imm) } else { sub(dst, imm: UInt32(bitPattern: imm)) }
    }
    /// `mov [base], src`: a 32-bit store through a pointer-width address.
    public mutating func storePointed(_ src: Register32, to base: Register32) {
        if mode == .long64 { store(src, to: Register64(base)) } else { store(src, to: base) }
    }
    /// `mov dst, [base]`: a 32-bit load through a pointer-width address.
    public mutating func loadPointed(_ dst: Register32, from base: Register32) {
        if mode == .long64 { load(dst, from: Register64(base)) } else { load(dst, from: base) }
    }
}

extension X86Assembler.Register64 {
    /// The 64-bit register whose low half is `register`.
    public init(_ register: X86Assembler.Register32) { self.init(rawValue: register.rawValue)! }
}
