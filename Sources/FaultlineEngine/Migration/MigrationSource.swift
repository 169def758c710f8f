import Atomics
import CFaultlineShim
import FaultlineCore
import FaultlineLinux
#if canImport(Glibc)
import Glibc
#endif

/// How the source migrates.
public struct MigrationOptions: Sendable {
    public var destination: SocketEndpoint
    /// Pre-copy rounds with dirty logging before the switch-over (0 = pure post-copy).
    public var precopyRounds = 0
    /// Upper bound on the time spent in pre-copy.
    public var precopySeconds = 10.0
    /// Pages per bulk message.
    public var batchPages = 64
    /// How long to keep trying to reconnect after the connection breaks in post-copy.
    public var reconnectSeconds = 30.0
    /// Fault injection for tests: cut both connections once, after this many background pages.
    public var disconnectAfterPages: Int?
    /// Fault injection for tests: corrupt the data of one background page after its checksum.
    public var corruptOnePage = false
    /// Fault injection for tests: leave one page the guest changed after pre-copy sent it out
    /// of the final dirty set, as a dirty log that missed a write would.
    public var missOneDirtyPage = false
    /// The CPU the fault server runs on (see ``FaultPathCPU``).
    public var faultPathCPU: FaultPathCPU = .automatic
    /// Print a progress bar (stderr, when it is a terminal).
    public var progress = false

    public init(destination: SocketEndpoint) { self.destination = destination }
}

/// What the source saw.
public struct SourceReport: Sendable {
    public var totalSeconds = 0.0
    public var downtimeMilliseconds = 0.0
    public var precopyRounds = 0
    public var precopyPages = 0
    public var demandPages = 0
    public var backgroundPages = 0
    public var zeroPages = 0
    public var bytesSent: UInt64 = 0
    public var nonZeroBytes: UInt64 = 0
    public var faultRequests = 0
    public var reconnects = 0
    public var digest: UInt64 = 0
    public var postcopySeconds = 0.0
    /// Seconds a plain TCP copy of `nonZeroBytes` took on the same link (when measured).
    public var baselineSeconds: Double?
    public var guestMismatchesBeforeMigration = 0
    public var passesBeforeMigration: UInt64 = 0
    public var throughputMBps: Double { postcopySeconds > 0 ? Double(bytesSent) / postcopySeconds / 1e6 : 0 }
}

/// The source side of a migration: pre-copy (optional), pause, switch-over, then serve the
/// destination - its page requests first, on their own connection, and a background stream
/// of everything else - until every page is there and the destination confirmed the digest.
public final class MigrationSource: @unchecked Sendable {
    public let vm: MigratableVM
    public let options: MigrationOptions
    let layout: MachineLayout
    let sessionID = UInt64.random(in: 1...UInt64.max)

    /// Set = the destination has (or is being sent) the current contents of the page.
    var done: PageBitmap
    /// CRC32C of each page as last sent (the encoder computes it anyway): the memory digest
    /// of post-copy pages is built from these, without reading guest memory a second time.
    let sentCRC: UnsafeMutablePointer<UInt32>
    let cursor = ManagedAtomic<Int>(0)
    let demandServed = ManagedAtomic<Int>(0)
    let requests = ManagedAtomic<Int>(0)
    let zeroCount = ManagedAtomic<Int>(0)
    var report = SourceReport()

    var bulk: WireChannel!
    var fault: WireChannel!
    var faultThread: OSThread?
    let broken = ManagedAtomic<Bool>(false)
    var bytesFromClosedChannels: UInt64 = 0

    public init(vm: MigratableVM, options: MigrationOptions) {
        self.vm = vm
        self.options = options
        self.layout = vm.layout
        self.done = PageBitmap(count: vm.layout.totalPages)
        sentCRC = .allocate(capacity: vm.layout.totalPages)
        sentCRC.initialize(repeating: 0, count: vm.layout.totalPages)
        residency = .allocate(capacity: max(vm.layout.ramPages, 1))
        residency.initialize(repeating: 1, count: max(vm.layout.ramPages, 1))
    }

