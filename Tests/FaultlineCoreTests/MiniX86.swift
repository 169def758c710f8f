@testable import FaultlineCore

// MARK: - A tiny x86 interpreter

/// Executes exactly the 32-bit instruction forms `X86Assembler` emits, against a code region
/// and a flat, byte-addressed data region. Every data access is recorded; anything else
/// (unknown opcode, access outside the data region, running off the code) is a fault, so a
/// wrong program fails loudly instead of doing something plausible.
///
/// Like a vCPU under a VMM, it can be paused after any instruction (``resume(maxSteps:stoppingAtOut:)``
/// stops after a step budget or an `out`) and its architectural state — registers, `eip`, flags
/// and data memory — copied into another interpreter (``state``) to continue there.
struct MiniX86 {
    enum Fault: Error, Equatable {
        case undecodable(opcode: UInt8, at: UInt32)
        case unmapped(address: UInt32)
        case stepLimitExceeded
    }

    struct Access: Equatable {
        let address: UInt32
        let isWrite: Bool
        let value: UInt32
    }

    /// Why ``resume(maxSteps:stoppingAtOut:)`` returned.
    enum Stop: Equatable {
        /// The last instruction was `hlt`.
        case halt
        /// The last instruction was an `out` (`port`, `eax`), like a `KVM_EXIT_IO`.
        case out(port: UInt16, value: UInt32)
        /// The last instruction was `vmcall` or `vmmcall` (`0F 01 C1` / `0F 01 D9`), like a
        /// `KVM_EXIT_HYPERCALL`; `eip` is past it, as after KVM skips it.
        case hypercall
        /// The step budget ran out.
        case stepLimit
    }

    /// Everything a migration copies: general registers, `eip`, the flags the interpreter
    /// models, and data memory. The code is not part of it: both sides load the same program.
    struct State: Equatable {
        var registers: [UInt32]
        var eip: UInt32
        var carry: Bool
        var zero: Bool
        fileprivate var memory: [UInt32: UInt8]
    }

    private enum Operand { case register(Int), memory(UInt32) }

    var registers = [UInt32](repeating: 0, count: 8)
    var eip: UInt32
    var carry = false, zero = false
    private(set) var accesses: [Access] = []
    private(set) var portWrites: [(port: UInt16, value: UInt32)] = []
    /// How many times each instruction (by first opcode byte) ran.
    private(set) var executed: [UInt8: Int] = [:]

    private let code: [UInt8]
    private let codeBase: UInt32
    private let data: Range<UInt32>
    private var memory: [UInt32: UInt8] = [:]

    init(code: [UInt8], at codeBase: UInt32, data: Range<UInt32>) {
        self.code = code
        self.codeBase = codeBase
        self.eip = codeBase
        self.data = data
    }

    subscript(_ register: X86Assembler.Register32) -> UInt32 {
        get { registers[Int(register.rawValue)] }
        set { registers[Int(register.rawValue)] = newValue }
    }

    /// Little-endian 32-bit word of data memory, without recording an access.
    func peek(_ address: UInt32) -> UInt32 {
        (0..<4).reduce(0) { $0 | UInt32(memory[address + $1, default: 0]) << (8 * $1) }
    }

    mutating func poke(_ address: UInt32, _ value: UInt32) {
        for byte in 0..<UInt32(4) { memory[address + byte] = UInt8(truncatingIfNeeded: value >> (8 * byte)) }
    }

    /// Every 32-bit word of the data region, in address order (without recording accesses).
    var dataWords: [UInt32] { stride(from: data.lowerBound, to: data.upperBound, by: 4).map(peek) }

    /// The architectural state; assigning it to another interpreter of the same program and
    /// data region continues the execution there.
    var state: State {
        get { State(registers: registers, eip: eip, carry: carry, zero: zero, memory: memory) }
        set { (registers, eip, carry, zero, memory) = (newValue.registers, newValue.eip, newValue.carry, newValue.zero, newValue.memory) }
    }

