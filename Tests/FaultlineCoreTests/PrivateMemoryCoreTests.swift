import Testing
@testable import FaultlineCore

@Suite("Private memory: the shared/private range map")
struct PrivateMemoryMapTests {
    let base: UInt64 = 0x10_0000
    func map(pages: UInt64 = 16, initial: MemorySharing = .private) throws -> SharingMap {
        try SharingMap(memory: GuestMemoryRange(start: GuestPhysicalAddress(base), size: pages * 4096)!, initial: initial)
    }
    func layout(_ m: SharingMap) -> [String] { m.pages.entries.map { "\($0.range.lowerBound)..<\($0.range.upperBound) \($0.value)" } }

    @Test func splitInTheMiddleThenMergeBack() throws {
        var m = try map()
        let changed = try m.convert(gpa: base + 4 * 4096, size: 2 * 4096, to: .shared)
        #expect(changed == [4..<6])
        #expect(layout(m) == ["0..<4 private", "4..<6 shared", "6..<16 private"])
        #expect(m.state(at: base + 5 * 4096 + 123) == .shared && m.state(at: base + 6 * 4096) == .private)
        #expect(try m.convert(gpa: base + 4 * 4096, size: 2 * 4096, to: .private) == [4..<6])
        #expect(layout(m) == ["0..<16 private"])
    }

    @Test func adjacentConversionsCoalesce() throws {
        var m = try map()
        try m.convert(gpa: base, size: 4096, to: .shared)
        try m.convert(gpa: base + 4096, size: 4096, to: .shared)
        try m.convert(gpa: base + 3 * 4096, size: 4096, to: .shared)
        #expect(layout(m) == ["0..<2 shared", "2..<3 private", "3..<4 shared", "4..<16 private"])
        try m.convert(gpa: base + 2 * 4096, size: 4096, to: .shared)
        #expect(layout(m) == ["0..<4 shared", "4..<16 private"])
        #expect(m.count(.shared) == 4 && m.count(.private) == 12)
    }

    @Test func wholeRangeConversionsReportOnlyWhatChanged() throws {
        var m = try map()
        try m.convert(gpa: base + 3 * 4096, size: 4096, to: .shared)
        try m.convert(gpa: base + 9 * 4096, size: 3 * 4096, to: .shared)
        // Everything to shared: only the private pieces change.
        #expect(try m.convert(gpa: base, size: 16 * 4096, to: .shared) == [0..<3, 4..<9, 12..<16])
        #expect(layout(m) == ["0..<16 shared"])
        // Again: nothing changes.
        #expect(try m.convert(gpa: base, size: 16 * 4096, to: .shared) == [])
        #expect(try m.convert(gpa: base, size: 16 * 4096, to: .private) == [0..<16])
        #expect(layout(m) == ["0..<16 private"])
    }

    @Test func refusalsNameTheProblem() throws {
        var m = try map()
        let before = m
        #expect(throws: ConversionError.unaligned(gpa: base + 100, size: 4096)) { try m.convert(gpa: base + 100, size: 4096, to: .shared) }
        #expect(throws: ConversionError.unaligned(gpa: base, size: 100)) { try m.convert(gpa: base, size: 100, to: .shared) }
        #expect(throws: ConversionError.empty(gpa: base)) { try m.convert(gpa: base, size: 0, to: .shared) }
        #expect(throws: ConversionError.self) { try m.convert(gpa: base + 15 * 4096, size: 2 * 4096, to: .shared) }
        #expect(throws: ConversionError.self) { try m.convert(gpa: 0, size: 4096, to: .shared) }
        #expect(throws: ConversionError.overflow(gpa: UInt64.max - 4095, size: 8192)) {
            try m.convert(gpa: UInt64.max - 4095, size: 8192, to: .shared)
        }
        #expect(m == before)
        do {
            try m.convert(gpa: base + 15 * 4096, size: 2 * 4096, to: .private)
            Issue.record("converted past the end")
        } catch {
            #expect("\(error)" == "conversion of gpa 0x10f000 size 0x2000: outside guest memory (private-capable memory is [0x100000, 0x110000))")
        }
        #expect("\(ConversionError.unaligned(gpa: 0x100010, size: 0x1000))".contains("not page aligned"))
        #expect(throws: ConversionError.unaligned(gpa: 0x100, size: 4096)) {
            try SharingMap(memory: GuestMemoryRange(start: GuestPhysicalAddress(0x100), size: 4096)!, initial: .shared)
        }
    }
}

