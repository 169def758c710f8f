import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// Private-memory runs on a kernel that has it (the rig does; run there: rig/tests PrivateMemory).
enum PrivateRigRun {
    /// 16 pages; whole-range conversions first leave [0, 8) shared and [8, 16) private;
    /// then the guest flips the last page `conversions` times.
    static func config(_ policy: DiscardPolicy, conversions: Int = 1000, backing: MemoryBacking = .anonymous) -> PrivateMemoryRunConfig {
        var c = PrivateMemoryRunConfig()
        c.policy = policy
        c.sharedBacking = backing
        c.guest.conversions = conversions
        c.guest.regionPages = 16
        c.guest.bufferPage = 15
        c.guest.prologue = [.init(firstPage: 0, pages: 16, target: .shared), .init(firstPage: 8, pages: 8, target: .private)]
        c.timeoutSeconds = 240
        return c
    }

    static func layout(_ r: PrivateMemoryReport) -> [String] {
        r.finalMap?.pages.entries.map { "\($0.range.lowerBound)..<\($0.range.upperBound) \($0.value)" } ?? []
    }
}

@Suite("PrivateMemory rig: conversions driven by the guest", .serialized, .gate(.privateMemoryRunOnTheRig))
struct PrivateMemoryRigRunTests {
    @Test(.timeLimit(.minutes(5)))
    func eagerDiscardLosesContentsAtEveryRoundTrip() throws {
        let r = try PrivateMemoryRun.run(PrivateRigRun.config(.eager, backing: .memfd))
        #expect(r.verified, "\(r.contentMismatches) \(r.readbacks)")
        #expect(r.guestConversions == 1000 && r.costs.conversions == 1002 && r.checkedObservations == 999)
        // Eager discard: every conversion gave back the other backing, so nothing survived.
        #expect(r.survivedShared == 0 && r.survivedPrivate == 0 && r.zeroShared + r.zeroPrivate == 999)
        #expect(r.costs.discardCalls == r.costs.conversions)
        #expect(r.readbacks.map(\.sharedPages) == [8, 8] && r.readbacks.map(\.mismatchCount) == [0, 0])
        #expect(PrivateRigRun.layout(r) == ["0..<8 shared", "8..<16 private"])
    }

    @Test(.timeLimit(.minutes(5)))
    func lazyDiscardKeepsContentsAcrossRoundTrips() throws {
        let r = try PrivateMemoryRun.run(PrivateRigRun.config(.lazy(batchPages: 512), conversions: 1001))
        #expect(r.verified, "\(r.contentMismatches) \(r.readbacks)")
        #expect(r.guestConversions == 1001)
        // Only each backing's first use reads zeros (never written); after that, every round
        // trip finds the old contents, because no discard ran before the end.
        #expect(r.zeroShared == 1 && r.zeroPrivate == 1 && r.survivedShared + r.survivedPrivate == 998)
        #expect(r.costs.discardCalls == r.discardCallsAtEnd)
        // 1001 conversions: the buffer ends shared.
        #expect(PrivateRigRun.layout(r) == ["0..<8 shared", "8..<15 private", "15..<16 shared"])
        #expect(r.readbacks.last?.sharedPages == 9 && r.readbacks.allSatisfy { $0.mismatchCount == 0 })
    }

    @Test(.timeLimit(.minutes(5)))
    func lazyDiscardWithATinyBatchFlushesMidRun() throws {
        let r = try PrivateMemoryRun.run(PrivateRigRun.config(.lazy(batchPages: 1), conversions: 200))
        #expect(r.verified, "\(r.contentMismatches) \(r.readbacks)")
        // A batch of one page flushes at every conversion: as destructive as eager.
        #expect(r.survivedShared == 0 && r.survivedPrivate == 0 && r.costs.discardCalls >= 200)
    }
}

@Suite("Private memory run on a kernel without it")
struct PrivateMemoryRunRefusalTests {
    @Test(.gate(.privateMemoryRunRefusedWithoutIt))
    func refusesBeforeCreatingAnything() {
        do {
            _ = try PrivateMemoryRun.run(PrivateRigRun.config(.eager))
            Issue.record("ran a private-memory guest on a kernel without private memory")
        } catch {
            #expect("\(error)".contains("needs KVM_X86_SW_PROTECTED_VM"))
            #expect("\(error)".contains("KVM_CAP_MEMORY_ATTRIBUTES with KVM_MEMORY_ATTRIBUTE_PRIVATE (here: 0)"))
        }
    }
}

@Suite("PrivateMemory rig: KVM_EXIT_MEMORY_FAULT", .gate(.privateMemoryFaultOnTheRig))
struct PrivateMemoryRigMemoryFaultTests {
    /// A page of a plain memslot (no guest_memfd) marked private: KVM cannot map it and
    /// exits with KVM_EXIT_MEMORY_FAULT, flag PRIVATE, at that page. The controller refuses it
    /// as a conversion request, naming the region it manages.
    @Test(.timeLimit(.minutes(2)))
    func privatePageWithoutGuestMemfdExitsAndIsRefused() throws {
        let pvm = try PrivateMemoryVM(kvm: KVM(), gpa: GuestPhysicalAddress(0x10_0000), size: 16 * 4096)
        let low = try GuestMemoryRegion(backing: .anonymous, size: 0x10000, label: "memory-fault-low")
        var a = X86Assembler()
        a.mov(.esi, imm: 0x8000)
        a.store(.eax, to: .esi)
        a.hlt()
        let code = try a.assemble()
        code.withUnsafeBytes { low.base.advanced(by: 0x1000).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        try pvm.vm.setMemoryRegion(slot: 0, guestPhysicalAddress: GuestPhysicalAddress(0), memory: low)
        try pvm.vm.setMemoryAttributes(GuestMemoryRange(start: GuestPhysicalAddress(0x8000), size: 4096)!,
                                       attributes: PrivateMemoryVM.attributePrivate)
        let vcpu = try pvm.vm.createVcpu(id: 0)
        try vcpu.enterFlatProtectedMode()
        var regs = VcpuRegisters()
        regs.rip = 0x1000
        regs.rflags = 2
        try vcpu.setRegisters(regs)
        let exit = try vcpu.runOnce()
        guard case .memoryFault(let gpa, let size, let flags) = exit else {
            Issue.record("expected KVM_EXIT_MEMORY_FAULT, got \(exit)")
            return
        }
        #expect(gpa.rawValue == 0x8000 && size == 4096 && flags & ConversionController.memoryFaultFlagPrivate != 0)
        let controller = ConversionController(map: try SharingMap(memory: pvm.region, initial: .shared), policy: .eager,
                                              kernel: pvm, clock: MonotonicClock.nanoseconds)
        do {
            try controller.memoryFault(gpa: gpa.rawValue, size: size, flags: flags)
            Issue.record("a memory fault outside the private-capable region was taken as a conversion")
        } catch {
            #expect("\(error)" == "KVM_EXIT_MEMORY_FAULT at gpa 0x8000 size 0x1000 (private access): conversion of gpa 0x8000 "
                    + "size 0x1000: outside guest memory (private-capable memory is [0x100000, 0x110000))")
        }
    }
}
