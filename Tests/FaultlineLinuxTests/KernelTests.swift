import CFaultlineShim
import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Dispatch
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A test's wait ran out.
struct TimedOut: Error, CustomStringConvertible { let description: String }

/// Runs `body` on a new OS thread (not the cooperative pool: it may block in a page fault).
final class TestThread: @unchecked Sendable {
    private var thread = pthread_t()
    private let finished = DispatchSemaphore(value: 0)
    private var joined = false
    private final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
    init(_ body: @escaping () -> Void) {
        let done = finished
        let box = Unmanaged.passRetained(Box({ body(); done.signal() })).toOpaque()
        _ = fl_thread_create(&thread, 0, -1, { arg in
            Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, box)
    }

    /// Waits up to `seconds` for it to end; past that records an issue and leaves it running
    /// (detached; whatever its body captured stays alive with it).
    @discardableResult
    func join(within seconds: Int = 10, sourceLocation: SourceLocation = #_sourceLocation) -> Bool {
        guard !joined else { return true }
        joined = true
        if finished.wait(timeout: .now() + .seconds(seconds)) == .timedOut {
            Issue.record("a test thread did not end within \(seconds) s", sourceLocation: sourceLocation)
            pthread_detach(thread)
            return false
        }
        pthread_join(thread, nil)
        return true
    }
}

/// The next event on `u`, waiting at most `seconds`; throws (naming the wait) past that.
func nextEvent(_ u: Userfaultfd, within seconds: Int = 10) throws -> UffdEvent {
    let events = UnsafeMutableBufferPointer<fl_uffd_msg>.allocate(capacity: 1)
    defer { events.deallocate() }
    let deadline = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < deadline {
        _ = try u.waitReadable(orStop: -1, timeoutMs: 200)
        if try u.readEvents(into: events) > 0 { return UffdEvent(events[0]) }
    }
    throw TimedOut(description: "no userfaultfd event within \(seconds) s")
}

/// One KVM_RUN, kicked out after `seconds` if the guest is still running then (a guest
/// stuck in a loop fails its test with an `.interrupted` exit instead of hanging it).
func runOnce(_ v: Vcpu, within seconds: Int = 10) throws -> VcpuExit {
    v.bindToCurrentThread()
    let watchdog = DispatchWorkItem { v.kick() }
    DispatchQueue.global().asyncAfter(deadline: .now() + .seconds(seconds), execute: watchdog)
    defer { watchdog.cancel() }
    return try v.runOnce()
}

/// A VM with 64 KiB of code memory at GPA 0 and a program at 0x1000.
final class TinyVM {
    let vm: VirtualMachine
    let low: GuestMemoryRegion
    init(_ build: (inout X86Assembler) -> Void) throws {
        vm = try KVM().createVM()
        low = try GuestMemoryRegion(backing: .anonymous, size: 0x10000)
        var asm = X86Assembler()
        build(&asm)
        let code = try asm.assemble()
        code.withUnsafeBytes { (low.base + 0x1000).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        try vm.setMemoryRegion(slot: 0, guestPhysicalAddress: GuestPhysicalAddress(0), memory: low)
    }

    func vcpu(_ setup: (inout VcpuRegisters) -> Void = { _ in }) throws -> Vcpu {
        let v = try vm.createVcpu(id: 0)
        try v.enterFlatProtectedMode()
        var r = VcpuRegisters()
        r.rip = 0x1000
        r.rflags = 2
        setup(&r)
        try v.setRegisters(r)
        return v
    }
}

@Suite("KVM on the real kernel", .gate(.kvmOnTheRealKernel))
struct KVMTests {
    @Test func capabilitiesAreTyped() throws {
        let kvm = try KVM()
        #expect(kvm.check(.userMemory2) > 0)
        #expect(kvm.check(.maxVcpus) >= 256)
        #expect(kvm.vcpuMmapSize >= MemoryLayout<fl_kvm_run>.size)
    }