    /// Runs until `hlt`, returning the number of instructions executed (including `hlt`);
    /// `out`s are recorded in ``portWrites`` and do not stop it.
    @discardableResult
    mutating func run(maxSteps: Int) throws -> Int {
        let (stop, steps) = try resume(maxSteps: maxSteps, stoppingAtOut: false)
        guard stop == .halt else { throw Fault.stepLimitExceeded }
        return steps
    }

    /// Executes at most `maxSteps` instructions from the current state, stopping early after a
    /// `hlt` or, when `stoppingAtOut`, after an `out`. Returns why it stopped and how many
    /// instructions ran; calling it again continues where it stopped.
    mutating func resume(maxSteps: Int, stoppingAtOut: Bool = true) throws -> (stop: Stop, steps: Int) {
        for step in stride(from: 1, through: maxSteps, by: 1) {
            switch try self.step() {
            case nil: continue
            case .out? where !stoppingAtOut: continue
            case let stop?: return (stop, step)
            }
        }
        return (.stepLimit, maxSteps)
    }

    /// Executes one instruction; returns `.halt` or `.out` if it was one, else `nil`.
    private mutating func step() throws -> Stop? {
        let start = eip
        let opcode = try fetch8()
        executed[opcode, default: 0] += 1
        switch opcode {
        case 0x89:  // mov r/m32, r32
            let (reg, rm) = try modRM()
            try write(rm, registers[reg])
        case 0x01, 0x29, 0x31, 0x39:  // add/sub/xor/cmp r/m32, r32
            let (reg, rm) = try modRM()
            let result = try alu(opcode, read(rm), registers[reg])
            if opcode != 0x39 { try write(rm, result) }
        case 0x8B:  // mov r32, r/m32
            let (reg, rm) = try modRM()
            registers[reg] = try read(rm)
        case 0x40...0x47:
            registers[Int(opcode - 0x40)] &+= 1
            zero = registers[Int(opcode - 0x40)] == 0
        case 0x48...0x4F:
            registers[Int(opcode - 0x48)] &-= 1
            zero = registers[Int(opcode - 0x48)] == 0
        case 0x69:  // imul r32, r/m32, imm32
            let (reg, rm) = try modRM()
            let multiplicand = Int64(Int32(bitPattern: try read(rm)))
            let product = multiplicand * Int64(Int32(bitPattern: try fetch32()))
            registers[reg] = UInt32(truncatingIfNeeded: product)
            carry = product != Int64(Int32(truncatingIfNeeded: product))
        case 0x81, 0x83:  // group 1 with imm32 / sign-extended imm8
            let (ext, rm) = try modRM()
            let imm = try opcode == 0x81 ? fetch32() : UInt32(bitPattern: Int32(Int8(bitPattern: fetch8())))
            let aluOpcode: [Int: UInt8] = [0: 0x01, 1: 0x09, 4: 0x21, 5: 0x29, 7: 0x39]
            guard let op = aluOpcode[ext] else { throw Fault.undecodable(opcode: opcode, at: start) }
            let result = try alu(op, read(rm), imm)
            if ext != 7 { try write(rm, result) }
        case 0xB8...0xBF:
            registers[Int(opcode - 0xB8)] = try fetch32()
        case 0xC1:  // shl/shr r/m32, imm8
            let (ext, rm) = try modRM()
            let count = UInt32(try fetch8() & 31)
            let value = try read(rm)
            guard ext == 4 || ext == 5 else { throw Fault.undecodable(opcode: opcode, at: start) }
            guard count > 0 else { break }
            let result = ext == 4 ? value << count : value >> count
            carry = (ext == 4 ? value >> (32 - count) : value >> (count - 1)) & 1 == 1
            zero = result == 0
            try write(rm, result)
        case 0x70...0x7F:
            let rel = Int32(Int8(bitPattern: try fetch8()))
            if try condition(opcode & 0xF, at: start) { eip = eip &+ UInt32(bitPattern: rel) }
        case 0x0F:
            let second = try fetch8()
            if second == 0x01 {
                let third = try fetch8()
                guard third == 0xC1 || third == 0xD9 else { throw Fault.undecodable(opcode: third, at: start) }
                return .hypercall
            }
            guard (0x80...0x8F).contains(second) else { throw Fault.undecodable(opcode: second, at: start) }
            let rel = try fetch32()
            if try condition(second & 0xF, at: start) { eip = eip &+ rel }
        case 0xEB:
            let rel = Int32(Int8(bitPattern: try fetch8()))
            eip = eip &+ UInt32(bitPattern: rel)
        case 0xE9:
            let rel = try fetch32()
            eip = eip &+ rel
        case 0xE7, 0xEF:  // out imm8, eax / out dx, eax
            let port = try opcode == 0xE7 ? UInt16(fetch8()) : UInt16(truncatingIfNeeded: self[.edx])
            portWrites.append((port, self[.eax]))
            return .out(port: port, value: self[.eax])
        case 0xF4:
            return .halt
        default:
            throw Fault.undecodable(opcode: opcode, at: start)
        }
        return nil
    }