    deinit {
        sentCRC.deallocate()
        residency.deallocate()
    }

    var hello: WireMessage.Hello {
        WireMessage.Hello(role: .bulk, sessionID: sessionID, layout: layout.memory, vcpuCount: UInt32(layout.vcpus),
                          features: .supported)
    }

    // MARK: connections

    func connect() throws {
        let deadline = fl_now_ns() + UInt64(options.reconnectSeconds * 1e9)
        let b = WireChannel(socket: try StreamSocket.connect(to: options.destination, timeoutSeconds: options.reconnectSeconds), role: .bulk)
        try b.send(.hello(hello))
        var faultHello = hello
        faultHello.role = .fault
        let f = WireChannel(socket: try StreamSocket.connect(to: options.destination,
                                                             timeoutSeconds: max(1, Double(deadline &- fl_now_ns()) / 1e9)), role: .fault)
        try f.socket.preferLatency()
        try f.send(.hello(faultHello))
        for channel in [b, f] {
            switch try channel.receive() {
            case .helloAck: break
            case .reject(let reason): throw MigrationError.rejected(reason)
            case .error(let message): throw MigrationError.peerError(message)
            case let other: throw MigrationError.protocolViolation("expected helloAck, got \(other.type)")
            }
        }
        bulk = b
        fault = f
        broken.store(false, ordering: .sequentiallyConsistent)
    }

    // MARK: sending pages

    /// One byte per RAM page from mincore(2): a page the guest never touched is not resident
    /// and is zero, so it is sent as a marker without reading (and faulting in) the page.
    /// Trusted only while `residencyValid`: from a snapshot taken while the vCPUs are paused
    /// (or, in pre-copy, before the round that uses it) until the next pause.
    let residency: UnsafeMutablePointer<UInt8>
    let residencyValid = ManagedAtomic<Bool>(false)

    func isUntouched(_ page: Int) -> Bool {
        let i = page - layout.lowPages
        return i >= 0 && i < layout.ramPages && residencyValid.load(ordering: .acquiring) && residency[i] & 1 == 0
    }

    func takeResidency() {
        residencyValid.store(false, ordering: .sequentiallyConsistent)
        // On failure every page is read and checked.
        if mincore(vm.ram.base, Int(layout.ramSize), residency) == 0 { residencyValid.store(true, ordering: .releasing) }
    }

    func append(_ page: Int, to encoder: inout WireEncoder, channel: WireChannel, corrupt: Bool = false) throws -> Bool {
        let ptr = UnsafeRawBufferPointer(start: vm.pagePointer(page), count: 4096)
        let zero = isUntouched(page) || PageBatch.isAllZero(ptr)
        if zero {
            encoder.appendZeroPage(index: UInt64(page))
            zeroCount.wrappingIncrement(ordering: .relaxed)
            sentCRC[page] = MemoryDigest.zeroPageCRC
        } else {
            sentCRC[page] = encoder.appendPage(index: UInt64(page), bytes: ptr)
        }
        if corrupt && !zero {
            encoder.endPages()
            var bytes = encoder.bytes
            bytes[bytes.count - 1] ^= 0x01  // the last byte of this page's data: its CRC no longer matches
            encoder.removeAll()
            try channel.sendRaw(bytes)
            encoder.beginPages(pageSize: 4096)
        }
        if !encoder.canAppendPage || encoder.openBatchPageCount >= options.batchPages {
            encoder.endPages()
            try channel.flush(&encoder)
            encoder.beginPages(pageSize: 4096)
        }
        return !zero
    }

    func finish(_ encoder: inout WireEncoder, channel: WireChannel) throws {
        encoder.endPages()
        try channel.flush(&encoder)
    }

    // MARK: the migration

