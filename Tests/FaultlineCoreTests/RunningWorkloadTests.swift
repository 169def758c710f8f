import Testing
@testable import FaultlineCore

private let chunkBase: UInt32 = 0x0020_0000
private let pageSize = GuestWorkload.pageSize
private let lastWord = RunningWorkload.lastWordOffset

/// A `mismatchPort` exit as the VMM sees it: `eax`, and `edx` from `KVM_GET_REGS`.
private struct Mismatch: Equatable {
    let value: UInt32
    let address: UInt32
}

/// One vCPU running a workload in the interpreter, started the way the VMM starts it, with
/// its port exits recorded the way the VMM handles them (counted, then resumed).
private struct Guest {
    let workload: RunningWorkload
    let id: Int
    var cpu: MiniX86
    /// Instructions executed so far.
    private(set) var steps = 0
    /// `eax` of every `progressPort` exit, in order.
    private(set) var passes: [UInt32] = []
    private(set) var mismatches: [Mismatch] = []

    init(_ workload: RunningWorkload, vcpu id: Int = 3, code: [UInt8]? = nil) throws {
        self.workload = workload
        self.id = id
        cpu = MiniX86(code: try code ?? workload.program(), at: UInt32(GuestWorkload.codeAddress),
                      data: chunkBase..<chunkBase + UInt32(workload.chunkSize))
        registers = workload.initialRegisters(vcpu: id, chunkBase: UInt64(chunkBase))
    }

    /// The general registers, as `KVM_GET_REGS`/`KVM_SET_REGS` would see them.
    var registers: RunningWorkloadRegisters {
        get {
            var registers = RunningWorkloadRegisters()
            for register in X86Assembler.Register32.allCases { registers[register] = cpu[register] }
            return registers
        }
        set { for register in X86Assembler.Register32.allCases { cpu[register] = newValue[register] } }
    }

    /// Executes exactly `count` instructions (a pause at an arbitrary point).
    mutating func run(steps count: Int) throws {
        var left = count
        while left > 0 { left -= try resume(maxSteps: left) }
    }

    /// Runs until `count` more passes have been reported (the pause right after the `out`).
    mutating func run(passes count: Int) throws {
        let target = passes.count + count, limit = steps + 100_000
        while passes.count < target {
            guard steps < limit else { throw MiniX86.Fault.stepLimitExceeded }
            _ = try resume(maxSteps: limit - steps)
        }
    }

    private mutating func resume(maxSteps: Int) throws -> Int {
        let (stop, ran) = try cpu.resume(maxSteps: maxSteps)
        steps += ran
        switch stop {
        case .out(port: UInt16(RunningWorkload.progressPort), let value): passes.append(value)
        case .out(port: UInt16(RunningWorkload.mismatchPort), let value):
            mismatches.append(Mismatch(value: value, address: cpu[.edx]))
        case .stepLimit: break
        case let other: Issue.record("unexpected stop: \(other)")
        }
        return ran
    }

    func address(page: Int, offset: Int = 0) -> UInt32 { chunkBase + UInt32(page * pageSize + offset) }
    func word(page: Int, offset: Int = 0) -> UInt32 { cpu.peek(address(page: page, offset: offset)) }

    /// Checks ``RunningWorkload/expectedSelfcheckWords(vcpu:registers:page:)`` against memory
    /// for every page; returns how many pages it left open (`nil`).
    @discardableResult
    func checkExpectedWords(_ context: String, sourceLocation: SourceLocation = #_sourceLocation) -> Int {
        var open = 0
        for page in 0..<workload.pagesPerVcpu {
            guard let expected = workload.expectedSelfcheckWords(vcpu: id, registers: registers, page: page) else {
                open += 1
                continue
            }
            let actual = (first: word(page: page), last: word(page: page, offset: lastWord))
            #expect(actual == expected, "\(context): page \(page)", sourceLocation: sourceLocation)
        }
        return open
    }
}

private func dirtier(_ pages: Int, workingSet: Int? = nil, spin: UInt32 = 0) throws -> RunningWorkload {
    try RunningWorkload(kind: .dirtier, pagesPerVcpu: pages, workingSetPages: workingSet, spinIterations: spin)
}

