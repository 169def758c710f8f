extension RunningWorkload {
    /// What every readmostly page outside the working set holds after pass 1, the only pass
    /// that writes it: pass 1's tag.
    public static func readMostlyColdValue(vcpu id: Int) -> UInt32 { tag(vcpu: id, pass: 1) }

    /// Readmostly: selfcheck's loop, except that after pass 1 a page at or past the working set
    /// is checked against `esp` (pass 1's tag) and not written. The first instruction puts that
    /// tag in `esp` (`ebx` holds it at the start); a guest resumed elsewhere has it in its
    /// registers. As in selfcheck, `edx` is at a page start or at the last word of the page
    /// being checked, so the guest may be paused anywhere.
    func emitReadMostly(into asm: inout X86Assembler) {
        let page = asm.makeLabel(), hot = asm.makeLabel(), next = asm.makeLabel()
        let lastWord = Int32(Self.lastWordOffset)
        asm.mov(.esp, .ebx)                         // the cold value: tag(id, 1)
        asm.bind(page)
        emitWorkingSetEnd(into: &asm)
        asm.cmpPointer(.edx, .eax)
        asm.jb(hot)                                 // in the working set
        asm.cmp(.ebp, imm: 1)
        asm.je(hot)                                 // pass 1 fills every page
        emitCheck(against: .esp, lastWord: lastWord, into: &asm)
        asm.addPointer(.edx, imm: 4)                // next page: this one is only read
        asm.jmp(next)
        asm.bind(hot)
        emitCheck(against: .ecx, lastWord: lastWord, into: &asm)
        asm.storePointed(.ebx, to: .edx)            // last word
        asm.movPointer(.eax, .edx)
        asm.subPointer(.eax, imm: lastWord)
        asm.storePointed(.ebx, to: .eax)            // first word
        asm.addPointer(.edx, imm: 4)                // next page: this one is done
        asm.bind(next)
        emitSpin(into: &asm)
        asm.cmpPointer(.edx, .edi)
        asm.jb(page)
        emitPassEnd(into: &asm)
        emitNextTag(into: &asm)
        asm.mov(.ecx, .ebx)                         // expected in the working set = tag(k)
        asm.movPointer(.edx, .esi)
        asm.mov(.ebx, .eax)                         // write tag(k + 1)
        asm.inc(.ebp)
        asm.jmp(page)
    }

    /// Checks the first word of the page at `edx` and its last word against `expected`,
    /// reporting each wrong one on ``mismatchPort``; leaves `edx` at the last word.
    private func emitCheck(against expected: X86Assembler.Register32, lastWord: Int32, into asm: inout X86Assembler) {
        let firstOK = asm.makeLabel(), lastOK = asm.makeLabel()
        asm.loadPointed(.eax, from: .edx)
        asm.cmp(.eax, expected)
        asm.je(firstOK)
        asm.out(port: Self.mismatchPort)            // eax = bad value, edx = its address
        asm.bind(firstOK)
        asm.addPointer(.edx, imm: lastWord)
        asm.loadPointed(.eax, from: .edx)
        asm.cmp(.eax, expected)
        asm.je(lastOK)
        asm.out(port: Self.mismatchPort)
        asm.bind(lastOK)
    }
}
