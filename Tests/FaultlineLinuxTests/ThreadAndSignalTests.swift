import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("Threads, scheduling, signals and the clock")
struct ThreadAndSignalTests {
    final class Seen: @unchecked Sendable {
        var cpu: Int32?
        var tid: Int32 = 0
        var niceness: Int32 = 0
        var ran = false
    }

    @Test func aThreadRunsPinnedAndJoins() throws {
        let cpu = try #require(ThreadScheduling.lastAllowedCPU())
        let seen = Seen()
        let thread = try OSThread(name: "pinned", cpu: cpu) {
            seen.cpu = ThreadScheduling.currentCPU()
            seen.tid = ThreadScheduling.currentThreadID()
            seen.ran = true
        }
        thread.join()
        #expect(seen.ran && seen.cpu == cpu)
        #expect(seen.tid > 0 && seen.tid != ThreadScheduling.currentThreadID())
    }

    @Test func theAllowedCPUsCountIncludesTheLastOne() {
        let count = ThreadScheduling.allowedCPUCount()
        #expect(count >= 1)
        if let last = ThreadScheduling.lastAllowedCPU() { #expect(count <= Int(last) + 1) }
    }

    @Test func nicenessIsPerThread() throws {
        let seen = Seen()
        let thread = try OSThread(name: "nice", niceness: 5) {
            errno = 0
            seen.niceness = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(ThreadScheduling.currentThreadID()))
        }
        thread.join()
        #expect(seen.niceness == 5)
        let mine = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(ThreadScheduling.currentThreadID()))
        #expect(mine != 5, "the caller's niceness is untouched")
    }

    @Test func aThreadHasSettledWhenItsInitReturns() throws {
        // Named, at its niceness, with its id known: none of it is left for later, when it
        // could take locks a running guest needs (see HeapPolicy).
        let gate = TimedCondition()
        var open = false
        let thread = try OSThread(name: "settles first", niceness: 7) { gate.wait { open } }
        defer {
            gate.withLock { open = true }
            gate.broadcast()
            thread.join()
        }
        let tid = thread.threadID
        #expect(tid > 0 && tid != ThreadScheduling.currentThreadID())
        errno = 0
        #expect(getpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(tid)) == 7)
        let comm = try String(contentsOfFile: "/proc/self/task/\(tid)/comm", encoding: .utf8)
        #expect(comm.trimmingCharacters(in: .whitespacesAndNewlines) == "settles first")
    }

    @Test(.gate(.threadKeepsOffACPU))
    func aThreadKeepsOffACPUAndComesBack() throws {
        let cpu = try #require(ThreadScheduling.lastAllowedCPU())
        let gate = TimedCondition()
        var open = false
        let thread = try OSThread(name: "keeps off") { gate.wait { open } }
        defer {
            gate.withLock { open = true }
            gate.broadcast()
            thread.join()
        }
        #expect(try ThreadScheduling.allows(cpu, thread: thread.threadID))
        try ThreadScheduling.avoidCPU(cpu, ofThread: thread.threadID)
        #expect(try !ThreadScheduling.allows(cpu, thread: thread.threadID))
        #expect(try ThreadScheduling.allows(0, thread: thread.threadID), "the other CPUs stay allowed")
        try ThreadScheduling.avoidCPU(nil, ofThread: thread.threadID)
        #expect(try ThreadScheduling.allows(cpu, thread: thread.threadID))

        // Started off the CPU: never placed there, not even before its first instruction.
        let seen = Seen()
        let hold = TimedCondition()
        var go = false
        let started = try OSThread(name: "starts off", avoidingCPU: cpu) {
            hold.wait { go }
            seen.cpu = ThreadScheduling.currentCPU()
        }
        #expect(try !ThreadScheduling.allows(cpu, thread: started.threadID))
        hold.withLock { go = true }
        hold.broadcast()
        started.join()
        #expect(seen.cpu != nil && seen.cpu != cpu)
    }

    @Test func theHeapPolicyServesLargeAllocationsWithoutMappings() throws {
        try HeapPolicy.keepHeapForFaultPath()
        let before = HeapPolicy.mappedChunks
        let big = UnsafeMutableRawPointer.allocate(byteCount: 40 << 20, alignment: 16)  // above glibc's largest mmap threshold
        big.storeBytes(of: 1, as: UInt8.self)
        #expect(HeapPolicy.mappedChunks == before, "a 40 MiB allocation came from the heap, not its own mmap")
        big.deallocate()
    }

    @Test func theKickSignalCanBeBlockedAndUnblocked() throws {
        let signal = try KickSignal.install()
        let again = try KickSignal.install()
        #expect(signal > 0 && again == signal, "installed once")
        let seen = Seen()
        let thread = try OSThread(name: "kick mask") {
            do {
                try KickSignal.blockInCurrentThread()
                var mask = sigset_t()
                pthread_sigmask(SIG_BLOCK, nil, &mask)
                let blocked = sigismember(&mask, signal) == 1
                try KickSignal.unblockInCurrentThread()
                pthread_sigmask(SIG_BLOCK, nil, &mask)
                seen.ran = blocked && sigismember(&mask, signal) == 0
            } catch {}
        }
        thread.join()
        #expect(seen.ran)
    }

    @Test func aConditionWaitsUntilTold() throws {
        let condition = TimedCondition()
        final class Flag: @unchecked Sendable { var set = false }
        let flag = Flag()
        let setter = try OSThread(name: "setter") {
            MonotonicClock.sleep(microseconds: 20_000)
            condition.withLock { flag.set = true }
            condition.broadcast()
        }
        condition.wait { flag.set }
        #expect(condition.withLock { flag.set })
        setter.join()
    }

    @Test func sleepLastsAtLeastItsDuration() {
        let start = MonotonicClock.nanoseconds()
        MonotonicClock.sleep(microseconds: 5_000)
        #expect(MonotonicClock.nanoseconds() - start >= 5_000_000)
    }

    @Test func errnoNamesMatchTheSystemErrors() {
        #expect(SystemError("x", errno: EFAULT).code == .badAddress)
        #expect(Errno.brokenPipe.rawValue == EPIPE && Errno.brokenPipe.description == "EPIPE")
    }

    @Test func theHostProcessIsDescribed() {
        #expect(HostProcess.effectiveUserID == geteuid())
        #expect(HostProcess.firstLine(ofFile: "/proc/sys/kernel/ostype") == "Linux")
        #expect(HostProcess.firstLine(ofFile: "/nonexistent/file") == nil)
        #expect(HostProcess.canReadAndWrite("/dev/null"))
        #expect(!HostProcess.canReadAndWrite("/nonexistent/file"))
    }
}