    public func migrate() throws -> SourceReport {
        let t0 = fl_now_ns()
        try connect()
        // Ready before the switch-over: the destination's first faults come right after it.
        try startFaultServer()
        report.passesBeforeMigration = vm.counters.totalPasses
        var encoder = WireEncoder(reservingCapacity: (options.batchPages + 1) * 4200)

        // Pre-copy: everything once, then what the guest dirtied, while it runs.
        var dirty = PageBitmap(count: layout.totalPages)
        if options.precopyRounds > 0 {
            try vm.setRAMSlot(dirtyLogging: true)
            let bits = UnsafeMutableRawPointer.allocate(byteCount: (layout.ramPages + 63) / 64 * 8, alignment: 8)
            defer { bits.deallocate() }
            try vm.vm.getDirtyLog(slot: 1, into: bits)  // start tracking from here
            let deadline = t0 + UInt64(options.precopySeconds * 1e9)
            var toSend = Array(layout.lowPages..<layout.totalPages)
            var lastDirty = Int.max
            for round in 0..<options.precopyRounds {
                takeResidency()  // a page touched after this is in the next dirty log
                encoder.beginPages(pageSize: 4096)
                for page in toSend {
                    _ = try append(page, to: &encoder, channel: bulk)
                    done.insert(page)
                }
                try finish(&encoder, channel: bulk)
                report.precopyPages += toSend.count
                report.precopyRounds = round + 1
                memset(bits, 0, (layout.ramPages + 63) / 64 * 8)
                try vm.vm.getDirtyLog(slot: 1, into: bits)
                dirty = PageBitmap(count: layout.totalPages)
                dirty.merge(kernelBitmap: bits, pages: layout.ramPages, firstPage: layout.lowPages)
                toSend = []
                dirty.forEachSetPage { toSend.append($0) }
                // Stop when the dirty set stops shrinking or time is up: post-copy takes the rest.
                if toSend.count >= lastDirty || fl_now_ns() > deadline { break }
                lastDirty = toSend.count
            }
        }

        // Switch-over: pause, final dirty set, vCPU state, low memory, the page set still owed.
        let tPause = fl_now_ns()
        vm.pause()
        residencyValid.store(false, ordering: .sequentiallyConsistent)  // retaken below, while paused
        if options.precopyRounds > 0 {
            let bits = UnsafeMutableRawPointer.allocate(byteCount: (layout.ramPages + 63) / 64 * 8, alignment: 8)
            defer { bits.deallocate() }
            memset(bits, 0, (layout.ramPages + 63) / 64 * 8)
            try vm.vm.getDirtyLog(slot: 1, into: bits)
            dirty.merge(kernelBitmap: bits, pages: layout.ramPages, firstPage: layout.lowPages)
            var missed = !options.missOneDirtyPage
            dirty.forEachSetPage { page in
                if !missed && CRC32C.checksum(UnsafeRawBufferPointer(start: vm.pagePointer(page), count: 4096)) != sentCRC[page] {
                    missed = true
                    return
                }
                done.remove(page)
            }
        }
        // Pages pre-copy sent that the guest did not dirty afterwards: the destination keeps
        // them. Their digest is recomputed below from the paused memory, not from what was
        // sent, so a write the dirty log missed fails the migration instead of passing silently.
        let carried = PageBitmap(count: layout.totalPages)
        if options.precopyRounds > 0 { done.forEachSetPage { carried.insert($0) } }
        report.guestMismatchesBeforeMigration = vm.counters.mismatches.load(ordering: .relaxed)
        for id in 0..<layout.vcpus { try bulk.send(.vcpuState(id: UInt32(id), blob: try vm.vcpuStateBlob(id))) }
        encoder.beginPages(pageSize: 4096)
        for page in 0..<layout.lowPages {
            _ = try append(page, to: &encoder, channel: bulk)
            done.insert(page)
        }
        try finish(&encoder, channel: bulk)
        var owed: [Range<UInt64>] = []
        done.forEachClearRange { owed.append(UInt64($0.lowerBound)..<UInt64($0.upperBound)) }
        try bulk.send(.pageSetSummary(owed))
        switch try bulk.receive() {
        case .ack: break
        case .error(let m): throw MigrationError.peerError(m)
        case let other: throw MigrationError.protocolViolation("expected the running ack, got \(other.type)")
        }
        let tRunning = fl_now_ns()
        report.downtimeMilliseconds = Double(tRunning - tPause) / 1e6
        takeResidency()  // the vCPUs stay paused: valid for the rest of the migration

        // Post-copy: digest of the carried pages from the paused memory, fault server,
        // background stream. Every other page is sent from the paused memory, so the CRC it
        // was sent with is the CRC of the paused state.
        var carriedDigest: UInt64 = 0
        let digestThread = try OSThread(name: "digest") { [self] in
            var d: UInt64 = 0
            carried.forEachSetPage { page in
                d ^= MemoryDigest.mix(page: page, crc: CRC32C.checksum(UnsafeRawBufferPointer(start: vm.pagePointer(page), count: 4096)))
            }
            carriedDigest = d
        }
        var digestValue: UInt64 = 0
        var sentBackground = 0
        var injectedCut = false, injectedCorruption = false
        while true {
            do {
                encoder.removeAll()
                encoder.beginPages(pageSize: 4096)
                while let page = done.firstClear(from: cursor.load(ordering: .relaxed)) {
                    cursor.store(page + 1 < layout.totalPages ? page + 1 : 0, ordering: .relaxed)
                    guard done.insert(page) else { continue }
                    let corrupt = options.corruptOnePage && !injectedCorruption
                    if try append(page, to: &encoder, channel: bulk, corrupt: corrupt) {
                        report.nonZeroBytes += 4096
                        if corrupt { injectedCorruption = true }
                    }
                    sentBackground += 1
                    if options.progress && sentBackground % 4096 == 0 { progressBar(done.populationCount, layout.totalPages) }
                    if let cut = options.disconnectAfterPages, !injectedCut, sentBackground >= cut {
                        injectedCut = true
                        bulk.close()
                        fault.close()
                    }
                    if broken.load(ordering: .relaxed) { throw MigrationError.connectionClosed("fault connection") }
                }
                try finish(&encoder, channel: bulk)
                digestThread.join()
                digestValue = carriedDigest
                for page in 0..<layout.totalPages where !carried.contains(page) {
                    digestValue ^= MemoryDigest.mix(page: page, crc: sentCRC[page])
                }
                try bulk.send(.digest(algorithm: .pageCRC32CXor, bytes: MemoryDigest.bytes(digestValue)))
                try bulk.send(.complete)
                // The destination's verdict: ack when the digest matched.
                switch try bulk.receive() {
                case .ack: break
                case .error(let m): throw MigrationError.peerError(m)
                case let other: throw MigrationError.protocolViolation("expected the final ack, got \(other.type)")
                }
                break
            } catch let error as MigrationError {
                guard case .connectionClosed = error else { throw error }
                try reconnectAndResume()
            } catch let error as SystemError {
                guard [EPIPE, ECONNRESET, ENOTCONN, ESHUTDOWN, ETIMEDOUT, EAGAIN].contains(error.errno) else { throw error }
                try reconnectAndResume()
            } catch let error as WireError {
                guard case .truncated = error else { throw error }
                try reconnectAndResume()
            }
        }
        if options.progress { progressBar(layout.totalPages, layout.totalPages); fputs("\n", stderr) }
        stopFaultServer()
        report.demandPages = demandServed.load(ordering: .relaxed)
        report.backgroundPages = sentBackground
        report.zeroPages = zeroCount.load(ordering: .relaxed)
        report.faultRequests = requests.load(ordering: .relaxed)
        report.bytesSent = bytesFromClosedChannels + bulk.bytesSent + fault.bytesSent
        report.digest = digestValue
        let tEnd = fl_now_ns()
        report.postcopySeconds = Double(tEnd - tRunning) / 1e9
        report.totalSeconds = Double(tEnd - t0) / 1e9
        return report
    }

