/// A tiny assembler for x86 guest programs, just big enough for the guest workloads: 32-bit
/// protected mode (flat segments, paging off), or 64-bit long mode (``GuestMode/long64``),
/// where the 64-bit forms of X86Assembler+Long.swift do the pointer arithmetic.
///
/// Instructions are appended in program order; jumps name a ``Label`` that may be bound
/// before or after the jump. ``assemble()`` lays the code out and resolves every jump,
/// choosing the short `rel8` form whenever the displacement fits (forward and backward
/// alike) and the `rel32` form otherwise.
///
/// Two-operand instructions follow Intel order: the first operand is the destination.
/// Register-register ALU forms use the `op r/m32, r32` encodings (`01`, `31`, `39`, `89`),
/// so `cmp(.esi, .edi)` is `39 fe`.
///
/// ```swift
/// var asm = X86Assembler()
/// let loop = asm.makeLabel()
/// asm.bind(loop)
/// asm.store(.eax, to: .esi)
/// asm.add(.esi, imm: 4096)
/// asm.cmp(.esi, .edi)
/// asm.jb(loop)
/// asm.hlt()
/// let code = try asm.assemble()   // 89 06 81 c6 00 10 00 00 39 fe 72 f4 f4
/// ```
public struct X86Assembler: Sendable {
    /// The eight 32-bit general-purpose registers, numbered as in ModRM/SIB fields.
    public enum Register32: UInt8, Sendable, CaseIterable {
        case eax = 0, ecx, edx, ebx, esp, ebp, esi, edi
    }

    /// A position in the code, created by ``makeLabel()`` and bound once with ``bind(_:)``.
    public struct Label: Hashable, Sendable, CustomStringConvertible {
        fileprivate let id: Int
        public var description: String { "L\(id)" }
    }

    /// Condition codes of the supported conditional jumps (the low nibble of `7x`/`0F 8x`).
    public enum Condition: UInt8, Sendable {
        /// Below (unsigned `<`): CF = 1.
        case below = 0x2
        /// Above or equal (unsigned `>=`): CF = 0.
        case aboveOrEqual = 0x3
        /// Equal: ZF = 1.
        case equal = 0x4
        /// Not equal: ZF = 0.
        case notEqual = 0x5
    }

    /// When `true`, ALU instructions with an immediate in `-128...127` use the sign-extended
    /// `83 /n ib` form. Off by default, so immediates are always encoded as `81 /n id`.
    public var prefersShortImmediates = false

    private enum Item: Sendable {
        case code([UInt8])
        case jump(Condition?, Label)
    }

    private var items: [Item] = []
    /// For each label id, the index into `items` it is bound before, or `nil` while unbound.
    private var bindings: [Int?] = []
    /// The first misuse seen while building; reported by `assemble()`.
    private var deferredError: X86AssemblerError?
    /// The mode the code runs in. In long mode `40`-`4F` are REX prefixes, so `inc`/`dec`
    /// use their `FF /0`, `FF /1` forms, and a 32-bit register as an address gets the `67`
    /// address-size prefix (the address is then truncated to 32 bits, as written).
    public let mode: GuestMode

    public init(prefersShortImmediates: Bool = false, mode: GuestMode = .protected32) {
        self.prefersShortImmediates = prefersShortImmediates
        self.mode = mode
    }

    // MARK: Labels

    /// Creates a new, unbound label.
    public mutating func makeLabel() -> Label {
        bindings.append(nil)
        return Label(id: bindings.count - 1)
    }

    /// Binds `label` to the current position. Binding a label twice, or a label made by a
    /// different assembler, makes ``assemble()`` throw.
    public mutating func bind(_ label: Label) {
        guard bindings.indices.contains(label.id) else { return record(.unknownLabel(label)) }
        guard bindings[label.id] == nil else { return record(.labelBoundTwice(label)) }
        bindings[label.id] = items.count
    }

    // MARK: Data movement

    /// `mov dst, imm32` (`B8+r id`).
    public mutating func mov(_ dst: Register32, imm: UInt32) {
        emit([0xB8 + dst.rawValue] + Self.littleEndian(imm))
    }

    /// `mov dst, src` (`89 /r`).
    public mutating func mov(_ dst: Register32, _ src: Register32) { emitRegisters(0x89, rm: dst, reg: src) }

