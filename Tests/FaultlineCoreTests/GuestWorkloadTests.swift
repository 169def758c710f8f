import Testing
@testable import FaultlineCore

// MARK: - Running workloads

/// The outcome of running one vCPU's program under the VMM's register convention.
private struct GuestRun {
    var cpu: MiniX86
    var chunkBase: UInt32
    var steps: Int

    /// Page index of every data access; `nil` for an access not at the start of a page.
    var touchedPages: [Int?] {
        cpu.accesses.map { access in
            let offset = Int(access.address - chunkBase)
            return offset % GuestWorkload.pageSize == 0 ? offset / GuestWorkload.pageSize : nil
        }
    }
}

/// Runs `workload`'s program for vCPU `id` with its chunk at `chunkBase`. `firstWords[i]` is
/// preloaded at the start of page `i`. With `scramble`, the registers the convention leaves at
/// 0 start with garbage instead, which a correct program must not depend on.
private func run(
    _ workload: GuestWorkload, vcpu id: Int, chunkBase: UInt32 = 0x0040_0000,
    firstWords: [UInt32] = [], scramble: Bool = false, code: [UInt8]? = nil
) throws -> GuestRun {
    let chunkEnd = chunkBase + UInt32(workload.chunkSize)
    var cpu = MiniX86(code: try code ?? workload.program(), at: UInt32(GuestWorkload.codeAddress),
                      data: chunkBase..<chunkEnd)
    for (page, word) in firstWords.enumerated() { cpu.poke(chunkBase + UInt32(page * GuestWorkload.pageSize), word) }
    if scramble {
        for register in [X86Assembler.Register32.ecx, .edx, .ebx, .esp] { cpu[register] = 0xDEAD_BEEF }
    }
    cpu[.esi] = chunkBase
    cpu[.edi] = chunkEnd
    cpu[.eax] = GuestWorkload.storeValue(forVcpu: id)
    cpu[.ebp] = workload.seed(forVcpu: id)
    let steps = try cpu.run(maxSteps: 64 * workload.pagesPerVcpu + 1_000)
    return GuestRun(cpu: cpu, chunkBase: chunkBase, steps: steps)
}

private let allPatterns: [AccessPattern] = [.sequential, .read, .random(seed: 1), .random(seed: 0xFEED), .stride(pages: 8), .stride(pages: 3)]
private let sizes = [1, 2, 3, 255, 256, 1000, 1024]

private func workload(_ pattern: AccessPattern, _ pages: Int) throws -> GuestWorkload {
    try GuestWorkload(pattern: pattern, pagesPerVcpu: pages)
}

/// Checks that `touched` is exactly `expected`, reporting the first difference rather than
/// both (possibly 1000-element) arrays.
private func expectSameOrder(
    _ touched: [Int?], _ expected: [Int], _ context: String = "", sourceLocation: SourceLocation = #_sourceLocation
) {
    guard let index = (0..<max(touched.count, expected.count)).first(where: {
        $0 >= touched.count || $0 >= expected.count || touched[$0] != expected[$0]
    }) else { return }
    let got = index < touched.count ? touched[index].map(String.init) ?? "mid-page address" : "nothing"
    let want = index < expected.count ? String(expected[index]) : "nothing"
    let counts = "\(touched.count) accesses, \(expected.count) expected"
    Issue.record("\(context) access #\(index) touched page \(got), expected \(want) (\(counts))",
                 sourceLocation: sourceLocation)
}

/// A simple deterministic word per page, for the `read` program to sum.
private func word(forPage page: Int) -> UInt32 { UInt32(truncatingIfNeeded: page) &* 0x9E37_79B9 ^ 0xA5A5_0000 }

// MARK: - Tests