    /// Times a plain TCP copy of the same number of non-zero bytes to the destination,
    /// on the same link, right after the migration (the yardstick for its total time).
    public func measureBaseline(_ report: inout SourceReport) throws {
        let bytes = max(report.nonZeroBytes, 4096)
        try bulk.send(.ack(2))
        let t0 = fl_now_ns()
        let socket = try StreamSocket.connect(to: options.destination)
        var left = bytes
        var page = layout.lowPages
        while left > 0 {
            let n = min(left, 1 << 20, UInt64(layout.totalPages - page) * 4096)
            try socket.sendAll(UnsafeRawBufferPointer(start: vm.pagePointer(page), count: Int(n)))
            left -= n
            page += Int(n / 4096)
            if page >= layout.totalPages { page = layout.lowPages }
        }
        socket.shutdown()
        guard case .ack(let received) = try bulk.receive(), received == bytes else {
            throw MigrationError.protocolViolation("the baseline copy was not acknowledged")
        }
        report.baselineSeconds = Double(fl_now_ns() - t0) / 1e9
    }

    func progressBar(_ have: Int, _ total: Int) {
        guard isatty(2) != 0 else { return }
        let width = 40, filled = total > 0 ? have * width / total : width
        fputs("\r[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
              + "] \(have * 100 / max(total, 1))% of \(total) pages", stderr)
    }