@Suite("Private memory: discard policies")
struct PrivateMemoryDiscardTests {
    @Test func eagerDiscardsTheStaleBackingEveryTime() {
        var p = DiscardPlanner(policy: .eager)
        #expect(p.converted([0..<2, 5..<6], to: .shared) == [
            DiscardOperation(pages: 0..<2, backing: .private), DiscardOperation(pages: 5..<6, backing: .private),
        ])
        #expect(p.converted([0..<2], to: .private) == [DiscardOperation(pages: 0..<2, backing: .shared)])
        #expect(p.pendingPages == 0 && p.flush().isEmpty)
    }

    @Test func lazyCancelsABounceBufferRoundTrip() {
        var p = DiscardPlanner(policy: .lazy(batchPages: 512))
        for _ in 0..<1000 {
            #expect(p.converted([7..<8], to: .shared).isEmpty)
            #expect(p.converted([7..<8], to: .private).isEmpty)
        }
        // The page flipped 2000 times; one discard is pending (its shared backing), 1999 were cancelled.
        #expect(p.pendingPages == 1 && p.cancelledPages == 1999)
        #expect(p.flush() == [DiscardOperation(pages: 7..<8, backing: .shared)])
        #expect(p.pendingPages == 0)
    }

    @Test func lazyCoalescesAndFlushesAtTheBatchSize() {
        var p = DiscardPlanner(policy: .lazy(batchPages: 4))
        #expect(p.converted([0..<1], to: .shared).isEmpty)
        #expect(p.converted([1..<2], to: .shared).isEmpty)
        #expect(p.converted([5..<6], to: .private).isEmpty)
        // The fourth page reaches the batch: adjacent pages with the same stale backing are one operation.
        #expect(p.converted([2..<3], to: .shared) == [
            DiscardOperation(pages: 0..<3, backing: .private), DiscardOperation(pages: 5..<6, backing: .shared),
        ])
        #expect(p.pendingPages == 0 && p.cancelledPages == 0)
    }
}

