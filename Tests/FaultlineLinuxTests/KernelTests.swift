import CFaultlineShim
import FaultlineCore
import FaultlineLinux
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Whether the real-kernel suites can run here; prints why not once.
enum Kernel {
    static let kvmUnavailable: String? = {
        do { _ = try KVM(); return nil } catch {
            print("SKIP real-KVM tests: \(error)")
            return "\(error)"
        }
    }()
    static let uffdUnavailable: String? = {
        do { _ = try Userfaultfd(required: []); return nil } catch {
            print("SKIP real-userfaultfd tests: \(error)")
            return "\(error)"
        }
    }()
    static var kvm: Bool { kvmUnavailable == nil }
    static var uffd: Bool { uffdUnavailable == nil }
}

/// Runs `body` on a new OS thread (not the cooperative pool: it may block in a page fault).
final class TestThread: @unchecked Sendable {
    private var thread = pthread_t()
    private final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
    init(_ body: @escaping () -> Void) {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        _ = fl_thread_create(&thread, 0, { arg in
            Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, box)
    }
    func join() { pthread_join(thread, nil) }
}

/// Waits (up to 5 s per poll) for the next event on `u`.
func nextEvent(_ u: Userfaultfd) throws -> UffdEvent {
    let events = UnsafeMutableBufferPointer<fl_uffd_msg>.allocate(capacity: 1)
    defer { events.deallocate() }
    while true {
        _ = try u.waitReadable(orStop: -1, timeoutMs: 5000)
        if try u.readEvents(into: events) > 0 { return UffdEvent(events[0]) }
    }
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
        try vm.setMemoryRegion(slot: 0, guestPhysicalAddress: GuestPhysicalAddress(0), size: 0x10000, hostAddress: low.hostAddress)
    }

    func vcpu(_ setup: (inout fl_kvm_regs) -> Void = { _ in }) throws -> Vcpu {
        let v = try vm.createVcpu(id: 0)
        try v.enterFlatProtectedMode()
        var r = fl_kvm_regs()
        r.rip = 0x1000
        r.rflags = 2
        setup(&r)
        try v.setRegisters(r)
        return v
    }
}

@Suite("KVM on the real kernel", .enabled(if: Kernel.kvm, "needs a usable /dev/kvm"))
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
        let first = try v.runOnce()
        #expect(first == .io(port: 0x42, size: 4, count: 1, isOut: true))
        #expect(v.ioData.load(as: UInt32.self) == 0xCAFE_F00D)
        #expect(try v.runOnce() == .hlt)
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
        #expect(try v.runOnce() == .mmio(address: GuestPhysicalAddress(0x2000_0000), length: 4, isWrite: true, data: 0x1234_5678))
        #expect(try v.runOnce() == .mmio(address: GuestPhysicalAddress(0x2000_0000), length: 4, isWrite: false, data: 0))
        v.completeMMIORead(0xABCD)
        #expect(try v.runOnce() == .hlt)
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
        #expect(try v.runOnce() == .hlt)
        var bits: [UInt64] = [0]
        try bits.withUnsafeMutableBytes { try t.vm.getDirtyLog(slot: 1, into: $0.baseAddress!) }
        #expect(bits[0] == 0x5555_5555_5555_5555)
        try bits.withUnsafeMutableBytes { try t.vm.getDirtyLog(slot: 1, into: $0.baseAddress!) }
        #expect(bits[0] == 0, "KVM_GET_DIRTY_LOG resets the log")
    }

    @Test func guestMemfdSlotIsSharedWithTheMapping() throws {
        let t = try TinyVM { a in
            a.mov(.eax, imm: 0x6D656D67)
            a.mov(.esi, imm: 0x1000_1000)
            a.store(.eax, to: .esi)
            a.hlt()
        }
        guard t.vm.kvm.check(.guestMemfdFlags) & 1 != 0 else { print("SKIP: no GUEST_MEMFD_FLAG_MMAP"); return }
        let ram = try GuestMemoryRegion(backing: .guestMemfd, size: 16 * 4096, vm: t.vm)
        try t.vm.setMemoryRegion(slot: 1, flags: .guestMemfd, guestPhysicalAddress: GuestPhysicalAddress(0x1000_0000),
                                 size: ram.size, hostAddress: ram.hostAddress, guestMemfd: ram.guestMemfd)
        let v = try t.vcpu()
        #expect(try v.runOnce() == .hlt)
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
        let done = UnsafeMutablePointer<Int>.allocate(capacity: 1)
        done.initialize(to: 0)
        defer { done.deallocate() }
        var thread = pthread_t()
        final class Box: @unchecked Sendable { let v: Vcpu; let done: UnsafeMutablePointer<Int>; init(_ v: Vcpu, _ d: UnsafeMutablePointer<Int>) { self.v = v; self.done = d } }
        let box = Unmanaged.passRetained(Box(v, done)).toOpaque()
        _ = fl_thread_create(&thread, 0, { arg in
            let b = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            b.v.bindToCurrentThread()
            let exit = try? b.v.runOnce()
            b.done.pointee = exit == .interrupted ? 1 : 2
            return nil
        }, box)
        try await Task.sleep(for: .milliseconds(100))
        v.kick()
        pthread_join(thread, nil)
        #expect(done.pointee == 1)
        v.clearKick()
    }
}

@Suite("userfaultfd on the real kernel", .serialized, .enabled(if: Kernel.uffd, "needs a userfaultfd"))
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
        let features = try Userfaultfd.availableFeatures()
        let u = try Userfaultfd(required: UffdFeatures([.move]).intersection(features))
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
        guard features.contains(.move) else { print("SKIP: no UFFDIO_MOVE for the move half"); return }
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
        let writer = TestThread { target.p.storeBytes(of: UInt32(77), as: UInt32.self) }
        let event = try nextEvent(u)
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

    @Test func minorFaultsWriteThenContinue() throws {
        guard try Userfaultfd.availableFeatures().contains(.minorShmem) else { print("SKIP: no MINOR_SHMEM"); return }
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
