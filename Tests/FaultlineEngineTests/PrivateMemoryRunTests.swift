import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Testing

/// Whether this kernel has private memory (the rig does; this machine does not).
enum PrivateRigRun {
    static let obstacle: String? = {
        do { return PrivateMemoryVM.obstacle(try KVM()) } catch { return "\(error)" }
    }()
    static var available: Bool { obstacle == nil }
    static let skipReason: Comment = "needs KVM_X86_SW_PROTECTED_VM and KVM_CAP_MEMORY_ATTRIBUTES (run inside the rig: rig/tests FILTER)"

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

@Suite("PrivateMemory rig: conversions driven by the guest", .serialized,
       .enabled(if: PrivateRigRun.available, PrivateRigRun.skipReason))
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
    @Test(.enabled(if: Kernel.kvmUnavailable == nil && !PrivateRigRun.available, "only where /dev/kvm has no private memory"))
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
