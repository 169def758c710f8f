import Testing
@testable import FaultlineCore

/// Assembles whatever `build` emits into a fresh assembler.
private func assembled(shortImmediates: Bool = false, _ build: (inout X86Assembler) -> Void) throws -> [UInt8] {
    var asm = X86Assembler(prefersShortImmediates: shortImmediates)
    build(&asm)
    return try asm.assemble()
}

private func hex(_ bytes: [UInt8]) -> String {
    bytes.map { ($0 < 0x10 ? "0" : "") + String($0, radix: 16) }.joined(separator: " ")
}

/// `count` one-byte `hlt`s, used as filler of a known size.
private func filler(_ count: Int, _ asm: inout X86Assembler) {
    for _ in 0..<count { asm.hlt() }
}

private func halts(_ count: Int) -> [UInt8] { [UInt8](repeating: 0xF4, count: count) }

@Suite("X86Assembler encodings")
struct X86AssemblerTests {
    /// Each instruction form against its encoding as given by the Intel SDM (and GNU as).
    @Test func instructionEncodings() throws {
        let cases: [(String, (inout X86Assembler) -> Void, [UInt8])] = [
            ("mov eax, 0x12345678", { $0.mov(.eax, imm: 0x1234_5678) }, [0xB8, 0x78, 0x56, 0x34, 0x12]),
            ("mov edi, 1", { $0.mov(.edi, imm: 1) }, [0xBF, 0x01, 0x00, 0x00, 0x00]),
            ("mov ebx, ebp", { $0.mov(.ebx, .ebp) }, [0x89, 0xEB]),
            ("mov edx, ecx", { $0.mov(.edx, .ecx) }, [0x89, 0xCA]),
            ("mov [esi], eax", { $0.store(.eax, to: .esi) }, [0x89, 0x06]),
            ("mov [eax], eax", { $0.store(.eax, to: .eax) }, [0x89, 0x00]),
            ("mov [edx], eax", { $0.store(.eax, to: .edx) }, [0x89, 0x02]),
            ("mov [esp], eax", { $0.store(.eax, to: .esp) }, [0x89, 0x04, 0x24]),
            ("mov [ebp], eax", { $0.store(.eax, to: .ebp) }, [0x89, 0x45, 0x00]),
            ("mov [edi], ebx", { $0.store(.ebx, to: .edi) }, [0x89, 0x1F]),
            ("mov ecx, [esi]", { $0.load(.ecx, from: .esi) }, [0x8B, 0x0E]),
            ("mov eax, [esp]", { $0.load(.eax, from: .esp) }, [0x8B, 0x04, 0x24]),
            ("mov edx, [ebp]", { $0.load(.edx, from: .ebp) }, [0x8B, 0x55, 0x00]),
            ("add esi, 0x1000", { $0.add(.esi, imm: 0x1000) }, [0x81, 0xC6, 0x00, 0x10, 0x00, 0x00]),
            ("add eax, 1", { $0.add(.eax, imm: 1) }, [0x81, 0xC0, 0x01, 0x00, 0x00, 0x00]),
            ("add edx, ecx", { $0.add(.edx, .ecx) }, [0x01, 0xCA]),
            ("add ebx, ebp", { $0.add(.ebx, .ebp) }, [0x01, 0xEB]),
            ("sub esp, 16", { $0.sub(.esp, imm: 16) }, [0x81, 0xEC, 0x10, 0x00, 0x00, 0x00]),
            ("cmp esi, edi", { $0.cmp(.esi, .edi) }, [0x39, 0xFE]),
            ("cmp ebx, 0x400", { $0.cmp(.ebx, imm: 0x400) }, [0x81, 0xFB, 0x00, 0x04, 0x00, 0x00]),
            ("and ebx, 0x3ff", { $0.and(.ebx, imm: 0x3FF) }, [0x81, 0xE3, 0xFF, 0x03, 0x00, 0x00]),
            ("or ebp, 1", { $0.or(.ebp, imm: 1) }, [0x81, 0xCD, 0x01, 0x00, 0x00, 0x00]),
            ("xor edx, edx", { $0.xor(.edx, .edx) }, [0x31, 0xD2]),
            ("xor eax, ebx", { $0.xor(.eax, .ebx) }, [0x31, 0xD8]),
            ("shl edx, 12", { $0.shl(.edx, by: 12) }, [0xC1, 0xE2, 0x0C]),
            ("shr ebp, 16", { $0.shr(.ebp, by: 16) }, [0xC1, 0xED, 0x10]),
            ("imul ebx, ebx, 0x41c64e6d", { $0.imul(.ebx, .ebx, imm: 0x41C6_4E6D) }, [0x69, 0xDB, 0x6D, 0x4E, 0xC6, 0x41]),
            ("imul eax, ecx, -1", { $0.imul(.eax, .ecx, imm: -1) }, [0x69, 0xC1, 0xFF, 0xFF, 0xFF, 0xFF]),
            ("inc ebx", { $0.inc(.ebx) }, [0x43]),
            ("dec ecx", { $0.dec(.ecx) }, [0x49]),
            ("inc eax", { $0.inc(.eax) }, [0x40]),
            ("dec edi", { $0.dec(.edi) }, [0x4F]),
            ("out 0x10, eax", { $0.out(port: 0x10) }, [0xE7, 0x10]),
            ("out dx, eax", { $0.outDX() }, [0xEF]),
            ("hlt", { $0.hlt() }, [0xF4]),
        ]
        for (name, build, expected) in cases {
            let bytes = try assembled(build)
            #expect(bytes == expected, "\(name): got \(hex(bytes)), want \(hex(expected))")
        }
    }