    private mutating func alu(_ opcode: UInt8, _ lhs: UInt32, _ rhs: UInt32) -> UInt32 {
        let result: UInt32
        switch opcode {
        case 0x01: result = lhs &+ rhs; carry = result < lhs
        case 0x29, 0x39: result = lhs &- rhs; carry = lhs < rhs
        case 0x09: result = lhs | rhs; carry = false
        case 0x21: result = lhs & rhs; carry = false
        case 0x31: result = lhs ^ rhs; carry = false
        default: preconditionFailure("not an ALU opcode: \(opcode)")
        }
        zero = result == 0
        return result
    }

    private func condition(_ code: UInt8, at address: UInt32) throws -> Bool {
        switch code {
        case 0x2: carry
        case 0x3: !carry
        case 0x4: zero
        case 0x5: !zero
        default: throw Fault.undecodable(opcode: 0x70 | code, at: address)
        }
    }

    private mutating func fetch8() throws -> UInt8 {
        let offset = Int(eip &- codeBase)
        guard eip >= codeBase, offset < code.count else { throw Fault.unmapped(address: eip) }
        eip &+= 1
        return code[offset]
    }

    private mutating func fetch32() throws -> UInt32 {
        var value: UInt32 = 0
        for byte in 0..<UInt32(4) { value |= UInt32(try fetch8()) << (8 * byte) }
        return value
    }

    /// Decodes ModRM (and SIB/displacement): the reg field and the r/m operand.
    private mutating func modRM() throws -> (Int, Operand) {
        let byte = try fetch8()
        let mod = byte >> 6, reg = Int(byte >> 3 & 7), rm = byte & 7
        if mod == 3 { return (reg, .register(Int(rm))) }
        var address: UInt32
        if rm == 4 {
            let sib = try fetch8()
            let base = sib & 7, index = sib >> 3 & 7, scale = sib >> 6
            address = try mod == 0 && base == 5 ? fetch32() : registers[Int(base)]
            if index != 4 { address &+= registers[Int(index)] << scale }
        } else if mod == 0 && rm == 5 {
            address = try fetch32()
        } else {
            address = registers[Int(rm)]
        }
        if mod == 1 { address &+= UInt32(bitPattern: Int32(Int8(bitPattern: try fetch8()))) }
        if mod == 2 { address &+= try fetch32() }
        return (reg, .memory(address))
    }

    private mutating func read(_ operand: Operand) throws -> UInt32 {
        switch operand {
        case .register(let r): return registers[r]
        case .memory(let address):
            try checkMapped(address)
            let value = peek(address)
            accesses.append(Access(address: address, isWrite: false, value: value))
            return value
        }
    }

    private mutating func write(_ operand: Operand, _ value: UInt32) throws {
        switch operand {
        case .register(let r): registers[r] = value
        case .memory(let address):
            try checkMapped(address)
            poke(address, value)
            accesses.append(Access(address: address, isWrite: true, value: value))
        }
    }

    private func checkMapped(_ address: UInt32) throws {
        guard data.contains(address), address <= data.upperBound - 4 else { throw Fault.unmapped(address: address) }
    }
}