    @Test func guestStoresAndReportsThroughIO() throws {
        let t = try TinyVM { a in
            a.mov(.eax, imm: 0xCAFE_F00D)
            a.mov(.ebx, imm: 0x8000)
            a.store(.eax, to: .ebx)
            a.out(port: 0x42)
            a.hlt()
        }
        let v = try t.vcpu()
        let first = try runOnce(v)
        #expect(first == .io(port: 0x42, size: 4, count: 1, isOut: true))
        #expect(v.ioData.load(as: UInt32.self) == 0xCAFE_F00D)
        #expect(try runOnce(v) == .hlt)
        #expect((t.low.base + 0x8000).load(as: UInt32.self) == 0xCAFE_F00D)
        #expect(try v.registers().rip == 0x1000 + 5 + 5 + 2 + 2 + 1)
    }

    @Test func unmappedAccessIsMMIOWithData() throws {
        let t = try TinyVM { a in
            a.mov(.eax, imm: 0x1234_5678)
            a.mov(.esi, imm: 0x2000_0000)
            a.store(.eax, to: .esi)
            a.load(.edx, from: .esi)
            a.hlt()
        }
        let v = try t.vcpu()
        #expect(try runOnce(v) == .mmio(address: GuestPhysicalAddress(0x2000_0000), length: 4, isWrite: true, data: 0x1234_5678))
        #expect(try runOnce(v) == .mmio(address: GuestPhysicalAddress(0x2000_0000), length: 4, isWrite: false, data: 0))
        v.completeMMIORead(0xABCD)
        #expect(try runOnce(v) == .hlt)
        #expect(try v.registers().rdx == 0xABCD)
    }

    @Test func dirtyLogCountsExactlyTheWrittenPages() throws {
        let t = try TinyVM { a in
            // write pages [esi, edi) with stride 2 pages
            let loop = a.makeLabel()
            a.bind(loop)
            a.store(.eax, to: .esi)
            a.add(.esi, imm: 0x2000)
            a.cmp(.esi, .edi)
            a.jb(loop)
            a.hlt()
        }
        let ram = try GuestMemoryRegion(backing: .anonymous, size: 64 * 4096)
        try t.vm.setMemoryRegion(slot: 1, flags: .logDirtyPages, guestPhysicalAddress: GuestPhysicalAddress(0x1000_0000),
                                 size: ram.size, hostAddress: ram.hostAddress)
        let v = try t.vcpu { $0.rsi = 0x1000_0000; $0.rdi = 0x1000_0000 + 64 * 4096; $0.rax = 7 }
        #expect(try runOnce(v) == .hlt)
        var bits: [UInt64] = [0]
        try bits.withUnsafeMutableBytes { try t.vm.getDirtyLog(slot: 1, into: $0.baseAddress!) }
        #expect(bits[0] == 0x5555_5555_5555_5555)
        try bits.withUnsafeMutableBytes { try t.vm.getDirtyLog(slot: 1, into: $0.baseAddress!) }
        #expect(bits[0] == 0, "KVM_GET_DIRTY_LOG resets the log")
    }

    @Test(.gate(.guestMemfdSlotSharedWithItsMapping))
    func guestMemfdSlotIsSharedWithTheMapping() throws {
        let t = try TinyVM { a in
            a.mov(.eax, imm: 0x6D656D67)
            a.mov(.esi, imm: 0x1000_1000)
            a.store(.eax, to: .esi)
            a.hlt()
        }
        let ram = try GuestMemoryRegion(backing: .guestMemfd, size: 16 * 4096, vm: t.vm)
        try t.vm.setMemoryRegion(slot: 1, flags: .guestMemfd, guestPhysicalAddress: GuestPhysicalAddress(0x1000_0000),
                                 size: ram.size, hostAddress: ram.hostAddress, guestMemfd: ram.guestMemfd)
        let v = try t.vcpu()
        #expect(try runOnce(v) == .hlt)
        #expect((ram.base + 4096).load(as: UInt32.self) == 0x6D656D67)
    }

