import Atomics
import FaultlineCore
import FaultlineLinux

/// The digest read back from memory, the yardstick copy, and vcpu-exit faults.
extension DestinationAttempt {
    // MARK: verification

    /// The digest from guest memory: every page read back, except pages the guest itself
    /// rewrote since they were installed (KVM's dirty log), whose entry is the checksum they
    /// arrived with. A page read while the guest writes it shows up in the second dirty-log
    /// pass and is treated the same way.
    func verify(expected: UInt64) throws {
        let t0 = MonotonicClock.nanoseconds()
        let written = PageBitmap(count: layout.totalPages)
        try machine.collectGuestWrites(into: written)
        let crc = UnsafeMutablePointer<UInt32>.allocate(capacity: layout.totalPages)
        defer { crc.deallocate() }
        readBack(into: crc, skipping: written)
        let writtenDuring = PageBitmap(count: layout.totalPages)
        try machine.collectGuestWrites(into: writtenDuring)
        writtenDuring.forEachSetPage { page in
            if written.insert(page) { crc[page] = table.receivedCRC[page] }
        }
        var digest: UInt64 = 0
        for page in 0..<layout.totalPages { digest ^= MemoryDigest.mix(page: page, crc: crc[page]) }
        report.digestPagesGuestWritten = written.populationCount
        report.digestPagesFromMemory = layout.totalPages - report.digestPagesGuestWritten
        report.digestSeconds = Double(MonotonicClock.nanoseconds() - t0) / 1e9
        report.sourceDigest = expected
        report.destinationDigest = digest
        report.digestMatch = digest == expected
    }

    /// Each page's CRC32C, from memory, on every CPU this process may use (the vCPUs run at
    /// their post-copy niceness meanwhile); a page the guest wrote takes the CRC it arrived
    /// with. Split in contiguous slices, one per thread; the calling thread takes the first.
    func readBack(into crc: UnsafeMutablePointer<UInt32>, skipping written: PageBitmap) {
        let total = layout.totalPages
        let slices = max(1, min(ThreadScheduling.allowedCPUCount(), Self.maxReadBackThreads, total / 4096))
        let work = { [self] (slice: Int) in
            for page in (total * slice / slices)..<(total * (slice + 1) / slices) {
                crc[page] = written.contains(page) ? table.receivedCRC[page]
                    : CRC32C.checksum(UnsafeRawBufferPointer(start: mapper.bytes(of: page), count: 4096))
            }
        }
        var helpers: [OSThread] = []
        for slice in 1..<slices {
            if let t = try? OSThread(name: "read-back \(slice)", { work(slice) }) { helpers.append(t) }
            else { work(slice) }  // no thread: this one reads the slice
        }
        work(0)
        for t in helpers { t.join() }
    }

    static let maxReadBackThreads = 4

    // MARK: the yardstick

    /// The source may ask to time a plain TCP copy on the same link. The guest is parked
    /// meanwhile: the yardstick is a copy with nothing else running (the source's guest is
    /// stopped by now too), as fast as a plain copy can be here: timed while this guest's
    /// vCPUs run, it would take longer and flatter the migration's ratio to it.
    func measureBaselineIfAsked() {
        bulk.socket.setReceiveTimeout(seconds: 5)
        guard case .ack(SessionAck.baselineFollows)? = try? bulk.receive() else { return }
        machine.pauseGuest()
        defer { machine.resumeGuest() }
        guard let socket = try? destination.listener.accept(timeoutSeconds: 10) else { return }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        var total: UInt64 = 0
        while let n = try? socket.receive(into: buffer), n > 0 { total += UInt64(n) }
        try? bulk.send(.ack(total))
    }

    // MARK: vcpu-exit faults

    /// vcpu-exit: the vCPU thread asks for the page and waits until it is installed.
    public func resolveOnVcpu(_ vcpu: Int, ramOffset: UInt64) throws {
        let page = layout.lowPages + Int(ramOffset / 4096)
        if table.installed.contains(page) { return }
        vcpuExitFaults.wrappingIncrement(ordering: .relaxed)
        let t0 = MonotonicClock.nanoseconds()
        // Staged already (the stream brought it; the installer has not reached it): map it now.
        if let pipeline, try pipeline.resolveStaged(page) {
            let now = MonotonicClock.nanoseconds()
            book.noteResolvedWithoutRequest(page, vcpu: vcpu, faultTime: t0, now: now)
            book.addStall(vcpu: vcpu, nanoseconds: now &- t0)
            return
        }
        requester.requestFromVcpu(page, vcpu: vcpu, time: t0)
        try pipeline?.lookAgainAfterRequest(page)
        while !table.installed.contains(page) && !stopping.load(ordering: .relaxed) && failures.failure == nil {
            waiters.wait(timeoutNanoseconds: 50_000_000) {
                table.installed.contains(page) || stopping.load(ordering: .relaxed) || failures.failure != nil
            }
        }
        book.addStall(vcpu: vcpu, nanoseconds: MonotonicClock.nanoseconds() &- t0)
        if !table.installed.contains(page) { throw MigrationError.connectionClosed("stopped while vcpu \(vcpu) waited for page \(page)") }
    }
}