    /// `mov [base], src` (`89 /r`): stores the 32-bit `src` at the address held in `base`.
    public mutating func store(_ src: Register32, to base: Register32) { emitIndirect(0x89, reg: src, base: base) }

    /// `mov dst, [base]` (`8B /r`): loads the 32-bit word at the address held in `base`.
    public mutating func load(_ dst: Register32, from base: Register32) { emitIndirect(0x8B, reg: dst, base: base) }

    /// `mov [base + displacement], src` (`89 /r` with disp8 or disp32).
    public mutating func store(_ src: Register32, to base: Register32, displacement: Int32) {
        emitIndirect(0x89, reg: src, base: base, displacement: displacement)
    }

    /// `mov dst, [base + displacement]` (`8B /r` with disp8 or disp32).
    public mutating func load(_ dst: Register32, from base: Register32, displacement: Int32) {
        emitIndirect(0x8B, reg: dst, base: base, displacement: displacement)
    }

    // MARK: Arithmetic and logic

    /// `add dst, imm32` (`81 /0 id`, or `83 /0 ib` with ``prefersShortImmediates``).
    public mutating func add(_ dst: Register32, imm: UInt32) { emitGroup1(extension: 0, dst, imm) }
    /// `or dst, imm32` (`81 /1 id`).
    public mutating func or(_ dst: Register32, imm: UInt32) { emitGroup1(extension: 1, dst, imm) }
    /// `and dst, imm32` (`81 /4 id`).
    public mutating func and(_ dst: Register32, imm: UInt32) { emitGroup1(extension: 4, dst, imm) }
    /// `sub dst, imm32` (`81 /5 id`).
    public mutating func sub(_ dst: Register32, imm: UInt32) { emitGroup1(extension: 5, dst, imm) }
    /// `cmp lhs, imm32` (`81 /7 id`): flags of `lhs - imm`.
    public mutating func cmp(_ lhs: Register32, imm: UInt32) { emitGroup1(extension: 7, lhs, imm) }

    /// `add dst, src` (`01 /r`).
    public mutating func add(_ dst: Register32, _ src: Register32) { emitRegisters(0x01, rm: dst, reg: src) }
    /// `xor dst, src` (`31 /r`).
    public mutating func sub(_ dst: Register32, _ src: Register32) { emitRegisters(0x29, rm: dst, reg: src) }
    /// `dst ^= src`
    public mutating func xor(_ dst: Register32, _ src: Register32) { emitRegisters(0x31, rm: dst, reg: src) }
    /// `cmp lhs, rhs` (`39 /r`, r/m = `lhs`): flags of `lhs - rhs`.
    public mutating func cmp(_ lhs: Register32, _ rhs: Register32) { emitRegisters(0x39, rm: lhs, reg: rhs) }

    /// `shl dst, count` (`C1 /4 ib`); `count` must be below 32.
    public mutating func shl(_ dst: Register32, by count: UInt8) { emitShift(extension: 4, dst, count) }
    /// `shr dst, count` (`C1 /5 ib`); `count` must be below 32.
    public mutating func shr(_ dst: Register32, by count: UInt8) { emitShift(extension: 5, dst, count) }

    /// `imul dst, src, imm32` (`69 /r id`): `dst = src * imm` modulo 2^32.
    public mutating func imul(_ dst: Register32, _ src: Register32, imm: Int32) {
        emit([0x69, Self.modRM(3, dst.rawValue, src.rawValue)] + Self.littleEndian(UInt32(bitPattern: imm)))
    }

    /// `inc reg` (`40+r`, the 32-bit-mode short form; `FF /0` in long mode).
    public mutating func inc(_ reg: Register32) {
        emit(mode == .long64 ? [0xFF, Self.modRM(3, 0, reg.rawValue)] : [0x40 + reg.rawValue])
    }
    /// `dec reg` (`48+r`, the 32-bit-mode short form; `FF /1` in long mode).
    public mutating func dec(_ reg: Register32) {
        emit(mode == .long64 ? [0xFF, Self.modRM(3, 1, reg.rawValue)] : [0x48 + reg.rawValue])
    }

    // MARK: Control flow

