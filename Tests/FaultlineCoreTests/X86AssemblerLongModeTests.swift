import Testing
@testable import FaultlineCore

/// Assembles whatever `build` emits in `mode`.
private func assembled(_ mode: GuestMode, shortImmediates: Bool = false, _ build: (inout X86Assembler) -> Void) throws -> [UInt8] {
    var asm = X86Assembler(prefersShortImmediates: shortImmediates, mode: mode)
    build(&asm)
    return try asm.assemble()
}

@Suite("X86Assembler long mode")
struct X86AssemblerLongModeTests {
    /// Each 64-bit form against its bytes, as `objdump -D -b binary -mi386:x86-64 -M intel`
    /// disassembles them (the listing is the first column).
    @Test func longModeEncodings() throws {
        let cases: [(String, (inout X86Assembler) -> Void, [UInt8])] = [
            ("mov rdx, rsi", { $0.mov(.rdx, .rsi) }, [0x48, 0x89, 0xF2]),
            ("add rax, rcx", { $0.add(.rax, .rcx) }, [0x48, 0x01, 0xC8]),
            ("cmp rdx, rax", { $0.cmp(.rdx, .rax) }, [0x48, 0x39, 0xC2]),
            ("cmp rdx, rdi", { $0.cmp(.rdx, .rdi) }, [0x48, 0x39, 0xFA]),
            ("movabs rax, 0x1122334455667788", { $0.mov(.rax, imm: 0x1122_3344_5566_7788) },
             [0x48, 0xB8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]),
            ("add rdx, 0x1000", { $0.add(.rdx, imm: 0x1000) }, [0x48, 0x81, 0xC2, 0x00, 0x10, 0x00, 0x00]),
            ("sub rax, 0xffc", { $0.sub(.rax, imm: 0xFFC) }, [0x48, 0x81, 0xE8, 0xFC, 0x0F, 0x00, 0x00]),
            ("add rax, 0xffffffff80000000", { $0.add(.rax, imm: Int32.min) }, [0x48, 0x81, 0xC0, 0x00, 0x00, 0x00, 0x80]),
            ("mov DWORD PTR [rdx], ebx", { $0.store(.ebx, to: .rdx) }, [0x89, 0x1A]),
            ("mov eax, DWORD PTR [rdx]", { $0.load(.eax, from: .rdx) }, [0x8B, 0x02]),
            ("mov DWORD PTR [rsp], ebx", { $0.store(.ebx, to: .rsp) }, [0x89, 0x1C, 0x24]),
            ("mov eax, DWORD PTR [rbp+0x0]", { $0.load(.eax, from: .rbp) }, [0x8B, 0x45, 0x00]),
            // 40-4F are REX prefixes in long mode: inc/dec take their FF /0, FF /1 forms.
            ("inc ebp", { $0.inc(.ebp) }, [0xFF, 0xC5]),
            ("dec eax", { $0.dec(.eax) }, [0xFF, 0xC8]),
            // A 32-bit register as an address keeps its meaning: the 67 address-size prefix.
            ("mov DWORD PTR [edx], ebx", { $0.store(.ebx, to: .edx) }, [0x67, 0x89, 0x1A]),
            ("mov eax, DWORD PTR [ebp+0x0]", { $0.load(.eax, from: .ebp) }, [0x67, 0x8B, 0x45, 0x00]),
            ("mov DWORD PTR [edx+0x8], ebx", { $0.store(.ebx, to: .edx, displacement: 8) }, [0x67, 0x89, 0x5A, 0x08]),
        ]
        for (text, build, expected) in cases {
            #expect(try assembled(.long64, build) == expected, "\(text)")
        }
        #expect(try assembled(.long64, shortImmediates: true) { $0.add(.rdx, imm: 4); $0.sub(.rdx, imm: -1) }
                == [0x48, 0x83, 0xC2, 0x04, 0x48, 0x83, 0xEA, 0xFF])
    }

    /// The pointer-width forms are the 32-bit forms in protected mode, byte for byte, and
    /// the REX.W forms in long mode.
    @Test func pointerWidthFormsFollowTheMode() throws {
        let build: (inout X86Assembler) -> Void = {
            $0.movPointer(.edx, .esi); $0.addPointer(.eax, .ecx); $0.cmpPointer(.edx, .edi)
            $0.addPointer(.edx, imm: 4); $0.subPointer(.eax, imm: 0xFFC)
            $0.storePointed(.ebx, to: .edx); $0.loadPointed(.eax, from: .edx)
        }
        #expect(try assembled(.protected32, build) == [0x89, 0xF2, 0x01, 0xC8, 0x39, 0xFA, 0x81, 0xC2, 0x04, 0x00, 0x00, 0x00,
                                                       0x81, 0xE8, 0xFC, 0x0F, 0x00, 0x00, 0x89, 0x1A, 0x8B, 0x02])
        #expect(try assembled(.long64, build) == [0x48, 0x89, 0xF2, 0x48, 0x01, 0xC8, 0x48, 0x39, 0xFA,
                                                  0x48, 0x81, 0xC2, 0x04, 0x00, 0x00, 0x00, 0x48, 0x81, 0xE8, 0xFC, 0x0F, 0x00, 0x00,
                                                  0x89, 0x1A, 0x8B, 0x02])
        #expect(try assembled(.protected32) { $0.inc(.ebp); $0.dec(.eax) } == [0x45, 0x48])
    }

    @Test func sixtyFourBitFormsAreRefusedInProtectedMode() {
        #expect(throws: X86AssemblerError.needsLongMode("mov rdx, rsi")) { try assembled(.protected32) { $0.mov(.rdx, .rsi) } }
        #expect(throws: X86AssemblerError.needsLongMode("mov rax, imm64")) { try assembled(.protected32) { $0.mov(.rax, imm: 1) } }
        #expect(throws: X86AssemblerError.needsLongMode("mov [rdx], ebx")) { try assembled(.protected32) { $0.store(.ebx, to: .rdx) } }
        #expect(throws: X86AssemblerError.needsLongMode("add rdx, imm32")) { try assembled(.protected32) { $0.add(.rdx, imm: 1) } }
        let message = X86AssemblerError.needsLongMode("cmp rdx, rax").description
        #expect(message.contains("cmp rdx, rax") && message.contains("protected mode"))
    }

    /// The whole long-mode selfcheck program (4 pages, spin 2), checked against its
    /// disassembly: every address operation is 64-bit, every inc/dec the FF form.
    @Test func longModeSelfcheckProgram() throws {
        let code = try RunningWorkload(kind: .selfcheck, pagesPerVcpu: 4, spinIterations: 2, mode: .long64).program()
        let expected: [UInt8] = [
            0x8B, 0x02,                                 // mov eax, [rdx]
            0x39, 0xC8, 0x74, 0x02, 0xE7, 0x11,         // cmp eax, ecx; je; out 0x11, eax
            0x48, 0x81, 0xC2, 0xFC, 0x0F, 0x00, 0x00,   // add rdx, 0xffc
            0x8B, 0x02, 0x39, 0xC8, 0x74, 0x02, 0xE7, 0x11,
            0x89, 0x1A,                                 // mov [rdx], ebx
            0x48, 0x89, 0xD0,                           // mov rax, rdx
            0x48, 0x81, 0xE8, 0xFC, 0x0F, 0x00, 0x00,   // sub rax, 0xffc
            0x89, 0x18,                                 // mov [rax], ebx
            0x48, 0x81, 0xC2, 0x04, 0x00, 0x00, 0x00,   // add rdx, 4
            0xB8, 0x02, 0x00, 0x00, 0x00, 0xFF, 0xC8, 0x75, 0xFC,  // mov eax, 2; dec eax; jne
            0x48, 0x39, 0xFA, 0x72, 0xC6,               // cmp rdx, rdi; jb page
            0x89, 0xE8, 0xE7, 0x10,                     // mov eax, ebp; out 0x10, eax
            0x89, 0xD8, 0xFF, 0xC0, 0x89, 0xC1, 0xC1, 0xE1, 0x08, 0x75, 0x06,  // next tag
            0x81, 0xE8, 0xFF, 0xFF, 0xFF, 0x00,
            0x89, 0xD9,                                 // mov ecx, ebx
            0x48, 0x89, 0xF2,                           // mov rdx, rsi
            0x89, 0xC3, 0xFF, 0xC5, 0xEB, 0xA6,         // mov ebx, eax; inc ebp; jmp page
        ]
        #expect(code == expected)
    }

    /// The dirtier's working-set end is a 64-bit immediate: a chunk beyond 2 GiB is not
    /// cut short by a sign-extended imm32.
    @Test func longModeDirtierEndsItsWorkingSetWithA64BitImmediate() throws {
        let pages = (5 << 30) / GuestWorkload.pageSize   // 5 GiB
        let code = try RunningWorkload(kind: .dirtier, pagesPerVcpu: pages, mode: .long64).program()
        let movabs: [UInt8] = [0x48, 0xB8, 0x00, 0x00, 0x00, 0x40, 0x01, 0x00, 0x00, 0x00]   // mov rax, 0x140000000
        #expect(code.indices.contains { code[$0...].starts(with: movabs) })
        #expect(throws: RunningWorkloadError.tooManyPages(pages, limit: RunningWorkload.maxPagesPerVcpu)) {
            try RunningWorkload(kind: .dirtier, pagesPerVcpu: pages)
        }
    }

    /// Long mode starts the chunk's bounds at full width; the 32-bit registers are those of
    /// protected mode.
    @Test func longModeStartRegisters() throws {
        let base: UInt64 = 0x1_0020_0000
        let check = try RunningWorkload(kind: .selfcheck, pagesPerVcpu: 4, mode: .long64).startRegisters(vcpu: 2, chunkBase: base)
        #expect(check == RunningWorkloadStart(rcx: 0, rdx: base, rbx: 0x0200_0001, rbp: 1, rsi: base, rdi: base + 0x4000))
        let dirty = try RunningWorkload(kind: .dirtier, pagesPerVcpu: 4, mode: .long64).startRegisters(vcpu: 2, chunkBase: base)
        #expect(dirty == RunningWorkloadStart(rcx: 68, rdx: base, rbx: 0x0200_0001, rbp: 1, rsi: base, rdi: base + 0x4000))
        let protected = try RunningWorkload(kind: .dirtier, pagesPerVcpu: 4).startRegisters(vcpu: 2, chunkBase: 0x10_0000)
        #expect(protected == RunningWorkloadStart(rcx: 68, rdx: 0x10_0000, rbx: 0x0200_0001, rbp: 1, rsi: 0x10_0000, rdi: 0x10_4000))
        let most = RunningWorkload.maxLongModePagesPerVcpu
        #expect(UInt64(most) * 4096 == GuestMode.long64.maxRAM)
        #expect(throws: RunningWorkloadError.tooManyPages(most + 1, limit: most)) {
            try RunningWorkload(kind: .selfcheck, pagesPerVcpu: most + 1, mode: .long64)
        }
    }
}