    @Test func errorsNameTheOperationAndErrno() throws {
        let vm = try KVM().createVM()
        let ram = try GuestMemoryRegion(backing: .anonymous, size: 4096)
        // guest_memfd flag without a guest_memfd: the kernel refuses.
        do {
            try vm.setMemoryRegion(slot: 1, flags: [.guestMemfd, .logDirtyPages], guestPhysicalAddress: GuestPhysicalAddress(0),
                                   size: 4096, hostAddress: ram.hostAddress)
            Issue.record("accepted an invalid memslot")
        } catch {
            #expect(error.description.hasPrefix("KVM_SET_USER_MEMORY_REGION2 slot 1: EINVAL"))
        }
    }

    @Test func preFaultReportsPartialProgressAndTheError() throws {
        let t = try TinyVM { $0.hlt() }
        let v = try t.vcpu()
        let outcome = v.preFault(GuestMemoryRange(start: GuestPhysicalAddress(0), size: 0x10000)!)
        if t.vm.check(.preFaultMemory) == 0 {
            #expect(outcome.error?.errno == EOPNOTSUPP)
            #expect(outcome.error?.description.contains("KVM_PRE_FAULT_MEMORY vcpu 0") == true)
            #expect(outcome.bytesMapped == 0)
        } else {
            #expect(outcome.error == nil && outcome.bytesMapped == 0x10000)
        }
    }

    @Test func kickInterruptsARunningVcpu() async throws {
        let t = try TinyVM { a in
            let spin = a.makeLabel()
            a.bind(spin)
            a.jmp(spin)
        }
        let v = try t.vcpu()
        final class Outcome: @unchecked Sendable { var exit: VcpuExit? }
        let outcome = Outcome()
        // A bare KVM_RUN (no watchdog): only the kick can end it; if it does not, the thread is left spinning.
        let runner = TestThread {
            v.bindToCurrentThread()
            outcome.exit = try? v.runOnce()
        }
        try await Task.sleep(for: .milliseconds(100))
        v.kick()
        #expect(runner.join(within: 10))
        #expect(outcome.exit == .interrupted)
        v.clearKick()
    }
}

@Suite("userfaultfd on the real kernel", .serialized, .gate(.userfaultfdOnTheRealKernel))
struct UserfaultfdTests {
    @Test func negotiatesFeatures() throws {
        let available = try Userfaultfd.availableFeatures()
        let wanted = UffdFeatures([.sigbus, .threadID]).intersection(available)
        let u = try Userfaultfd(required: wanted)
        #expect(u.features.isSuperset(of: wanted))
        #expect(UffdFeatures([.sigbus, .minorShmem]).names == ["SIGBUS", "MINOR_SHMEM"])
    }

    @Test func copyThenEEXISTIsAlreadyPresent() throws {
        let u = try Userfaultfd(required: [])
        let ram = try GuestMemoryRegion(backing: .anonymous, size: 4 * 4096)
        try u.register(start: ram.hostAddress, length: ram.size, mode: .missing)
        var page = [UInt8](repeating: 0xA5, count: 4096)
        let first = try page.withUnsafeMutableBytes { try u.copy(to: ram.hostAddress, from: $0.baseAddress!, length: 4096) }
        #expect(first == .installed)
        #expect(ram.base.load(fromByteOffset: 100, as: UInt8.self) == 0xA5)
        page[0] = 0
        let second = try page.withUnsafeMutableBytes {
            try u.copy(to: ram.hostAddress, from: $0.baseAddress!, length: 4096, dontWake: true)
        }
        #expect(second == .alreadyPresent)
        #expect(ram.base.load(as: UInt8.self) == 0xA5, "the first copy stays")
        #expect(try u.zeroPage(at: ram.hostAddress.adding(4096)!, length: 4096) == .installed)
        #expect((ram.base + 4096).load(as: UInt64.self) == 0)
    }