    /// `jmp label` (`EB cb` or `E9 cd`).
    public mutating func jmp(_ label: Label) { appendJump(nil, label) }
    /// Jumps to `label` if `condition` holds (`7x cb` or `0F 8x cd`).
    public mutating func jump(if condition: Condition, to label: Label) { appendJump(condition, label) }
    /// `jb label`: jump if below (unsigned).
    public mutating func jb(_ label: Label) { appendJump(.below, label) }
    /// `jae label`: jump if above or equal (unsigned).
    public mutating func jae(_ label: Label) { appendJump(.aboveOrEqual, label) }
    /// `je label`: jump if equal.
    public mutating func je(_ label: Label) { appendJump(.equal, label) }
    /// `jne label`: jump if not equal.
    public mutating func jne(_ label: Label) { appendJump(.notEqual, label) }

    // MARK: I/O and halting

    /// `out port, eax` (`E7 ib`).
    public mutating func out(port: UInt8) { emit([0xE7, port]) }
    /// `out dx, eax` (`EF`).
    public mutating func outDX() { emit([0xEF]) }
    /// `hlt` (`F4`).
    public mutating func hlt() { emit([0xF4]) }
    /// `vmcall` (`0F 01 C1`): the hypercall instruction on Intel (VMX).
    public mutating func vmcall() { emit([0x0F, 0x01, 0xC1]) }
    /// `vmmcall` (`0F 01 D9`): the hypercall instruction on AMD (SVM).
    public mutating func vmmcall() { emit([0x0F, 0x01, 0xD9]) }

    // MARK: Assembly

    /// Lays out the program and resolves every jump.
    ///
    /// Jumps start in their 2-byte `rel8` form; any whose displacement does not fit is widened
    /// to `rel32` and the layout recomputed until nothing changes (widening only moves code
    /// apart, so this terminates).
    /// - Throws: ``X86AssemblerError`` for a label bound twice, a foreign label, or a jump to
    ///   a label that was never bound.
    public func assemble() throws -> [UInt8] {
        if let deferredError { throw deferredError }
        for case .jump(_, let label) in items {
            guard bindings.indices.contains(label.id) else { throw X86AssemblerError.unknownLabel(label) }
            guard bindings[label.id] != nil else { throw X86AssemblerError.unboundLabel(label) }
        }

        var isLong = [Bool](repeating: false, count: items.count)
        var offsets: [Int]
        while true {
            offsets = layout(isLong)
            var widened = false
            for (index, item) in items.enumerated() {
                guard case .jump(_, let label) = item, !isLong[index] else { continue }
                if Int8(exactly: displacement(from: index, to: label, offsets)) == nil {
                    isLong[index] = true
                    widened = true
                }
            }
            if !widened { break }
        }

        var code: [UInt8] = []
        code.reserveCapacity(offsets.last ?? 0)
        for (index, item) in items.enumerated() {
            switch item {
            case .code(let bytes):
                code += bytes
            case .jump(let condition, let label):
                let rel = displacement(from: index, to: label, offsets)
                switch (condition, isLong[index]) {
                case (nil, false): code += [0xEB, UInt8(bitPattern: Int8(rel))]
                case (nil, true): code += [0xE9] + Self.littleEndian(UInt32(bitPattern: Int32(rel)))
                case (let c?, false): code += [0x70 | c.rawValue, UInt8(bitPattern: Int8(rel))]
                case (let c?, true): code += [0x0F, 0x80 | c.rawValue] + Self.littleEndian(UInt32(bitPattern: Int32(rel)))
                }
            }
        }
        return code
    }

    // MARK: Private helpers

    mutating func record(_ error: X86AssemblerError) {
        if deferredError == nil { deferredError = error }
    }

    mutating func emit(_ bytes: [UInt8]) { items.append(.code(bytes)) }

    private mutating func appendJump(_ condition: Condition?, _ label: Label) {
        items.append(.jump(condition, label))
    }

    /// Start offset of every item, plus the total size as the last element.
    private func layout(_ isLong: [Bool]) -> [Int] {
        var offsets = [0]
        offsets.reserveCapacity(items.count + 1)
        for (index, item) in items.enumerated() {
            let size: Int
            switch item {
            case .code(let bytes): size = bytes.count
            case .jump(let condition, _): size = isLong[index] ? (condition == nil ? 5 : 6) : 2
            }
            offsets.append(offsets[index] + size)
        }
        return offsets
    }