@Suite("The SIGBUS resolver on the real kernel", .serialized, .gate(.sigbusResolver))
struct SigbusResolverTests {
    @Test func aMissingPageIsResolvedOnTheFaultingThread() throws {
        let u = try Userfaultfd(required: .sigbus)
        let ram = try GuestMemoryRegion(backing: .anonymous, size: 4096)
        try u.register(start: ram.hostAddress, length: 4096, mode: .missing)
        let source = try AnonymousMapping(size: 4096, populate: true, label: "sigbus source")
        source.base.initializeMemory(as: UInt8.self, repeating: 0x5C, count: 4096)
        try SigbusResolver.installHandler()
        final class Seen: @unchecked Sendable { var value: UInt8 = 0; var faults = 0 }
        let seen = Seen()
        let resolver = SigbusResolver { address in
            seen.faults += 1
            guard address & ~0xFFF == ram.hostAddress.rawValue else { return false }
            return (try? u.copy(to: ram.hostAddress, from: source.base, length: 4096, dontWake: true)) != nil
        }
        let thread = try OSThread(name: "sigbus") {
            seen.value = resolver.whileRegistered { ram.base.load(fromByteOffset: 9, as: UInt8.self) }
        }
        thread.join()
        #expect(seen.value == 0x5C && seen.faults == 1)
    }
}