private func selfcheck(_ pages: Int, spin: UInt32 = 0) throws -> RunningWorkload {
    try RunningWorkload(kind: .selfcheck, pagesPerVcpu: pages, spinIterations: spin)
}

private func tag(_ id: Int, _ pass: UInt32) -> UInt32 { RunningWorkload.tag(vcpu: id, pass: pass) }

/// The chunk, word by word, after dirtier passes `1...passes` of vCPU `id`, computed on the host.
private func dirtierImage(_ w: RunningWorkload, vcpu id: Int, passes: UInt32) -> [UInt32] {
    var image = [UInt32](repeating: 0, count: Int(w.chunkSize) / 4)
    for pass in stride(from: UInt32(1), through: passes, by: 1) {
        for page in w.order == .scattered ? (0..<w.workingSetPages).map(w.scatteredPage(step:)) : Array(0..<w.workingSetPages) {
            image[page * pageSize / 4] = tag(id, pass)
            image[(page * pageSize + RunningWorkload.dirtierSecondWordOffset(pass: pass)) / 4] = tag(id, pass)
        }
    }
    return image
}

/// The chunk after selfcheck pass `pass`: both checked words of every page hold its tag.
private func selfcheckImage(_ w: RunningWorkload, vcpu id: Int, pass: UInt32) -> [UInt32] {
    var image = [UInt32](repeating: 0, count: Int(w.chunkSize) / 4)
    for page in 0..<w.pagesPerVcpu {
        image[page * pageSize / 4] = tag(id, pass)
        image[(page * pageSize + lastWord) / 4] = tag(id, pass)
    }
    return image
}

@Suite("Running workloads")
struct RunningWorkloadTests {
    @Test(arguments: [0, 3, 255])
    func dirtierWritesExactlyTheWorkingSet(id: Int) throws {
        let w = try dirtier(8, workingSet: 5)
        var guest = try Guest(w, vcpu: id)
        for pass in UInt32(1)...4 {
            let accessesBefore = guest.cpu.accesses.count
            try guest.run(passes: 1)
            #expect(guest.passes == Array(1...pass))
            #expect(guest.cpu.dataWords == dirtierImage(w, vcpu: id, passes: pass), "pass \(pass)")
            // Exactly two stores per working-set page, in ascending order, and nothing else.
            let offset = RunningWorkload.dirtierSecondWordOffset(pass: pass)
            let expected = (0..<5).flatMap { page in
                [0, offset].map { MiniX86.Access(address: guest.address(page: page, offset: $0), isWrite: true, value: tag(id, pass)) }
            }
            #expect(Array(guest.cpu.accesses[accessesBefore...]) == expected)
        }
        #expect((5..<8).allSatisfy { page in (0..<pageSize / 4).allSatisfy { guest.word(page: page, offset: $0 * 4) == 0 } })
        #expect(guest.mismatches.isEmpty)
    }

    @Test(arguments: [1, 2, 8, 64])
    func scatteredDirtierVisitsEveryWorkingSetPageOncePerPassInThePermutation(workingSet: Int) throws {
        let w = try RunningWorkload(kind: .dirtier, pagesPerVcpu: 64, workingSetPages: workingSet, order: .scattered)
        var guest = try Guest(w, vcpu: 2)
        for pass in UInt32(1)...3 {
            let accessesBefore = guest.cpu.accesses.count
            try guest.run(passes: 1)
            #expect(guest.cpu.dataWords == dirtierImage(w, vcpu: 2, passes: pass), "pass \(pass)")
            let offset = RunningWorkload.dirtierSecondWordOffset(pass: pass)
            let expected = (0..<workingSet).flatMap { step in
                [0, offset].map { MiniX86.Access(address: guest.address(page: w.scatteredPage(step: step), offset: $0), isWrite: true,
                                                 value: tag(2, pass)) }
            }
            #expect(Array(guest.cpu.accesses[accessesBefore...]) == expected)
        }
        #expect(Set((0..<64).map(w.scatteredPage(step:))) == Set(0..<64), "a permutation of the chunk")
        #expect(abs(w.scatteredPage(step: 1) - w.scatteredPage(step: 0)) > 1, "not sequential")
        let untouched = Set(0..<64).subtracting((0..<workingSet).map(w.scatteredPage(step:)))
        #expect(untouched.allSatisfy { page in (0..<pageSize / 4).allSatisfy { guest.word(page: page, offset: $0 * 4) == 0 } })
    }

