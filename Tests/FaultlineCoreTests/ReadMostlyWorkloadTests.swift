import Testing
@testable import FaultlineCore

private let chunkBase: UInt32 = 0x0040_0000
private let pageSize = GuestWorkload.pageSize
private let lastWord = RunningWorkload.lastWordOffset

/// One vCPU running a readmostly workload in the interpreter, its port exits handled as the
/// VMM handles them (counted, then resumed).
private struct ReadMostlyGuest {
    let workload: RunningWorkload
    let id: Int
    var cpu: MiniX86
    private(set) var steps = 0
    private(set) var passes: [UInt32] = []
    private(set) var mismatches: [(value: UInt32, address: UInt32)] = []

    init(pages: Int, workingSet: Int, vcpu id: Int = 4) throws {
        workload = try RunningWorkload(kind: .readmostly, pagesPerVcpu: pages, workingSetPages: workingSet)
        self.id = id
        cpu = MiniX86(code: try workload.program(), at: UInt32(GuestWorkload.codeAddress),
                      data: chunkBase..<chunkBase + UInt32(workload.chunkSize))
        let r = workload.initialRegisters(vcpu: id, chunkBase: UInt64(chunkBase))
        for register in X86Assembler.Register32.allCases { cpu[register] = r[register] }
    }

    mutating func run(steps count: Int) throws {
        var left = count
        while left > 0 { left -= try resume(maxSteps: left) }
    }

    mutating func run(passes count: Int) throws {
        let target = passes.count + count, limit = steps + 200_000
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
        case .out(port: UInt16(RunningWorkload.mismatchPort), let value): mismatches.append((value, cpu[.edx]))
        case .stepLimit: break
        case let other: Issue.record("unexpected stop: \(other)")
        }
        return ran
    }

    func address(page: Int, offset: Int = 0) -> UInt32 { chunkBase + UInt32(page * pageSize + offset) }
    func word(page: Int, offset: Int = 0) -> UInt32 { cpu.peek(address(page: page, offset: offset)) }

    /// The chunk after pass `pass`: pages of the working set hold that pass's tag, the others
    /// pass 1's, both in their first and last word.
    func image(afterPass pass: UInt32) -> [UInt32] {
        var image = [UInt32](repeating: 0, count: Int(workload.chunkSize) / 4)
        for page in 0..<workload.pagesPerVcpu {
            let value = page < workload.workingSetPages ? RunningWorkload.tag(vcpu: id, pass: pass)
                                                        : RunningWorkload.readMostlyColdValue(vcpu: id)
            image[page * pageSize / 4] = value
            image[(page * pageSize + lastWord) / 4] = value
        }
        return image
    }
}

@Suite("Readmostly workload")
struct ReadMostlyWorkloadTests {
    /// Pass 1 writes every page; from pass 2 on every page is read (both words) and only the
    /// working set is written: exactly two stores per working-set page per pass.
    @Test(arguments: [0, 9, 255])
    func readsEverythingAndWritesOnlyTheWorkingSet(id: Int) throws {
        var guest = try ReadMostlyGuest(pages: 10, workingSet: 3, vcpu: id)
        try guest.run(passes: 1)
        #expect(guest.cpu.dataWords == guest.image(afterPass: 1))
        #expect(guest.cpu.accesses.filter(\.isWrite).count == 2 * 10)
        for pass in UInt32(2)...5 {
            let before = guest.cpu.accesses.count
            try guest.run(passes: 1)
            let accesses = guest.cpu.accesses[before...]
            #expect(guest.cpu.dataWords == guest.image(afterPass: pass), "pass \(pass)")
            let written = Set(accesses.filter(\.isWrite).map { Int($0.address - chunkBase) / pageSize })
            #expect(written == Set(0..<3), "pass \(pass) writes the working set only")
            #expect(accesses.filter(\.isWrite).count == 2 * 3)
            let read = Set(accesses.filter { !$0.isWrite }.map { Int($0.address - chunkBase) / pageSize })
            #expect(read == Set(0..<10), "pass \(pass) reads every page")
        }
        #expect(guest.passes == [1, 2, 3, 4, 5])
        #expect(guest.mismatches.isEmpty)
        #expect(guest.cpu[.esp] == RunningWorkload.readMostlyColdValue(vcpu: id))
    }

    /// A word changed outside the working set (where the guest only reads) is reported once,
    /// at its address, and stays as it is: the guest does not write there.
    @Test(arguments: [(5, 0), (9, lastWord)])
    func aChangedReadOnlyPageIsReported(page: Int, offset: Int) throws {
        var guest = try ReadMostlyGuest(pages: 10, workingSet: 3)
        try guest.run(passes: 2)
        guest.cpu.poke(guest.address(page: page, offset: offset), 0xBAD)
        try guest.run(passes: 2)
        #expect(guest.mismatches.count == 2, "reported on each of the two passes")
        #expect(guest.mismatches.allSatisfy { $0.value == 0xBAD && $0.address == guest.address(page: page, offset: offset) })
        #expect(guest.word(page: page, offset: offset) == 0xBAD)
    }

    /// Paused anywhere and continued in another interpreter (a restore): the same result, and
    /// nothing reported.
    @Test(arguments: [1, 2, 50, 333, 700, 1500])
    func continuesAfterAPauseAnywhere(pause: Int) throws {
        var source = try ReadMostlyGuest(pages: 7, workingSet: 2)
        try source.run(steps: pause)
        var clone = try ReadMostlyGuest(pages: 7, workingSet: 2)
        clone.cpu.state = source.cpu.state
        try clone.run(passes: 3)
        try source.run(passes: 3)
        #expect(clone.cpu.state == source.cpu.state)
        #expect(clone.passes == source.passes.suffix(3))
        #expect(clone.mismatches.isEmpty && source.mismatches.isEmpty)
        #expect(clone.cpu.dataWords == clone.image(afterPass: clone.passes.last!))
    }

    @Test func theWorkingSetIsCheckedAndMayBeAnyPartOfTheChunk() throws {
        #expect(throws: RunningWorkloadError.invalidWorkingSet(9, pagesPerVcpu: 8)) {
            try RunningWorkload(kind: .readmostly, pagesPerVcpu: 8, workingSetPages: 9)
        }
        #expect(throws: Never.self) { try RunningWorkload(kind: .readmostly, pagesPerVcpu: 8, workingSetPages: 1) }
        #expect(try RunningWorkload(kind: .readmostly, pagesPerVcpu: 8).workingSetPages == 8)
        let long = try RunningWorkload(kind: .readmostly, pagesPerVcpu: 1 << 20, workingSetPages: 1 << 19, mode: .long64)
        #expect(try long.program().count < 256)
    }
}
