import Testing
import FaultlineCore
@testable import FaultlineEngine

/// A kernel that records what it is asked and can be told to fail.
final class FakePrivateMemoryKernel: PrivateMemoryKernel {
    var calls: [String] = []
    var failAttributes = false
    /// The attributes as the fake kernel holds them, page number -> private.
    var privatePages: Set<UInt64> = []

    func setMemoryAttributes(gpa: UInt64, size: UInt64, private: Bool) throws {
        if failAttributes { throw MemoryFaultRefusal(description: "KVM_SET_MEMORY_ATTRIBUTES: ENOMEM (fake)") }
        calls.append("attributes 0x\(String(gpa, radix: 16))+\(size / 4096) \(`private` ? "private" : "shared")")
        for p in (gpa / 4096)..<((gpa + size) / 4096) {
            if `private` { privatePages.insert(p) } else { privatePages.remove(p) }
        }
    }

    func discard(offset: UInt64, length: UInt64, backing: MemorySharing) throws {
        calls.append("discard \(backing) +\(offset / 4096)+\(length / 4096)")
    }
}

@Suite("Private memory: the conversion controller (fake kernel)")
struct PrivateMemoryControllerTests {
    let base: UInt64 = 0x10_0000
    func controller(_ policy: DiscardPolicy, kernel: FakePrivateMemoryKernel) throws -> ConversionController {
        let map = try SharingMap(memory: GuestMemoryRange(start: GuestPhysicalAddress(base), size: 8 * 4096)!, initial: .private)
        kernel.privatePages = Set((base / 4096)..<(base / 4096 + 8))  // the region starts private on both sides
        var t: UInt64 = 0
        return ConversionController(map: map, policy: policy, kernel: kernel, clock: { t += 10; return t })
    }

    @Test func hypercallConvertsAndDiscardsEagerly() throws {
        let k = FakePrivateMemoryKernel()
        let c = try controller(.eager, kernel: k)
        #expect(try c.mapGPARange(gpa: base + 4096, pages: 2, attributes: 0) == 0)
        #expect(try c.mapGPARange(gpa: base + 4096, pages: 1, attributes: MapGPARange.encrypted) == 0)
        #expect(try c.mapGPARange(gpa: base + 4096, pages: 1, attributes: MapGPARange.encrypted) == 0)  // already private
        #expect(k.calls == ["attributes 0x101000+2 shared", "discard private +1+2", "attributes 0x101000+1 private", "discard shared +1+1"])
        #expect(c.costs.conversions == 2 && c.costs.unchanged == 1 && c.costs.discardCalls == 2)
        #expect(c.costs.discardedPrivatePages == 2 && c.costs.discardedSharedPages == 1)
        #expect(c.map.state(at: base + 2 * 4096) == .shared && c.map.state(at: base + 4096) == .private)
        // The range map and the (fake) kernel agree page by page.
        for page in 0..<UInt64(8) {
            #expect((c.map.state(ofPage: page) == .private) == k.privatePages.contains(base / 4096 + page))
        }
    }

    @Test func lazyDefersUntilFlush() throws {
        let k = FakePrivateMemoryKernel()
        let c = try controller(.lazy(batchPages: 64), kernel: k)
        for _ in 0..<10 {
            #expect(try c.mapGPARange(gpa: base, pages: 1, attributes: 0) == 0)
            #expect(try c.mapGPARange(gpa: base, pages: 1, attributes: MapGPARange.encrypted) == 0)
        }
        #expect(k.calls.filter { $0.hasPrefix("discard") }.isEmpty && c.costs.conversions == 20)
        try c.flush()
        #expect(k.calls.last == "discard shared +0+1" && c.costs.discardCalls == 1)
    }

    @Test func guestMistakesAreRefusedWithEINVAL() throws {
        let k = FakePrivateMemoryKernel()
        let c = try controller(.eager, kernel: k)
        let eInval = UInt64(bitPattern: -22)
        #expect(try c.mapGPARange(gpa: base + 7 * 4096, pages: 2, attributes: 0) == eInval)
        #expect(c.lastRefusal == "KVM_HC_MAP_GPA_RANGE refused: conversion of gpa 0x107000 size 0x2000: outside guest memory "
                + "(private-capable memory is [0x100000, 0x108000))")
        #expect(try c.mapGPARange(gpa: 0, pages: 1, attributes: 0) == eInval)
        #expect(try c.mapGPARange(gpa: base, pages: 1, attributes: 0x40) == eInval)
        #expect(c.lastRefusal?.contains("unknown bits") == true)
        #expect(c.costs.refused == 3 && k.calls.isEmpty)
        // A direct conversion that is not page aligned: the error says so, nothing reaches the kernel.
        #expect(throws: ConversionError.unaligned(gpa: base + 512, size: 4096)) { try c.convert(gpa: base + 512, size: 4096, to: .shared) }
        #expect(k.calls.isEmpty)
    }

    @Test func kernelFailuresPropagateAndLeaveTheMapAlone() throws {
        let k = FakePrivateMemoryKernel()
        k.failAttributes = true
        let c = try controller(.eager, kernel: k)
        let before = c.map
        #expect(throws: MemoryFaultRefusal.self) { try c.mapGPARange(gpa: base, pages: 1, attributes: 0) }
        #expect(c.map == before)
    }

    @Test func memoryFaultIsAnImplicitConversion() throws {
        let k = FakePrivateMemoryKernel()
        let c = try controller(.eager, kernel: k)
        // A shared access to a private page: convert it to shared (the whole page holding gpa).
        try c.memoryFault(gpa: base + 3 * 4096 + 0x10, size: 8, flags: 0)
        #expect(c.map.state(at: base + 3 * 4096) == .shared && c.costs.implicitConversions == 1)
        #expect(k.calls == ["attributes 0x103000+1 shared", "discard private +3+1"])
        // A private access to a page that is already private is no conversion request.
        do {
            try c.memoryFault(gpa: base, size: 4096, flags: ConversionController.memoryFaultFlagPrivate)
            Issue.record("accepted a memory fault on a page already private")
        } catch {
            #expect("\(error)".contains("already has it private"))
        }
        #expect(throws: MemoryFaultRefusal.self) { try c.memoryFault(gpa: 0x1000, size: 4096, flags: 0) }
    }
}