    @Test func aRunStepsOverPagesAlreadyMapped() throws {
        // Pages 1 and 3 of six are mapped by "another installer" first; a run over all six
        // with skippingPresent maps the other four and leaves those two as they were.
        let u = try Userfaultfd(required: [])
        let ram = try GuestMemoryRegion(backing: .anonymous, size: 6 * 4096)
        try u.register(start: ram.hostAddress, length: ram.size, mode: .missing)
        let mine = [UInt8](repeating: 0x11, count: 4096), theirs = [UInt8](repeating: 0x22, count: 6 * 4096)
        for page in [1, 3] {
            _ = try mine.withUnsafeBytes { try u.copy(to: ram.hostAddress.adding(UInt64(page) * 4096)!, from: $0.baseAddress!, length: 4096) }
        }
        let outcome = try theirs.withUnsafeBytes {
            try u.copy(to: ram.hostAddress, from: $0.baseAddress!, length: 6 * 4096, skippingPresent: 4096)
        }
        #expect(outcome == .installed)
        #expect((0..<6).map { (ram.base + $0 * 4096 + 7).load(as: UInt8.self) } == [0x22, 0x11, 0x22, 0x11, 0x22, 0x22])
        // Without it, the first mapped page ends the run.
        let other = try GuestMemoryRegion(backing: .anonymous, size: 2 * 4096)
        try u.register(start: other.hostAddress, length: other.size, mode: .missing)
        _ = try mine.withUnsafeBytes { try u.copy(to: other.hostAddress, from: $0.baseAddress!, length: 4096) }
        #expect(try theirs.withUnsafeBytes { try u.copy(to: other.hostAddress, from: $0.baseAddress!, length: 2 * 4096) } == .alreadyPresent)
    }

    @Test(.gate(.uffdMoveStepsOverMappedPages))
    func aMoveStepsOverPagesAlreadyMapped() throws {
        let u = try Userfaultfd(required: [.move])
        let mine = [UInt8](repeating: 0x11, count: 4096)
        let target = try GuestMemoryRegion(backing: .anonymous, size: 4 * 4096)
        try u.register(start: target.hostAddress, length: target.size, mode: .missing)
        _ = try mine.withUnsafeBytes { try u.copy(to: target.hostAddress.adding(2 * 4096)!, from: $0.baseAddress!, length: 4096) }
        let pool = try GuestMemoryRegion(backing: .anonymous, size: 4 * 4096)
        for i in 0..<4 { (pool.base + i * 4096).storeBytes(of: UInt8(0x30 + i), as: UInt8.self) }
        #expect(try u.move(to: target.hostAddress, from: pool.hostAddress, length: 4 * 4096, skippingPresent: 4096) == .installed)
        #expect((0..<4).map { (target.base + $0 * 4096).load(as: UInt8.self) } == [0x30, 0x31, 0x11, 0x33])
    }

    @Test func pagefaultEventsCarryAddressAndWriteFlag() throws {
        let u = try Userfaultfd(required: [.threadID])
        let ram = try GuestMemoryRegion(backing: .anonymous, size: 4 * 4096)
        try u.register(start: ram.hostAddress, length: ram.size, mode: .missing)
        final class Target: @unchecked Sendable { let p: UnsafeMutableRawPointer; init(_ p: UnsafeMutableRawPointer) { self.p = p } }
        let target = Target(ram.base + 2 * 4096 + 8)
        // The thread holds the region: if the test ends early, the memory it faults on stays mapped.
        let writer = TestThread { withExtendedLifetime(ram) { target.p.storeBytes(of: UInt32(77), as: UInt32.self) } }
        let event: UffdEvent
        do { event = try nextEvent(u) } catch {
            _ = try? u.zeroPage(at: ram.hostAddress, length: ram.size)
            writer.join()
            throw error
        }
        guard case .pagefault(let address, let flags, let tid) = event else {
            Issue.record("expected a pagefault, got \(event)")
            return
        }
        #expect(address == ram.hostAddress.adding(2 * 4096))
        #expect(flags.contains(.write))
        #expect(tid != 0)
        #expect(try u.zeroPage(at: address, length: 4096) == .installed)
        writer.join()
        #expect((ram.base + 2 * 4096 + 8).load(as: UInt32.self) == 77)
    }