@Suite("Guest workloads")
struct GuestWorkloadTests {
    @Test func sequentialProgramIsTheReferenceBytes() throws {
        for pages in [1, 17, 1 << 20] {
            #expect(try workload(.sequential, pages).program()
                    == [0x89, 0x06, 0x81, 0xC6, 0x00, 0x10, 0x00, 0x00, 0x39, 0xFE, 0x72, 0xF4, 0xF4])
        }
    }

    @Test(arguments: allPatterns, sizes)
    func pageOrderIsAPermutation(pattern: AccessPattern, pages: Int) throws {
        let w = try workload(pattern, pages)
        for id in [0, 1, 5] {
            let order = w.pageOrder(forVcpu: id)
            #expect(order.count == pages)
            #expect(order.sorted() == Array(0..<pages))
        }
    }

    /// The heart of the suite: the machine code, run instruction by instruction, touches
    /// exactly the pages of `pageOrder`, in that order, and stores or sums the right values.
    @Test(arguments: allPatterns, sizes)
    func machineCodeFollowsPageOrder(pattern: AccessPattern, pages: Int) throws {
        let w = try workload(pattern, pages)
        let words = (0..<pages).map(word(forPage:))
        for id in [0, 3] {
            for scramble in [false, true] {
                let result = try run(w, vcpu: id, firstWords: words, scramble: scramble)
                let expected = w.pageOrder(forVcpu: id)
                expectSameOrder(result.touchedPages, expected, "vCPU \(id), scramble \(scramble):")
                #expect(result.cpu.accesses.allSatisfy { $0.isWrite == w.writes })
                #expect(result.cpu.portWrites.isEmpty)
                if w.writes {
                    let value = GuestWorkload.storeValue(forVcpu: id)
                    #expect(result.cpu.accesses.allSatisfy { $0.value == value })
                    #expect((0..<pages).allSatisfy { result.cpu.peek(result.chunkBase + UInt32($0 * 4096)) == value })
                } else {
                    #expect(result.cpu[.edx] == GuestWorkload.expectedReadChecksum(firstWords: expected.map { words[$0] }))
                    #expect(result.cpu[.edx] == GuestWorkload.expectedReadChecksum(firstWords: words))
                }
            }
        }
    }

    @Test func randomLoopRunsExactlyTheNextPowerOfTwo() throws {
        for (pages, period) in [(1, 1), (2, 2), (3, 4), (255, 256), (256, 256), (257, 512), (1000, 1024)] {
            let result = try run(workload(.random(seed: 9), pages), vcpu: 2)
            #expect(result.cpu.executed[0x69] == period, "\(pages) pages")  // one imul per LCG step
        }
    }

    @Test func machineCodeWorksAtOtherChunkAddresses() throws {
        let w = try workload(.random(seed: 77), 300)
        for base: UInt32 in [0x2000, 0x1000_0000, 0xFFFF_F000 - 300 * 4096] {
            let result = try run(w, vcpu: 1, chunkBase: base)
            expectSameOrder(result.touchedPages, w.pageOrder(forVcpu: 1), "chunk at \(base):")
        }
    }

    @Test func readChecksumWraps() {
        #expect(GuestWorkload.expectedReadChecksum(firstWords: []) == 0)
        #expect(GuestWorkload.expectedReadChecksum(firstWords: [0xFFFF_FFFF, 2]) == 1)
        #expect(GuestWorkload.expectedReadChecksum(firstWords: [1, 2, 3]) == 6)
    }

    /// The interpreter check is only worth something if it catches wrong code.
    @Test func interpreterCatchesWrongPrograms() throws {
        let w = try workload(.sequential, 8)
        var skipping = try w.program()
        skipping[5] = 0x20  // add esi, 0x2000: every other page
        let skipped = try run(w, vcpu: 0, code: skipping)
        #expect(skipped.touchedPages != w.pageOrder(forVcpu: 0))

        var reversed = try w.program()
        reversed[10] = 0x73  // jae instead of jb: stops after one page
        #expect(try run(w, vcpu: 0, code: reversed).touchedPages == [0])

        var endless = try w.program()
        endless[11] = 0xFE  // jb to itself
        #expect(throws: MiniX86.Fault.stepLimitExceeded) { try run(w, vcpu: 0, code: endless) }

        let r = try workload(.random(seed: 4), 100)
        var badMask = try r.program()
        let andIndex = try #require(badMask.indices.last { badMask[$0] == 0x81 && badMask[$0 + 1] == 0xE3 })
        badMask[andIndex + 2] = 0xFF  // the LCG step masks with 0xff instead of 0x7f
        #expect((try? run(r, vcpu: 0, code: badMask))?.touchedPages != r.pageOrder(forVcpu: 0))
    }

    @Test func randomOrdersDependOnSeedAndVcpu() throws {
        let one = try workload(.random(seed: 1), 256), two = try workload(.random(seed: 2), 256)
        #expect(one.pageOrder(forVcpu: 0) != two.pageOrder(forVcpu: 0))
        #expect(one.pageOrder(forVcpu: 0) != one.pageOrder(forVcpu: 1))
        #expect(one.pageOrder(forVcpu: 0) == one.pageOrder(forVcpu: 0))
        #expect(one.pageOrder(forVcpu: 0) != Array(0..<256))
        #expect(try one.seed(forVcpu: 3) == workload(.random(seed: 1), 10).seed(forVcpu: 3))
        // Not merely rotations of one cycle: the successor of page 0 varies with the seed.
        let successors = Set((1...20).map { seed -> Int in
            let order = try! workload(.random(seed: UInt32(seed)), 256).pageOrder(forVcpu: 0)
            return order[(order.firstIndex(of: 0)! + 1) % order.count]
        })
        #expect(successors.count > 1)
        // Seeds differ across vCPUs; non-random patterns leave ebp unused.
        #expect(Set((0..<64).map(one.seed(forVcpu:))).count == 64)
        #expect(try workload(.sequential, 4).seed(forVcpu: 7) == 0)
    }

    @Test func strideOrderMatchesDefinition() throws {
        #expect(try workload(.stride(pages: 3), 10).pageOrder(forVcpu: 0) == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8])
        #expect(try workload(.stride(pages: 1), 4).pageOrder(forVcpu: 0) == [0, 1, 2, 3])
        #expect(try workload(.stride(pages: 100), 3).pageOrder(forVcpu: 0) == [0, 1, 2])
        for (pages, s) in [(1000, 8), (1024, 7), (255, 16), (5, 5)] {
            var reference: [Int] = []
            for start in 0..<s {
                var i = start
                while i < pages { reference.append(i); i += s }
            }
            #expect(try workload(.stride(pages: s), pages).pageOrder(forVcpu: 2) == reference)
        }
        // A stride far beyond the chunk still runs correctly in machine code.
        let huge = try workload(.stride(pages: Int.max), 5)
        #expect(try run(huge, vcpu: 0).touchedPages == [0, 1, 2, 3, 4])
    }

    @Test func invalidWorkloadsAreRejected() {
        #expect(throws: GuestWorkloadError.invalidPageCount(0)) { try workload(.sequential, 0) }
        #expect(throws: GuestWorkloadError.invalidPageCount(-3)) { try workload(.read, -3) }
        #expect(throws: GuestWorkloadError.tooManyPages((1 << 20) + 1, limit: 1 << 20)) {
            try workload(.random(seed: 1), (1 << 20) + 1)
        }
        #expect(throws: GuestWorkloadError.invalidStride(0)) { try workload(.stride(pages: 0), 8) }
        #expect(throws: GuestWorkloadError.invalidStride(-1)) { try workload(.stride(pages: -1), 8) }
        #expect(GuestWorkloadError.invalidStride(0).description.contains("stride must be at least 1"))
        #expect(throws: Never.self) { try workload(.stride(pages: 1), 1 << 20) }
    }

    @Test func patternNamesParseAndRoundTrip() {
        #expect(AccessPattern(name: "sequential") == .sequential)
        #expect(AccessPattern(name: "read") == .read)
        #expect(AccessPattern(name: "random") == .random(seed: 1))
        #expect(AccessPattern(name: "stride") == .stride(pages: 8))
        #expect(AccessPattern(name: "random:42") == .random(seed: 42))
        #expect(AccessPattern(name: "stride:3") == .stride(pages: 3))
        #expect(AccessPattern(name: "Sequential") == .sequential)
        for bad in ["", "write", "random:", "random:x", "stride:1.5", "read:1", "sequential:"] {
            #expect(AccessPattern(name: bad) == nil, "\(bad)")
        }
        for pattern in allPatterns { #expect(AccessPattern(name: pattern.description) == pattern) }
        #expect(AccessPattern.names.allSatisfy { AccessPattern(name: $0)?.name == $0 })
    }

    @Test func registerConventionValues() throws {
        #expect(GuestWorkload.storeValue(forVcpu: 0) == 0xC0DE_0000)
        #expect(GuestWorkload.storeValue(forVcpu: 7) == 0xC0DE_0007)
        #expect(GuestWorkload.codeAddress == 0x1000)
        #expect(try workload(.read, 3).writes == false)
        #expect(try workload(.stride(pages: 2), 3).writes)
        #expect(try workload(.read, 3).chunkSize == 3 * 4096)
        for pattern in allPatterns {
            let code = try workload(pattern, 1 << 20).program()
            #expect(code.last == 0xF4 && code.count < 256, "\(pattern)")
        }
    }
}
