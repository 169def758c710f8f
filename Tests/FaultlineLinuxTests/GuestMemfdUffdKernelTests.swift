import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// userfaultfd on a guest_memfd mapping (a default VM's guest_memfd with MMAP | INIT_SHARED),
/// as seed 004 resolves it: a real fault taken by another thread, resolved by UFFDIO_COPY
/// (MISSING) or by write() then UFFDIO_CONTINUE (MINOR). Kernels with guest_memfd's
/// userfaultfd operations only (the 7.3 rig kernel): elsewhere each test skips, naming what
/// its probe saw and `rig/tests --kernel .../bzImage-7.3-gmem-uffd GuestMemfdUffd`.
@Suite("GuestMemfdUffd: userfaultfd on a guest_memfd mapping", .serialized)
struct GuestMemfdUffdKernelTests {
    static let page = 4096

    /// A reader thread loads page 2's last word through the registered mapping; it returns
    /// what it read once the fault is resolved.
    final class Reader: @unchecked Sendable {
        let region: GuestMemoryRegion
        var seen: UInt32 = 0
        private var thread: TestThread?
        init(_ region: GuestMemoryRegion) { self.region = region }
        func start() { thread = TestThread { self.seen = (self.region.base + 3 * GuestMemfdUffdKernelTests.page - 4).load(as: UInt32.self) } }
        func join() { thread?.join() }
    }

    @Test("MISSING: a read of a page not yet in the guest_memfd faults, UFFDIO_COPY fills it", .gate(.guestMemfdMissingFaults))
    func missingFaultResolvedByCopy() throws {
        let ram = try GuestMemoryRegion(backing: .guestMemfd, size: UInt64(4 * Self.page), vm: try KVM().createVM())
        let u = try Userfaultfd(required: [.missingShmem], flags: [.nonBlocking, .userModeOnly])
        try u.register(start: ram.hostAddress, length: ram.size, mode: .missing)
        let reader = Reader(ram)
        reader.start()
        let event: UffdEvent
        do { event = try nextEvent(u) } catch {
            _ = try? u.zeroPage(at: ram.hostAddress, length: ram.size)
            reader.join()
            throw error
        }
        let page2 = ram.hostAddress.adding(UInt64(2 * Self.page))!
        guard case .pagefault(let address, let flags, _) = event else {
            _ = try? u.zeroPage(at: ram.hostAddress, length: ram.size)
            reader.join()
            Issue.record("expected a pagefault, got \(event)")
            return
        }
        #expect(address == page2)
        #expect(!flags.contains(.minor))
        let bytes = [UInt32](repeating: 0xC0FFEE, count: Self.page / 4)
        #expect(try bytes.withUnsafeBytes { try u.copy(to: page2, from: $0.baseAddress!, length: UInt64(Self.page)) } == .installed)
        reader.join()
        #expect(reader.seen == 0xC0FFEE)
        // The copy went into the guest_memfd's page cache: a second UFFDIO_COPY finds it there.
        #expect(try bytes.withUnsafeBytes { try u.copy(to: page2, from: $0.baseAddress!, length: UInt64(Self.page)) } == .alreadyPresent)
    }

    @Test("MINOR: a page written with pwrite() faults as MINOR on first touch, UFFDIO_CONTINUE maps it",
          .gate(.guestMemfdMinorFaultsAfterWrite))
    func minorFaultAfterWriteResolvedByContinue() throws {
        let ram = try GuestMemoryRegion(backing: .guestMemfd, size: UInt64(4 * Self.page), vm: try KVM().createVM(),
                                        guestMemfdFlags: [.mmap, .initShared, .write])
        let u = try Userfaultfd(required: [.minorShmem], flags: [.nonBlocking, .userModeOnly])
        try u.register(start: ram.hostAddress, length: ram.size, mode: .minor)
        let bytes = [UInt32](repeating: 0xFACADE, count: Self.page / 4)
        try bytes.withUnsafeBytes { try ram.writeFile(at: UInt64(2 * Self.page), from: $0.baseAddress!, length: Self.page) }
        let reader = Reader(ram)
        reader.start()
        let page2 = ram.hostAddress.adding(UInt64(2 * Self.page))!
        let event: UffdEvent
        do { event = try nextEvent(u) } catch {
            _ = try? u.continue(at: page2, length: UInt64(Self.page))
            reader.join()
            throw error
        }
        guard case .pagefault(let address, let flags, _) = event else {
            _ = try? u.continue(at: page2, length: UInt64(Self.page))
            reader.join()
            Issue.record("expected a pagefault, got \(event)")
            return
        }
        #expect(address == page2)
        #expect(flags.contains(.minor))
        #expect(try u.continue(at: page2, length: UInt64(Self.page)) == .installed)
        reader.join()
        #expect(reader.seen == 0xFACADE)
        // An unaligned write() is refused (guest_memfd populates whole pages only).
        do {
            try bytes.withUnsafeBytes { try ram.writeFile(at: 100, from: $0.baseAddress!, length: 100) }
            Issue.record("an unaligned pwrite into the guest_memfd succeeded")
        } catch {
            #expect((error as? SystemError)?.errnoName == "EINVAL", "\(error)")
        }
    }
}