    @Test(.gate(.uffdMinorWriteThenContinue))
    func minorFaultsWriteThenContinue() throws {
        let u = try Userfaultfd(required: [.minorShmem])
        let ram = try GuestMemoryRegion(backing: .memfd, size: 4 * 4096)
        try ram.allocateFile()
        try u.register(start: ram.hostAddress, length: ram.size, mode: .minor)
        let data = [UInt8](repeating: 0x3C, count: 4096)
        try data.withUnsafeBytes { try ram.writeFile(at: 4096, from: $0.baseAddress!, length: 4096) }
        #expect(try u.continue(at: ram.hostAddress.adding(4096)!, length: 4096) == .installed)
        #expect((ram.base + 4096 + 4095).load(as: UInt8.self) == 0x3C)
        #expect(try u.continue(at: ram.hostAddress.adding(4096)!, length: 4096) == .alreadyPresent)
    }

    @Test func moveWriteProtectAndPoison() throws {
        let features = try Userfaultfd.availableFeatures()
        let wanted = UffdFeatures([.move, .poison, .pagefaultFlagWP]).intersection(features)
        let u = try Userfaultfd(required: wanted)
        let ram = try GuestMemoryRegion(backing: .anonymous, size: 4 * 4096)
        try u.register(start: ram.hostAddress, length: ram.size, mode: features.contains(.pagefaultFlagWP) ? [.missing, .writeProtect] : .missing)
        if wanted.contains(.move) {
            let src = try GuestMemoryRegion(backing: .anonymous, size: 4096)
            src.base.storeBytes(of: UInt64(0xFEED), as: UInt64.self)
            #expect(try u.move(to: ram.hostAddress, from: src.hostAddress, length: 4096) == .installed)
            #expect(ram.base.load(as: UInt64.self) == 0xFEED)
        }
        if wanted.contains(.pagefaultFlagWP) {
            try u.writeProtect(start: ram.hostAddress, length: 4096, protect: true)
            try u.writeProtect(start: ram.hostAddress, length: 4096, protect: false)
        }
        if wanted.contains(.poison) {
            #expect(try u.poison(at: ram.hostAddress.adding(3 * 4096)!, length: 4096) == .installed)
        }
        // An invalid range is an error naming the ioctl.
        do {
            _ = try u.zeroPage(at: HostAddress(rawValue: 0x1000), length: 4096)
            Issue.record("zeropage outside any registered range succeeded")
        } catch {
            #expect(error.description.hasPrefix("UFFDIO_ZEROPAGE 0x1000+4096"))
        }
    }

    @Test func removeEventsAreDelivered() throws {
        let u = try Userfaultfd(required: [.eventRemove])
        let ram = try GuestMemoryRegion(backing: .anonymous, size: 4 * 4096)
        try u.register(start: ram.hostAddress, length: ram.size, mode: .missing)
        #expect(try u.zeroPage(at: ram.hostAddress, length: 4 * 4096) == .installed)
        // MADV_DONTNEED on a registered range blocks until the REMOVE event is read, so
        // discard from another thread and read here.
        final class R: @unchecked Sendable { let r: GuestMemoryRegion; init(_ r: GuestMemoryRegion) { self.r = r } }
        let box = R(ram)
        let t = TestThread { try? box.r.discard(offset: 0, length: 2 * 4096) }
        let event = try nextEvent(u)
        #expect(event == .remove(start: ram.hostAddress, end: ram.hostAddress.adding(2 * 4096)!))
        t.join()
    }
}