@Suite("Private memory: KVM_HC_MAP_GPA_RANGE, contents, the guest program")
struct PrivateMemoryHypercallTests {
    @Test func decodesTheHypercallArguments() throws {
        #expect(try MapGPARange.decode(gpa: 0x10_0000, pages: 2, attributes: 0x10).get()
                == MapGPARange.Request(gpa: 0x10_0000, size: 8192, target: .private))
        #expect(try MapGPARange.decode(gpa: 0x10_0000, pages: 1, attributes: 0x1).get().target == .shared)  // 2M size hint, decrypted
        #expect(throws: ConversionError.unknownAttributes(0x20)) { try MapGPARange.decode(gpa: 0, pages: 1, attributes: 0x20).get() }
        #expect(throws: ConversionError.unknownAttributes(0x3)) { try MapGPARange.decode(gpa: 0, pages: 1, attributes: 0x3).get() }
        #expect(throws: ConversionError.empty(gpa: 0)) { try MapGPARange.decode(gpa: 0, pages: 0, attributes: 0).get() }
        #expect(throws: ConversionError.self) { try MapGPARange.decode(gpa: 0, pages: UInt64.max, attributes: 0).get() }
        #expect(MapGPARange.returnValue(nil) == 0)
        #expect(Int64(bitPattern: MapGPARange.returnValue(.empty(gpa: 0))) == -22)
    }

    @Test func ledgerExpectsContentsUntilADiscard() {
        var l = ContentLedger()
        #expect(l.expected(page: 3, backing: .private) == 0)
        l.wrote(page: 3, backing: .private, value: 0x5000_0002)
        #expect(l.expected(page: 3, backing: .private) == 0x5000_0002)
        #expect(l.expected(page: 3, backing: .shared) == 0)
        l.record(DiscardOperation(pages: 4..<8, backing: .private))
        #expect(l.expected(page: 3, backing: .private) == 0x5000_0002)
        l.record(DiscardOperation(pages: 0..<4, backing: .private))
        #expect(l.expected(page: 3, backing: .private) == 0)
        l.wrote(page: 3, backing: .private, value: 0x5000_0004)
        #expect(l.expected(page: 3, backing: .private) == 0x5000_0004)
    }

    @Test func hypercallAndDisplacementEncodings() throws {
        var a = X86Assembler()
        a.vmcall()
        a.vmmcall()
        a.store(.eax, to: .esi, displacement: 0x0C)
        a.load(.ecx, from: .ebx, displacement: 4092)
        a.load(.eax, from: .esp, displacement: -4)
        #expect(try a.assemble() == [0x0F, 0x01, 0xC1, 0x0F, 0x01, 0xD9, 0x89, 0x46, 0x0C,
                                     0x8B, 0x8B, 0xFC, 0x0F, 0x00, 0x00, 0x8B, 0x44, 0x24, 0xFC])
    }

    @Test func guestProgramChecksItsConfiguration() throws {
        var c = ConversionGuest.Config()
        c.hypercall = .vmmcall
        let g = try ConversionGuest(c)
        #expect(!g.code.isEmpty && g.code.count < 4096 - Int(ConversionGuest.codeGPA % 4096))
        #expect(g.code.contains(0xD9) && g.bufferGPA == 0x10_C000)
        c.bufferPage = 16
        #expect(throws: ConversionGuest.ConfigError.self) { try ConversionGuest(c) }
        c.bufferPage = 0
        c.regionPages = 1000
        #expect(throws: ConversionGuest.ConfigError.self) { try ConversionGuest(c) }
        c.regionPages = 16
        c.prologue = [.init(firstPage: 10, pages: 7, target: .shared)]
        #expect(throws: ConversionGuest.ConfigError.self) { try ConversionGuest(c) }
        #expect(ConversionGuest.target(ofPhase: 1) == .shared && ConversionGuest.target(ofPhase: 2) == .private)
        #expect(ConversionGuest.value(phase: 3, state: .shared) == 0x5300_0003)
        #expect(ConversionGuest.marker(readback: 1, page: 5) != ConversionGuest.marker(readback: 0, page: 5))
    }
}

/// The conversion guest run by the interpreter against a minimal model of KVM: per-page
/// attributes and two backings (shared, private) for the words the program touches; a
/// conversion swaps the page's visible words between them; `discard` zeroes the stale one.
@Suite("Private memory: the conversion guest, interpreted")
struct PrivateMemoryGuestInterpretedTests {
    struct Outcome { var status: UInt32; var phase: UInt32; var hypercalls = 0; var readbacks: [[UInt32]] = [] }