    @Test func scatteredOrderNeedsAPowerOfTwoDirtierChunk() {
        #expect(throws: RunningWorkloadError.scatteredNeedsPowerOfTwo(pagesPerVcpu: 12)) {
            try RunningWorkload(kind: .dirtier, pagesPerVcpu: 12, workingSetPages: 8, order: .scattered)
        }
        #expect(throws: Never.self) { try RunningWorkload(kind: .dirtier, pagesPerVcpu: 16, workingSetPages: 6, order: .scattered) }
        #expect(throws: RunningWorkloadError.self) { try RunningWorkload(kind: .selfcheck, pagesPerVcpu: 8, order: .scattered) }
    }

    @Test(arguments: [1, 5, 33, 100])
    func scatteredDirtierContinuesAfterAMigrationAtAnyPoint(pause: Int) throws {
        let w = try RunningWorkload(kind: .dirtier, pagesPerVcpu: 16, workingSetPages: 16, order: .scattered)
        var source = try Guest(w, vcpu: 1)
        try source.run(steps: pause)
        var destination = try Guest(w, vcpu: 1)  // a new machine: registers and memory copied over
        destination.cpu.state = source.cpu.state
        try destination.run(passes: 3)
        try source.run(passes: 3)
        #expect(destination.passes == source.passes.suffix(3))
        #expect(destination.cpu.state == source.cpu.state)
        #expect(destination.cpu.dataWords == dirtierImage(w, vcpu: 1, passes: UInt32(source.passes.count)))
    }

    @Test func dirtierCyclesThroughCacheLinesOfTheWholeChunk() throws {
        let w = try dirtier(3)
        #expect(w.workingSetPages == 3)
        var guest = try Guest(w)
        try guest.run(passes: 70)  // the second word's offset runs through all 64 cache lines
        #expect(guest.cpu.dataWords == dirtierImage(w, vcpu: 3, passes: 70))
    }

    @Test func dirtierSecondWordMovesAcrossCacheLines() {
        let offsets = (UInt32(0)..<64).map(RunningWorkload.dirtierSecondWordOffset(pass:))
        #expect(Set(offsets.map { $0 / 64 }).count == 64)
        #expect(offsets.allSatisfy { $0 % 4 == 0 && $0 > 0 && $0 <= lastWord })
        #expect(RunningWorkload.dirtierSecondWordOffset(pass: 65) == offsets[1])
    }

    @Test(arguments: [0, 7])
    func selfcheckRunsCleanPassAfterPass(id: Int) throws {
        let w = try selfcheck(6)
        var guest = try Guest(w, vcpu: id)
        for pass in UInt32(1)...5 {
            try guest.run(passes: 1)
            #expect(guest.cpu.dataWords == selfcheckImage(w, vcpu: id, pass: pass))
        }
        #expect(guest.passes == [1, 2, 3, 4, 5])
        #expect(guest.mismatches.isEmpty)
        // Every page is read (both words) and written on every pass.
        #expect(guest.cpu.accesses.count == 5 * 6 * 4)
    }

    /// A word corrupted while the guest is paused is reported exactly once, at its address,
    /// with the bad value, and the guest carries on.
    @Test(arguments: [(1, 0, 0), (9, 4, lastWord), (40, 0, lastWord), (55, 5, 0), (70, 2, lastWord)])
    func selfcheckReportsACorruptedWord(pause: Int, page: Int, offset: Int) throws {
        var guest = try Guest(try selfcheck(6))
        try guest.run(passes: 2)
        try guest.run(steps: pause)
        // Not the page under the cursor: a word already read there is about to be overwritten.
        let limit = guest.steps + 10_000
        while Int(guest.cpu[.edx] - chunkBase) / pageSize == page && guest.steps < limit { try guest.run(steps: 1) }
        try #require(guest.steps < limit, "the cursor stayed on page \(page)")
        let bad: UInt32 = 0xBAD0_0000 | UInt32(pause)
        guest.cpu.poke(guest.address(page: page, offset: offset), bad)
        try guest.run(passes: 3)
        #expect(guest.mismatches == [Mismatch(value: bad, address: guest.address(page: page, offset: offset))])
        #expect(guest.passes == [1, 2, 3, 4, 5])
        #expect(guest.cpu.dataWords == selfcheckImage(guest.workload, vcpu: 3, pass: 5))
    }

    @Test func mismatchExitCarriesTheExpectedValueAndPass() throws {
        var guest = try Guest(try selfcheck(4), vcpu: 1)
        try guest.run(passes: 2)
        guest.cpu.poke(guest.address(page: 3, offset: lastWord), 42)
        while guest.mismatches.isEmpty && guest.steps < 10_000 { try guest.run(steps: 1) }
        #expect(guest.mismatches == [Mismatch(value: 42, address: guest.address(page: 3, offset: lastWord))])
        #expect(guest.cpu[.eax] == 42 && guest.cpu[.ecx] == tag(1, 2) && guest.cpu[.ebp] == 3)
    }

    /// At every instruction boundary of several passes, the host-side expectation matches
    /// memory, and it leaves at most the page being checked open.
    @Test func expectedWordsHoldAfterEveryInstruction() throws {
        var guest = try Guest(try selfcheck(3, spin: 1), vcpu: 5)
        var openPauses = 0
        while guest.passes.count < 3 && guest.steps < 10_000 {
            let open = guest.checkExpectedWords("after \(guest.steps) steps")
            #expect(open <= 1)
            if open == 1 {
                openPauses += 1
                #expect((guest.cpu[.edx] - chunkBase) % UInt32(pageSize) == UInt32(lastWord))
            }
            try guest.run(steps: 1)
        }
        #expect(guest.passes == [1, 2, 3])
        #expect(openPauses > 0 && openPauses < guest.steps / 2)
        #expect(guest.mismatches.isEmpty)
    }

    /// Pause anywhere, copy registers, flags, eip and memory to a fresh interpreter, continue
    /// there: nothing is reported and the result is what the source would have produced.
    @Test(arguments: RunningWorkloadKind.allCases, [1, 2, 9, 31, 64, 100, 257, 600])
    func migrationAtAnyPointContinuesSeamlessly(kind: RunningWorkloadKind, pause: Int) throws {
        let w = try RunningWorkload(kind: kind, pagesPerVcpu: 5, spinIterations: 2)
        var source = try Guest(w, vcpu: 2)
        try source.run(steps: pause)
        if kind == .selfcheck { source.checkExpectedWords("source, paused after \(pause) steps") }

        var destination = try Guest(w, vcpu: 2)
        destination.cpu.state = source.cpu.state
        #expect(destination.registers == source.registers)
        if kind == .selfcheck { destination.checkExpectedWords("destination, paused after \(pause) steps") }
        try destination.run(passes: 3)
        try source.run(passes: 3)

        let completed = source.passes.count - 3
        #expect(destination.passes == source.passes.suffix(3))
        #expect(destination.passes.first == UInt32(completed + 1))
        #expect(source.mismatches.isEmpty && destination.mismatches.isEmpty)
        #expect(destination.cpu.state == source.cpu.state)
        let image = kind == .dirtier ? dirtierImage(w, vcpu: 2, passes: UInt32(completed + 3))
                                     : selfcheckImage(w, vcpu: 2, pass: UInt32(completed + 3))
        #expect(destination.cpu.dataWords == image)
    }

    /// Spinning costs exactly `1 + 2 * spinIterations` instructions per page and changes nothing
    /// in memory.
    @Test(arguments: RunningWorkloadKind.allCases)
    func spinChangesTimeNotMemory(kind: RunningWorkloadKind) throws {
        var results: [(steps: Int, image: [UInt32])] = []
        for spin: UInt32 in [0, 1, 7] {
            let w = try RunningWorkload(kind: kind, pagesPerVcpu: 6, workingSetPages: kind == .dirtier ? 4 : nil, spinIterations: spin)
            var guest = try Guest(w)
            try guest.run(passes: 3)
            #expect(guest.mismatches.isEmpty)
            results.append((guest.steps, guest.cpu.dataWords))
        }
        let pagesVisited = 3 * (kind == .dirtier ? 4 : 6)
        #expect(results.allSatisfy { $0.image == results[0].image })
        #expect(results[1].steps == results[0].steps + pagesVisited * 3)
        #expect(results[2].steps == results[0].steps + pagesVisited * 15)
    }

    @Test func tagsStartAtZeroAndNeverReturnToIt() {
        #expect(tag(5, 0) == 0)
        #expect(tag(5, 1) == 0x0500_0001)
        #expect(tag(0, 0xFF_FFFF) == 0xFF_FFFF)
        #expect(tag(0, 0x100_0000) == 1)  // wraps past 0
        #expect(tag(255, 0x100_0001) == 0xFF00_0002)
        #expect(tag(256 + 4, 9) == tag(4, 9))
        for pass: UInt32 in [1, 0xFF_FFFE, 0xFF_FFFF, 0x100_0000, 0x1FF_FFFE, 0x1FF_FFFF, 0xFFFF_FFFF] {
            #expect(tag(0, pass) != 0 && tag(0, pass) & 0xFF_FFFF != 0, "pass \(pass)")
            #expect(tag(9, pass) >> 24 == 9)
        }
    }

    /// The guest increments its tags itself; across the 24-bit wrap they must follow ``tag``.
    @Test(arguments: RunningWorkloadKind.allCases, [0, 255])
    func guestTagsWrapLikeTheHostsTags(kind: RunningWorkloadKind, id: Int) throws {
        let w = try RunningWorkload(kind: kind, pagesPerVcpu: 2)
        var guest = try Guest(w, vcpu: id)
        let start = RunningWorkload.tagCycle - 1
        var registers = guest.registers
        registers.ebp = start
        registers.ebx = tag(id, start)
        registers.ecx = kind == .dirtier ? UInt32(RunningWorkload.dirtierSecondWordOffset(pass: start)) : tag(id, start - 1)
        guest.registers = registers
        for page in 0..<2 where kind != .dirtier {
            for offset in [0, lastWord] { guest.cpu.poke(guest.address(page: page, offset: offset), tag(id, start - 1)) }
        }
        for pass in start..<start + 4 {
            try guest.run(passes: 1)
            #expect(guest.word(page: 1) == tag(id, pass), "pass \(pass)")
        }
        #expect(guest.passes == Array(start..<start + 4))
        #expect(guest.mismatches.isEmpty)
    }

    @Test func initialRegistersFollowTheConvention() throws {
        let check = try selfcheck(4).initialRegisters(vcpu: 2, chunkBase: 0x10_0000)
        #expect(check == RunningWorkloadRegisters(ecx: 0, edx: 0x10_0000, ebx: 0x0200_0001, ebp: 1, esi: 0x10_0000, edi: 0x10_4000))
        let dirty = try dirtier(4, workingSet: 2).initialRegisters(vcpu: 2, chunkBase: 0x10_0000)
        #expect(dirty == RunningWorkloadRegisters(ecx: 68, edx: 0x10_0000, ebx: 0x0200_0001, ebp: 1, esi: 0x10_0000, edi: 0x10_4000))
        var registers = RunningWorkloadRegisters()
        for register in X86Assembler.Register32.allCases { registers[register] = UInt32(register.rawValue) + 10 }
        #expect(registers == RunningWorkloadRegisters(eax: 10, ecx: 11, edx: 12, ebx: 13, esp: 14, ebp: 15, esi: 16, edi: 17))
    }

    @Test func expectedWordsRejectForeignStates() throws {
        let w = try selfcheck(4)
        let initial = w.initialRegisters(vcpu: 2, chunkBase: UInt64(chunkBase))
        #expect(w.expectedSelfcheckWords(vcpu: 2, registers: initial, page: 0)! == (0, 0))
        #expect(w.expectedSelfcheckWords(vcpu: 2, registers: initial, page: 4) == nil)
        #expect(w.expectedSelfcheckWords(vcpu: 2, registers: initial, page: -1) == nil)
        var passed = initial
        passed.edx += 2 * UInt32(pageSize)
        passed.ecx = tag(2, 1)
        passed.ebx = tag(2, 2)
        #expect(w.expectedSelfcheckWords(vcpu: 2, registers: passed, page: 1)! == (tag(2, 2), tag(2, 2)))
        #expect(w.expectedSelfcheckWords(vcpu: 2, registers: passed, page: 2)! == (tag(2, 1), tag(2, 1)))
        #expect(w.expectedSelfcheckWords(vcpu: 3, registers: passed, page: 1) == nil)   // another vCPU's tags
        #expect(try selfcheck(5).expectedSelfcheckWords(vcpu: 2, registers: passed, page: 1) == nil)  // chunk size
        #expect(try dirtier(4).expectedSelfcheckWords(vcpu: 2, registers: passed, page: 1) == nil)
        var misaligned = passed
        misaligned.edx += 8
        #expect(w.expectedSelfcheckWords(vcpu: 2, registers: misaligned, page: 0) == nil)
        var outside = passed
        outside.edx = chunkBase - UInt32(pageSize)
        #expect(w.expectedSelfcheckWords(vcpu: 2, registers: outside, page: 0) == nil)
    }

    /// The checks above are only worth something if they catch a broken guest.
    @Test func brokenSelfcheckIsCaught() throws {
        let w = try selfcheck(3)
        var code = try w.program()
        let firstStore = try #require(code.indices.first { code[$0] == 0x89 && code[$0 + 1] == 0x18 })  // mov [eax], ebx
        code[firstStore + 1] = 0x08  // mov [eax], ecx: first words keep the previous tag
        var guest = try Guest(w, code: code)
        try guest.run(passes: 2)
        #expect(guest.mismatches == (0..<3).map { Mismatch(value: 0, address: guest.address(page: $0)) })
    }

    @Test func invalidParametersAreRejected() throws {
        #expect(throws: RunningWorkloadError.invalidPageCount(0)) { try dirtier(0) }
        #expect(throws: RunningWorkloadError.invalidPageCount(-2)) { try selfcheck(-2) }
        let limit = RunningWorkload.maxPagesPerVcpu
        #expect(throws: RunningWorkloadError.tooManyPages(limit + 1, limit: limit)) { try selfcheck(limit + 1) }
        #expect(throws: Never.self) { try dirtier(limit, workingSet: limit) }
        #expect(throws: RunningWorkloadError.invalidWorkingSet(0, pagesPerVcpu: 8)) { try dirtier(8, workingSet: 0) }
        #expect(throws: RunningWorkloadError.invalidWorkingSet(9, pagesPerVcpu: 8)) { try dirtier(8, workingSet: 9) }
        #expect(throws: RunningWorkloadError.selfcheckNeedsWholeChunk(workingSetPages: 5, pagesPerVcpu: 8)) {
            try RunningWorkload(kind: .selfcheck, pagesPerVcpu: 8, workingSetPages: 5)
        }
        #expect(throws: Never.self) { try RunningWorkload(kind: .selfcheck, pagesPerVcpu: 8, workingSetPages: 8) }
        #expect(RunningWorkloadError.invalidPageCount(0).description.contains("at least 1 (got 0)"))
        #expect(RunningWorkloadError.invalidWorkingSet(9, pagesPerVcpu: 8).description.contains("1...8 pages"))
        #expect(RunningWorkloadError.selfcheckNeedsWholeChunk(workingSetPages: 5, pagesPerVcpu: 8).description
                .contains("selfcheck checks every page"))
        #expect(RunningWorkloadKind(rawValue: "selfcheck") == .selfcheck && RunningWorkloadKind(rawValue: "idle") == nil)
    }

    @Test func programsFitInTheCodePage() throws {
        for kind in RunningWorkloadKind.allCases {
            for spin: UInt32 in [0, .max] {
                let code = try RunningWorkload(kind: kind, pagesPerVcpu: RunningWorkload.maxPagesPerVcpu, spinIterations: spin).program()
                #expect(code.count < 160, "\(kind), spin \(spin): \(code.count) bytes")  // the code page is 4096
            }
        }
    }
}