    /// The jump's displacement: target minus the address just past the jump instruction.
    private func displacement(from index: Int, to label: Label, _ offsets: [Int]) -> Int {
        offsets[bindings[label.id]!] - offsets[index + 1]
    }

    static func modRM(_ mod: UInt8, _ reg: UInt8, _ rm: UInt8) -> UInt8 { mod << 6 | reg << 3 | rm }

    static func littleEndian(_ value: UInt32) -> [UInt8] {
        (0..<4).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
    }

    private mutating func emitRegisters(_ opcode: UInt8, rm: Register32, reg: Register32) {
        emit([opcode, Self.modRM(3, reg.rawValue, rm.rawValue)])
    }

    /// `67` in long mode, before a 32-bit register used as an address; nothing in protected mode.
    private var addressSizePrefix: [UInt8] { mode == .long64 ? [0x67] : [] }

    /// `opcode` with a `[base]` memory operand (`67` first in long mode: a 32-bit address).
    private mutating func emitIndirect(_ opcode: UInt8, reg: Register32, base: Register32) {
        emit(addressSizePrefix + Self.indirect(opcode, reg: reg.rawValue, base: base.rawValue))
    }

    /// `opcode` with a `[base]` memory operand, the address size the mode's default. `esp`
    /// (`rsp`) as a base needs a SIB byte (`24`), and `ebp` with mod 00 would mean `disp32`,
    /// so it is encoded as `[ebp + 0]` (mod 01, disp8 0).
    static func indirect(_ opcode: UInt8, reg: UInt8, base: UInt8) -> [UInt8] {
        switch base {
        case 4: [opcode, modRM(0, reg, 4), 0x24]
        case 5: [opcode, modRM(1, reg, 5), 0x00]
        default: [opcode, modRM(0, reg, base)]
        }
    }

    /// `opcode` with a `[base + disp]` operand: mod 01 (disp8) when it fits, else mod 10
    /// (disp32); `esp` as a base needs the SIB byte `24`.
    private mutating func emitIndirect(_ opcode: UInt8, reg: Register32, base: Register32, displacement: Int32) {
        let short = Int8(exactly: displacement)
        let mod: UInt8 = short != nil ? 1 : 2
        var bytes = addressSizePrefix + [opcode, Self.modRM(mod, reg.rawValue, base == .esp ? 4 : base.rawValue)]
        if base == .esp { bytes.append(0x24) }
        if let short { bytes.append(UInt8(bitPattern: short)) } else { bytes += Self.littleEndian(UInt32(bitPattern: displacement)) }
        emit(bytes)
    }

    private mutating func emitGroup1(extension ext: UInt8, _ dst: Register32, _ imm: UInt32) {
        let modRM = Self.modRM(3, ext, dst.rawValue)
        if prefersShortImmediates, let short = Int8(exactly: Int32(bitPattern: imm)) {
            emit([0x83, modRM, UInt8(bitPattern: short)])
        } else {
            emit([0x81, modRM] + Self.littleEndian(imm))
        }
    }

    private mutating func emitShift(extension ext: UInt8, _ dst: Register32, _ count: UInt8) {
        precondition(count < 32, "shift count \(count) out of range 0..<32")
        emit([0xC1, Self.modRM(3, ext, dst.rawValue), count])
    }
}

/// Misuses of ``X86Assembler`` reported by ``X86Assembler/assemble()``.
public enum X86AssemblerError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A jump targets a label that was never bound.
    case unboundLabel(X86Assembler.Label)
    /// ``X86Assembler/bind(_:)`` was called twice for the same label.
    case labelBoundTwice(X86Assembler.Label)
    /// The label was not made by this assembler's ``X86Assembler/makeLabel()``.
    case unknownLabel(X86Assembler.Label)
    /// A 64-bit instruction (named) in an assembler for 32-bit protected mode.
    case needsLongMode(String)

    public var description: String {
        switch self {
        case .unboundLabel(let label): "x86 assembler: jump to label \(label), which was never bound"
        case .labelBoundTwice(let label): "x86 assembler: label \(label) is bound more than once"
        case .unknownLabel(let label): "x86 assembler: label \(label) was not made by this assembler"
        case .needsLongMode(let instruction): "x86 assembler: \(instruction) is a 64-bit instruction, and this code is for 32-bit protected mode"
        }
    }
}