    func run(discard: Bool, conversions: Int) throws -> Outcome {
        var c = ConversionGuest.Config()
        c.conversions = conversions
        c.regionPages = 4
        c.bufferPage = 3
        c.prologue = [.init(firstPage: 0, pages: 4, target: .shared), .init(firstPage: 2, pages: 2, target: .private)]
        let g = try ConversionGuest(c)
        let words = [0, ConversionGuest.markerOffset, 4092].map(UInt32.init)
        var m = MiniX86(code: g.code, at: UInt32(ConversionGuest.codeGPA),
                        data: UInt32(ConversionGuest.mailboxGPA)..<UInt32(c.regionGPA + c.regionPages * 4096))
        var map = try SharingMap(memory: GuestMemoryRange(start: GuestPhysicalAddress(c.regionGPA), size: c.regionPages * 4096)!,
                                 initial: .private)
        var backing: [MemorySharing: [UInt32: UInt32]] = [.shared: [:], .private: [:]]  // address -> word, the hidden backing
        var outcome = Outcome(status: 0, phase: 0)
        let mailbox = UInt32(ConversionGuest.mailboxGPA)
        while true {
            let (stop, _) = try m.resume(maxSteps: 10_000)
            switch stop {
            case .hypercall:
                outcome.hypercalls += 1
                let request = try MapGPARange.decode(gpa: UInt64(m[.ebx]), pages: UInt64(m[.ecx]), attributes: UInt64(m[.edx])).get()
                let changed = try map.convert(gpa: request.gpa, size: request.size, to: request.target)
                for range in changed {
                    for page in range {
                        let base = UInt32(c.regionGPA + page * 4096)
                        for w in words {  // hide the old state's words, show the new state's
                            backing[request.target.other]![base + w] = discard ? 0 : m.peek(base + w)
                            m.poke(base + w, backing[request.target]![base + w, default: 0])
                        }
                    }
                }
                m[.eax] = 0
            case .out(let port, let r) where port == UInt16(ConversionGuest.readbackRequestPort):
                for page in 0..<c.regionPages {  // the marker goes into the shared backing
                    let address = UInt32(c.regionGPA + page * 4096) + UInt32(ConversionGuest.markerOffset)
                    let marker = ConversionGuest.marker(readback: r, page: page)
                    if map.state(ofPage: page) == .shared { m.poke(address, marker) } else { backing[.shared]![address] = marker }
                }
            case .out(let port, _) where port == UInt16(ConversionGuest.readbackDonePort):
                outcome.readbacks.append((0..<Int(c.regionPages)).map { m.peek(mailbox + UInt32(ConversionGuest.Mailbox.readback + 4 * $0)) })
            case .halt:
                outcome.status = m.peek(mailbox + UInt32(ConversionGuest.Mailbox.status))
                outcome.phase = m.peek(mailbox + UInt32(ConversionGuest.Mailbox.phase))
                return outcome
            default:
                Issue.record("unexpected stop \(stop)")
                return outcome
            }
        }
    }

    @Test func keepsContentsWithoutDiscardAndReadsBackTheMap() throws {
        let o = try run(discard: false, conversions: 101)
        #expect(o.status == ConversionGuest.Status.done.rawValue && o.phase == 101 && o.hypercalls == 103)
        // Pages 0-1 shared (markers), 2 private (0), 3 (the buffer) private at first, shared after 101 conversions.
        #expect(o.readbacks.count == 2)
        #expect(o.readbacks[0] == [ConversionGuest.marker(readback: 0, page: 0), ConversionGuest.marker(readback: 0, page: 1), 0, 0])
        #expect(o.readbacks[1][3] == ConversionGuest.marker(readback: 1, page: 3) && o.readbacks[1][2] == 0)
    }

    @Test func discardingStillSatisfiesTheGuestCheck() throws {
        let o = try run(discard: true, conversions: 100)
        #expect(o.status == ConversionGuest.Status.done.rawValue && o.phase == 100)
    }

    @Test func aBackingShowingForeignDataStopsTheGuest() throws {
        // Model a broken kernel: conversions that do not swap backings. The guest sees its
        // own shared value while private (or vice versa) and stops with status 2.
        var c = ConversionGuest.Config()
        c.conversions = 10
        c.readbacks = false
        let g = try ConversionGuest(c)
        var m = MiniX86(code: g.code, at: UInt32(ConversionGuest.codeGPA),
                        data: UInt32(ConversionGuest.mailboxGPA)..<UInt32(c.regionGPA + c.regionPages * 4096))
        while true {
            let (stop, _) = try m.resume(maxSteps: 10_000)
            if stop == .hypercall { m[.eax] = 0; continue }
            #expect(stop == .halt)
            break
        }
        #expect(m.peek(UInt32(ConversionGuest.mailboxGPA) + UInt32(ConversionGuest.Mailbox.status)) == ConversionGuest.Status.contentMismatch.rawValue)
        #expect(m.peek(UInt32(ConversionGuest.mailboxGPA) + UInt32(ConversionGuest.Mailbox.phase)) == 1)
    }
}