    /// After a broken connection: reconnect within the timeout, learn from the destination
    /// which pages it still lacks, and carry on from there. Nothing already installed is lost.
    func reconnectAndResume() throws {
        stopFaultServer()
        bytesFromClosedChannels += bulk.bytesSent + fault.bytesSent
        bulk.close()
        fault.close()
        let deadline = fl_now_ns() + UInt64(options.reconnectSeconds * 1e9)
        var lastError: Error?
        while fl_now_ns() < deadline {
            do {
                try connect()
                guard case .resume(let session, _, let missing) = try bulk.receive(), session == sessionID else {
                    throw MigrationError.protocolViolation("expected resume for session \(sessionID)")
                }
                done.insert(0..<layout.totalPages)
                for r in missing where r.upperBound <= UInt64(layout.totalPages) {
                    for p in Int(r.lowerBound)..<Int(r.upperBound) { done.remove(p) }
                }
                cursor.store(0, ordering: .relaxed)
                report.reconnects += 1
                try startFaultServer()
                return
            } catch {
                lastError = error
                usleep(100_000)
            }
        }
        throw MigrationError.timeout("reconnecting to \(options.destination): \(lastError.map { "\($0)" } ?? "no answer")")
    }

    // MARK: fault server

    func startFaultServer() throws {
        let channel = fault!
        faultThread = try OSThread(name: "fault server", niceness: OSThread.Niceness.faultPath,
                                   cpu: options.faultPathCPU.resolved) { [self] in
            var encoder = WireEncoder(reservingCapacity: 64 * 4200)
            do {
                while true {
                    switch try channel.receive() {
                    case .pageRequest(let requestID, let first, let count):
                        requests.wrappingIncrement(ordering: .relaxed)
                        encoder.beginPages(pageSize: 4096, replyingTo: requestID)
                        let end = min(first &+ UInt64(count), UInt64(layout.totalPages))
                        if first < end {
                            for page in Int(first)..<Int(end) {
                                let ptr = UnsafeRawBufferPointer(start: vm.pagePointer(page), count: 4096)
                                if isUntouched(page) || PageBatch.isAllZero(ptr) {
                                    encoder.appendZeroPage(index: UInt64(page))
                                    sentCRC[page] = MemoryDigest.zeroPageCRC
                                } else {
                                    sentCRC[page] = encoder.appendPage(index: UInt64(page), bytes: ptr)
                                }
                                if done.insert(page) { demandServed.wrappingIncrement(ordering: .relaxed) }
                            }
                            // Stream the neighbourhood of a fault next (locality, as QEMU does).
                            cursor.store(Int(end) < layout.totalPages ? Int(end) : 0, ordering: .relaxed)
                        }
                        encoder.endPages()
                        try channel.flush(&encoder)
                    case .prioritize(let page):
                        if page < UInt64(layout.totalPages) { cursor.store(Int(page), ordering: .relaxed) }
                    case let other:
                        throw MigrationError.protocolViolation("unexpected \(other.type) on the fault connection")
                    }
                }
            } catch {
                broken.store(true, ordering: .sequentiallyConsistent)
            }
        }
    }

    func stopFaultServer() {
        fault?.close()
        faultThread?.join()
        faultThread = nil
    }
}