    @Test func shortImmediatesAreOptIn() throws {
        #expect(try assembled(shortImmediates: true) { $0.add(.eax, imm: 1) } == [0x83, 0xC0, 0x01])
        #expect(try assembled(shortImmediates: true) { $0.sub(.esp, imm: 16) } == [0x83, 0xEC, 0x10])
        #expect(try assembled(shortImmediates: true) { $0.cmp(.ecx, imm: 0xFFFF_FFFF) } == [0x83, 0xF9, 0xFF])
        #expect(try assembled(shortImmediates: true) { $0.and(.ebx, imm: 0x7F) } == [0x83, 0xE3, 0x7F])
        // 128 does not fit a sign-extended imm8.
        #expect(try assembled(shortImmediates: true) { $0.add(.eax, imm: 128) } == [0x81, 0xC0, 0x80, 0x00, 0x00, 0x00])
        #expect(try assembled { $0.cmp(.ecx, imm: 0xFFFF_FFFF) } == [0x81, 0xF9, 0xFF, 0xFF, 0xFF, 0xFF])
    }

    @Test func everyRegisterRoundTripsThroughModRM() throws {
        for dst in X86Assembler.Register32.allCases {
            for src in X86Assembler.Register32.allCases {
                let bytes = try assembled { $0.mov(dst, src) }
                #expect(bytes == [0x89, 0xC0 | src.rawValue << 3 | dst.rawValue], "mov \(dst), \(src)")
            }
        }
    }

    @Test func backwardJumpsUseRel8() throws {
        // loop: hlt ; jb loop  -> the jump is 2 bytes back from its end plus the hlt.
        let jb = try assembled { asm in
            let loop = asm.makeLabel()
            asm.bind(loop)
            asm.hlt()
            asm.jb(loop)
        }
        #expect(jb == [0xF4, 0x72, 0xFD])
        let selfLoop = try assembled { asm in
            let here = asm.makeLabel()
            asm.bind(here)
            asm.jmp(here)
        }
        #expect(selfLoop == [0xEB, 0xFE])
        let others = try assembled { asm in
            let top = asm.makeLabel()
            asm.bind(top)
            asm.jae(top)
            asm.je(top)
            asm.jne(top)
        }
        #expect(others == [0x73, 0xFE, 0x74, 0xFC, 0x75, 0xFA])
    }

