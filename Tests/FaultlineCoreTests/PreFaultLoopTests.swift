import FaultlineCore
import Testing

/// A fake KVM_PRE_FAULT_MEMORY: maps at most `pagesPerCall` pages per call, answers scripted
/// errors first, and records what it was asked and what it mapped.
final class FakePreFaultKernel {
    var script: [PreFaultCallResult]  // answers before mapping anything (consumed first to last)
    let pagesPerCall: UInt64
    /// GPAs where no memslot is (ENOENT when the call starts there).
    var holes: Set<UInt64> = []
    var mapped: [UInt64] = []
    var calls = 0

    init(pagesPerCall: UInt64, script: [PreFaultCallResult] = []) {
        self.pagesPerCall = pagesPerCall
        self.script = script
    }

    /// One ioctl, as the kernel does it: on EINTR/EAGAIN nothing moves; on success gpa and
    /// size are advanced by what was mapped.
    func call(_ gpa: inout UInt64, _ size: inout UInt64) -> PreFaultCallResult {
        calls += 1
        if !script.isEmpty { return script.removeFirst() }
        if holes.contains(gpa) { return .noMemslot }
        let n = min(size / 4096, pagesPerCall)
        for i in 0..<n { mapped.append(gpa + i * 4096) }
        gpa += n * 4096
        size -= n * 4096
        return .progressed
    }
}

@Suite("PreFault loop (fake kernel)")
struct PreFaultLoopTests {
    @Test("partial progress: re-issued on what is left until every page is mapped, each once")
    func partialProgress() {
        let kernel = FakePreFaultKernel(pagesPerCall: 3)
        let p = PreFaultLoop.run(gpa: 0x10_0000, size: 10 * 4096, call: kernel.call)
        #expect(p.complete)
        #expect(p.bytesMapped == 10 * 4096)
        #expect(p.calls == 4)  // 3 + 3 + 3 + 1
        #expect(kernel.mapped == (0..<10).map { 0x10_0000 + UInt64($0) * 4096 })
    }

    @Test("EINTR and EAGAIN between partial steps are retried; the range still completes")
    func retriesInterruptions() {
        let kernel = FakePreFaultKernel(pagesPerCall: 2, script: [.interrupted, .raced, .interrupted])
        let p = PreFaultLoop.run(gpa: 0, size: 5 * 4096, call: kernel.call)
        #expect(p.complete)
        #expect(p.retries == 3)
        #expect(p.calls == 6)
        #expect(Set(kernel.mapped).count == 5)
    }

    @Test("ENOENT stops the loop at the hole, with what was mapped before it")
    func stopsAtHole() {
        let kernel = FakePreFaultKernel(pagesPerCall: 2)
        kernel.holes = [4 * 4096]
        let p = PreFaultLoop.run(gpa: 0, size: 8 * 4096, call: kernel.call)
        #expect(p.stop == .noMemslot(gpa: 4 * 4096))
        #expect(p.bytesMapped == 4 * 4096)
    }

    @Test("another error (EOPNOTSUPP = 95, shadow paging) ends it at once, naming the address")
    func reportsOtherErrors() {
        let kernel = FakePreFaultKernel(pagesPerCall: 4, script: [.failed(errno: 95)])
        let p = PreFaultLoop.run(gpa: 0x2000, size: 4096, call: kernel.call)
        #expect(p.stop == .failed(errno: 95, gpa: 0x2000))
        #expect(p.bytesMapped == 0 && p.calls == 1)
    }

    @Test("a signal that stays pending cannot spin it forever")
    func boundedRetries() {
        let kernel = FakePreFaultKernel(pagesPerCall: 1, script: Array(repeating: .interrupted, count: 1000))
        let p = PreFaultLoop.run(gpa: 0, size: 4096, call: kernel.call)
        #expect(p.stop == .noProgress(gpa: 0, last: .interrupted, attempts: PreFaultLoop.maxAttemptsWithoutProgress))
        #expect(kernel.calls == PreFaultLoop.maxAttemptsWithoutProgress)
    }

    @Test("the caller can stop it between calls")
    func callerStops() {
        let kernel = FakePreFaultKernel(pagesPerCall: 1)
        var asked = 0
        let p = PreFaultLoop.run(gpa: 0, size: 10 * 4096, shouldStop: { asked += 1; return asked > 3 }, call: kernel.call)
        #expect(p.stop == .stopped(gpa: 3 * 4096))
        #expect(p.bytesMapped == 3 * 4096)
    }

    @Test("a kernel answer out of step with the request is reported, not trusted")
    func inconsistentKernel() {
        let p = PreFaultLoop.run(gpa: 0, size: 4096) { gpa, size in
            size += 4096  // grew
            return .progressed
        }
        #expect(p.stop == .inconsistent(gpa: 0, size: 8192))
    }

    @Test("an empty range makes no call")
    func emptyRange() {
        let kernel = FakePreFaultKernel(pagesPerCall: 1)
        #expect(PreFaultLoop.run(gpa: 0, size: 0, call: kernel.call).complete)
        #expect(kernel.calls == 0)
    }
}