    @Test func backwardJumpRangeBoundary() throws {
        // rel8 reaches exactly -128: 126 filler bytes plus the 2-byte jump.
        let shortest = try assembled { asm in
            let top = asm.makeLabel()
            asm.bind(top)
            filler(126, &asm)
            asm.jb(top)
        }
        #expect(Array(shortest.suffix(2)) == [0x72, 0x80])
        #expect(shortest.count == 128)
        // One more byte needs rel32: -(127 + 6) = -133 = 0xffffff7b.
        let long = try assembled { asm in
            let top = asm.makeLabel()
            asm.bind(top)
            filler(127, &asm)
            asm.jb(top)
        }
        #expect(Array(long.suffix(6)) == [0x0F, 0x82, 0x7B, 0xFF, 0xFF, 0xFF])
        let longJmp = try assembled { asm in
            let top = asm.makeLabel()
            asm.bind(top)
            filler(200, &asm)
            asm.jmp(top)
        }
        #expect(Array(longJmp.suffix(5)) == [0xE9, 0x33, 0xFF, 0xFF, 0xFF])  // -(200 + 5)
    }

    @Test func forwardJumpsAreResolved() throws {
        let short = try assembled { asm in
            let done = asm.makeLabel()
            asm.jne(done)
            asm.hlt()
            asm.bind(done)
            asm.hlt()
        }
        #expect(short == [0x75, 0x01, 0xF4, 0xF4])
        // +127 is the farthest rel8 target ...
        let edge = try assembled { asm in
            let done = asm.makeLabel()
            asm.jmp(done)
            filler(127, &asm)
            asm.bind(done)
        }
        #expect(edge == [0xEB, 0x7F] + halts(127))
        // ... and +128 needs rel32.
        let far = try assembled { asm in
            let done = asm.makeLabel()
            asm.jmp(done)
            filler(128, &asm)
            asm.bind(done)
        }
        #expect(far == [0xE9, 0x80, 0x00, 0x00, 0x00] + halts(128))
        let farConditional = try assembled { asm in
            let done = asm.makeLabel()
            asm.je(done)
            filler(200, &asm)
            asm.bind(done)
            asm.hlt()
        }
        #expect(Array(farConditional.prefix(6)) == [0x0F, 0x84, 0xC8, 0x00, 0x00, 0x00])
        #expect(farConditional.count == 207)
    }

    @Test func wideningOneJumpCanWidenAnother() throws {
        // The second jump (to `b`, 133 bytes on) must be rel32; that pushes `a` from +125
        // to +128 bytes past the first jump, which then must be rel32 too.
        let code = try assembled { asm in
            let a = asm.makeLabel(), b = asm.makeLabel()
            asm.jmp(a)
            asm.jmp(b)
            filler(123, &asm)
            asm.bind(a)
            filler(10, &asm)
            asm.bind(b)
        }
        #expect(Array(code.prefix(10)) == [0xE9, 0x80, 0x00, 0x00, 0x00, 0xE9, 0x85, 0x00, 0x00, 0x00])
        #expect(code.count == 10 + 133)
    }

    @Test func labelErrors() throws {
        var unbound = X86Assembler()
        let nowhere = unbound.makeLabel()
        unbound.jmp(nowhere)
        #expect(throws: X86AssemblerError.unboundLabel(nowhere)) { try unbound.assemble() }

        var twice = X86Assembler()
        let label = twice.makeLabel()
        twice.bind(label)
        twice.hlt()
        twice.bind(label)
        #expect(throws: X86AssemblerError.labelBoundTwice(label)) { try twice.assemble() }

        var other = X86Assembler()
        _ = other.makeLabel()
        let foreign = other.makeLabel()
        var asm = X86Assembler()
        asm.jne(foreign)
        #expect(throws: X86AssemblerError.unknownLabel(foreign)) { try asm.assemble() }

        // A label that is made but never used or bound is harmless.
        var unused = X86Assembler()
        _ = unused.makeLabel()
        unused.hlt()
        #expect(try unused.assemble() == [0xF4])

        #expect(X86AssemblerError.unboundLabel(nowhere).description.contains("never bound"))
        #expect(X86AssemblerError.labelBoundTwice(label).description.contains("more than once"))
    }
}
