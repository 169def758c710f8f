import Atomics
import CFaultlineShim
import FaultlineCore
import FaultlineLinux
import Histogram
#if canImport(Glibc)
import Glibc
#endif

public struct DestinationOptions: Sendable {
    public var listen: SocketEndpoint
    /// How faults reach the page source: vcpu-exit, uffd-missing or uffd-minor.
    public var faultMode: FaultMode = .vcpuExit
    public var uffd: UffdTopology = .single
    public var readers = 1
    /// Keep the guest running this long after the migration completed (then stop).
    public var runAfterSeconds = 1.0
    public var acceptSeconds = 60.0
    public var reconnectSeconds = 30.0
    /// Niceness of the vCPU threads while post-copy runs (the stream they wait for goes
    /// first); back to 0 once every page is in.
    public var vcpuNicenessDuringPostcopy: Int32 = OSThread.Niceness.vcpuDuringPostcopy
    /// Install MISSING-mode pages by UFFDIO_MOVE from a pre-populated pool (when the kernel has MOVE).
    public var usePool = true
    /// Populate this much memory before the source connects (like QEMU's -mem-prealloc on
    /// an incoming VM): the cost of backing fresh pages is paid before the migration, not
    /// during it. 0: prepare memory when the source says how much it needs.
    public var preallocBytes: UInt64 = 0
    /// The CPU the fault-path threads share (requests out, replies in, uffd readers).
    public var faultPathCPU: FaultPathCPU = .automatic

    public init(listen: SocketEndpoint) { self.listen = listen }

    public func validate() throws {
        guard [.vcpuExit, .uffdMissing, .uffdMinor].contains(faultMode) else {
            throw DemandPagingConfig.Invalid("--fault-mode must be vcpu-exit, uffd-missing or uffd-minor")
        }
    }
}


public struct DestinationReport: Sendable {
    public var faultMode: FaultMode = .vcpuExit
    public var totalSeconds = 0.0
    public var switchoverMilliseconds = 0.0
    public var postcopySeconds = 0.0
    public var precopyPages = 0
    public var demandPages = 0
    public var backgroundPages = 0
    public var zeroPages = 0
    public var faults = 0
    public var corruptPagesRejected = 0
    public var reconnects = 0
    public var bytesReceived: UInt64 = 0
    public var faultLatencyMicroseconds: (p50: Double, p90: Double, p99: Double, max: Double) = (0, 0, 0, 0)
    public var vcpuStallMilliseconds: [Double] = []
    public var digestMatch = false
    public var sourceDigest: UInt64 = 0
    public var destinationDigest: UInt64 = 0
    public var guestMismatches = 0
    public var firstMismatch: String?
    public var passesAfterMigration: UInt64 = 0
}

/// The destination side: builds the same machine, takes pre-copied pages, starts the vCPUs
/// at switch-over and resolves their faults from the network - requests on the fault
/// connection, a background stream on the bulk one - until every page is present; then the
/// guest runs on plain memory.
public final class MigrationDestination: RAMFaultHandler, @unchecked Sendable {
    public let options: DestinationOptions
    var vm: MigratableVM!
    var layout: MachineLayout!
    var sessionID: UInt64 = 0
    var present: PageBitmap!
    /// Set by the one installer that owns a page's installation: with MINOR faults the bytes
    /// are written into the shared file before UFFDIO_CONTINUE, so two installers racing on
    /// one page could overwrite what the guest already wrote there. Claiming first makes
    /// every install exclusive (for UFFDIO_COPY it also saves the losing copy).
    var claimed: PageBitmap!
    var requested: PageBitmap!
    var requestTime: UnsafeMutablePointer<UInt64>!
    var requestVcpu: UnsafeMutablePointer<Int32>!
    var stallNanoseconds: UnsafeMutablePointer<UInt64.AtomicRepresentation>!
    var crc: UnsafeMutablePointer<UInt32>!
    var uffds: [Userfaultfd] = []
    var pagesPerUffd = 0
    var switchedOver = false
    let listener: ListeningSocket

    var bulk: WireChannel!
    var fault: WireChannel!
    var channelLock = pthread_mutex_t()
    var waitLock = pthread_mutex_t()
    var waitCond = pthread_cond_t()
    let stopping = ManagedAtomic<Bool>(false)
    let fatalFault = ManagedAtomic<Bool>(false)
    var faultReceiver: OSThread?
    var readerThreads: [OSThread] = []
    var stopFD: Int32 = -1
    let installLock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

    let demandCount = ManagedAtomic<Int>(0)
    let backgroundCount = ManagedAtomic<Int>(0)
    let zeroCount = ManagedAtomic<Int>(0)
    let faultCount = ManagedAtomic<Int>(0)
    let corruptCount = ManagedAtomic<Int>(0)
    var latency = Histogram<UInt32>(lowestDiscernibleValue: 1, highestTrackableValue: 120_000_000_000,
                                    numberOfSignificantValueDigits: .two)
    var report = DestinationReport()
    let zeroPage = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
    /// Pre-populated private pages that incoming data is written into and then moved into
    /// guest RAM with UFFDIO_MOVE (no page allocation, no second copy on the install path).
    var pool: UnsafeMutableRawPointer?
    var poolPages = 0
    let poolNext = ManagedAtomic<Int>(0)

    public init(options: DestinationOptions) throws {
        try options.validate()
        self.options = options
        listener = try ListeningSocket(endpoint: options.listen)
        pthread_mutex_init(&channelLock, nil)
        pthread_mutex_init(&waitLock, nil)
        pthread_cond_init(&waitCond, nil)
        pthread_mutex_init(installLock, nil)
        memset(zeroPage, 0, 4096)
        report.faultMode = options.faultMode
    }

    /// The port actually bound (for `--listen :0`).
    public var endpoint: SocketEndpoint { listener.endpoint }

    // MARK: connections

    /// Accepts a bulk and a fault connection of one session (any order).
    func acceptPair(timeout: Double, expectSession: UInt64?, ack: Bool = true) throws -> (WireChannel, WireChannel, WireMessage.Hello) {
        var channels: [ConnectionRole: WireChannel] = [:]
        var hello: WireMessage.Hello?
        let deadline = fl_now_ns() + UInt64(timeout * 1e9)
        while channels.count < 2 {
            let left = Double(deadline &- fl_now_ns()) / 1e9
            guard fl_now_ns() < deadline, let socket = try listener.accept(timeoutSeconds: max(0.01, left)) else {
                throw MigrationError.timeout("waiting for the source on \(listener.endpoint)")
            }
            socket.setReceiveTimeout(seconds: 10)
            let channel = WireChannel(socket: socket, role: .bulk)
            let message: WireMessage
            do {
                message = try channel.receive()
            } catch let error as WireError {
                try? channel.send(.error(message: "\(error)"))
                throw error
            }
            guard case .hello(let h) = message else {
                try? channel.send(.reject(reason: "expected hello"))
                throw MigrationError.protocolViolation("the peer's first message is \(message.type), not hello")
            }
            if let s = expectSession ?? hello?.sessionID, h.sessionID != s {
                try? channel.send(.reject(reason: "unknown session \(h.sessionID)"))
                continue
            }
            socket.setReceiveTimeout(seconds: 0)
            if h.role == .fault { try socket.preferLatency() }
            channels[h.role] = WireChannel(socket: socket, role: h.role)
            if ack { try channels[h.role]!.send(.helloAck(version: WireProtocol.version, features: h.features.intersection(.supported))) }
            hello = h
        }
        return (channels[.bulk]!, channels[.fault]!, hello!)
    }

    var currentFault: WireChannel? {
        pthread_mutex_lock(&channelLock)
        defer { pthread_mutex_unlock(&channelLock) }
        return fault
    }

    /// MISSING-based modes: populate a pool as large as guest RAM before the switch-over.
    func preparePool(ramBytes: UInt64) {
        guard options.faultMode != .uffdMinor, options.usePool,
              (try? Userfaultfd.availableFeatures().contains(.move)) == true else { return }
        // Room for every RAM page plus the partly used chunks of two installer threads.
        let pages = Int(ramBytes / 4096) + 8 * PoolCursor.chunkPages
        if pool != nil && poolPages >= pages { return }
        if let old = pool { munmap(old, poolPages * 4096); pool = nil }
        guard let p = mmap(nil, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0),
              p != MAP_FAILED else { return }
        pool = p
        poolPages = pages
    }

    /// Takes `count` contiguous pool pages, or nil when the pool is used up.
    func takePool(_ count: Int) -> UnsafeMutableRawPointer? {
        guard let pool else { return nil }
        let first = poolNext.loadThenWrappingIncrement(by: count, ordering: .relaxed)
        guard first + count <= poolPages else { return nil }
        return pool + first * 4096
    }

    // MARK: installing pages

    @inline(__always) func ramOffset(_ page: Int) -> UInt64 { UInt64(page - layout.lowPages) * 4096 }

    /// Installs one page (nil data = zero page). Returns false when it was already present.
    /// A page is never installed unless its checksum was verified by the decoder.
    @discardableResult
    func install(_ page: Int, data: UnsafeRawPointer?, checksum: UInt32, demand: Bool) throws -> Bool {
        try checkIndex(page)
        guard !present.contains(page), claimed.insert(page) else { return false }
        do {
            _ = try installRun(first: page, count: 1, data: data)  // EEXIST: mapped with these bytes already
        } catch {
            claimed.remove(page)
            throw error
        }
        return markInstalled(page, checksum: data == nil ? MemoryDigest.zeroPageCRC : checksum)
    }

    func checkIndex(_ page: Int) throws {
        guard page >= 0, page < layout.totalPages else {
            throw MigrationError.protocolViolation("page \(page) is outside guest memory (\(layout.totalPages) pages)")
        }
    }

    /// Maps `count` consecutive pages from contiguous `data` (nil: zero pages) with one
    /// ioctl. False when some page was already there (the caller falls back to single pages).
    func installRun(first page: Int, count: Int, data: UnsafeRawPointer?, fromPool: Bool = false) throws -> Bool {
        let length = count * 4096
        if page < layout.lowPages || !switchedOver {
            // Before the switch-over nothing runs: plain stores (pwrite for MINOR, so the
            // pages stay unmapped and later fault as MINOR).
            for i in 0..<count {
                let bytes = data.map { $0 + i * 4096 } ?? UnsafeRawPointer(zeroPage)
                if page + i >= layout.lowPages && options.faultMode == .uffdMinor {
                    try vm.ram.writeFile(at: ramOffset(page + i), from: bytes, length: 4096)
                } else {
                    vm.pagePointer(page + i).copyMemory(from: bytes, byteCount: 4096)
                }
            }
            return true
        }
        let offset = ramOffset(page)
        let uffd = uffds[(page - layout.lowPages) / pagesPerUffd]
        let destination = HostAddress(rawValue: vm.ram.hostAddress.rawValue + offset)
        let wake = options.faultMode != .vcpuExit
        let outcome: UffdInstallOutcome
        switch options.faultMode {
        case .uffdMinor:
            if let data { try vm.ram.writeFile(at: offset, from: data, length: length) }
            else { for i in 0..<count { try vm.ram.writeFile(at: offset + UInt64(i * 4096), from: zeroPage, length: 4096) } }
            outcome = try uffd.continue(at: destination, length: UInt64(length), dontWake: !wake)
        default:
            // A page mapped meanwhile by the other installer holds the same verified bytes:
            // step over it and map the rest of the run.
            if let data, fromPool {
                outcome = try uffd.move(to: destination, from: HostAddress(data), length: UInt64(length), dontWake: !wake,
                                        skippingPresent: 4096)
            } else if let data {
                outcome = try uffd.copy(to: destination, from: data, length: UInt64(length), dontWake: !wake, skippingPresent: 4096)
            } else {
                outcome = try uffd.zeroPage(at: destination, length: UInt64(length), dontWake: !wake, skippingPresent: 4096)
            }
        }
        return outcome == .installed
    }

    /// Bookkeeping after a page is mapped: checksum for the digest, present bit, latency.
    @discardableResult
    func markInstalled(_ page: Int, checksum: UInt32) -> Bool {
        crc[page] = checksum
        guard present.insert(page) else { return false }
        if checksum == MemoryDigest.zeroPageCRC { zeroCount.wrappingIncrement(ordering: .relaxed) }
        let asked = requestTime[page]
        if asked != 0 && switchedOver {
            let waited = fl_now_ns() &- asked
            pthread_mutex_lock(installLock)
            _ = latency.record(waited)
            pthread_mutex_unlock(installLock)
            let v = Int(requestVcpu[page])
            if v >= 0 && options.faultMode != .vcpuExit {
                UnsafeAtomic<UInt64>(at: stallNanoseconds + v).wrappingIncrement(by: waited, ordering: .relaxed)
            }
        }
        return true
    }

    func wakeWaiters() {
        guard options.faultMode == .vcpuExit && switchedOver else { return }
        pthread_mutex_lock(&waitLock)
        pthread_cond_broadcast(&waitCond)
        pthread_mutex_unlock(&waitLock)
    }

    /// Installs a verified batch: runs of consecutive missing pages of one kind go in with one
    /// ioctl each (staged contiguously), the rest page by page.
    /// An installer thread's current chunk of pool pages (runs are written straight into it).
    struct PoolCursor {
        var base: UnsafeMutableRawPointer?
        var used = 0
        var capacity = 0
        static let chunkPages = 1024
    }

    func installBatch(_ batch: PageBatch, demand: Bool, staging: UnsafeMutableRawPointer, stagingPages: Int,
                      cursor: inout PoolCursor) throws {
        var runStart = -1, runCount = 0, runZero = false
        var runBuffer = staging
        var runInPool = false
        var runCapacity = stagingPages
        var runCRC: [UInt32] = []
        runCRC.reserveCapacity(stagingPages)
        let counter = demand ? demandCount : backgroundCount
        func flush() throws {
            guard runCount > 0 else { return }
            // A run in the pool is moved from there, zero runs included (pool pages are zero
            // until data is written into them): the guest's first write to such a page then
            // costs nothing, where a UFFDIO_ZEROPAGE mapping costs a copy-on-write fault, a
            // page allocation and a TLB-flush IPI - measured at most of the destination's CPU
            // while a dirtier guest runs.
            let runData: UnsafeRawPointer? = runZero && !runInPool ? nil : UnsafeRawPointer(runBuffer)
            // Pool pages of this run are never handed out again, whatever happens to it.
            defer {
                if runInPool { cursor.used += runCount }
                runCount = 0
                runCRC.removeAll(keepingCapacity: true)
            }
            let installedRun: Bool
            do {
                installedRun = try installRun(first: runStart, count: runCount, data: runData, fromPool: runInPool)
            } catch {
                for i in 0..<runCount { claimed.remove(runStart + i) }  // someone else may install them later
                throw error
            }
            if installedRun {
                for i in 0..<runCount where markInstalled(runStart + i, checksum: runCRC[i]) && switchedOver {
                    counter.wrappingIncrement(ordering: .relaxed)
                }
            } else {
                // Raced with another installer: page by page. A page that turns out to be mapped
                // already holds these very bytes (ours from the partial run, or the same verified
                // page from the other connection), so it is marked present either way.
                for i in 0..<runCount {
                    let page = runStart + i
                    if present.contains(page) { continue }
                    _ = try installRun(first: page, count: 1, data: runData.map { $0 + i * 4096 }, fromPool: runInPool)
                    if markInstalled(page, checksum: runCRC[i]), switchedOver {
                        counter.wrappingIncrement(ordering: .relaxed)
                    }
                }
            }
        }
        for p in batch {
            let page = Int(truncatingIfNeeded: p.index)
            try checkIndex(page)
            // MISSING modes: a demand reply does not wait for a bulk installer that claimed the
            // page first (it may be descheduled mid-run); whichever maps it first wins and the
            // other steps over it. MINOR writes the file before mapping, so there every
            // install stays exclusive.
            let claimedNow = claimed.insert(page)
            if present.contains(page) || (!claimedNow && !(demand && switchedOver && options.faultMode != .uffdMinor)) {
                try flush()
                continue
            }
            let zero = p.kind == .zero
            let contiguous = runCount > 0 && page == runStart + runCount && zero == runZero && runCount < runCapacity
                && page >= layout.lowPages && (page - layout.lowPages) / max(pagesPerUffd, 1) == (runStart - layout.lowPages) / max(pagesPerUffd, 1)
            if !contiguous {
                try flush()
                runStart = page
                runZero = zero
                // MISSING modes after the switch-over: write a bulk run straight into pool pages,
                // which UFFDIO_MOVE then maps (no page allocation, no second copy). A run ends
                // where its chunk of the pool ends, so no pool page is left unused. Demand
                // replies use UFFDIO_COPY: a move clears the pool's mapping and so flushes the
                // TLB of every CPU this process runs on (an IPI, slow under nested
                // virtualization), which a waiting vCPU should not pay for one page.
                runInPool = false
                runBuffer = staging
                runCapacity = stagingPages
                if switchedOver && pool != nil && page >= layout.lowPages && !demand {
                    if cursor.capacity == cursor.used, let chunk = takePool(PoolCursor.chunkPages) {
                        cursor = PoolCursor(base: chunk, used: 0, capacity: PoolCursor.chunkPages)
                    }
                    if let base = cursor.base, cursor.capacity > cursor.used {
                        runBuffer = base + cursor.used * 4096
                        runInPool = true
                        runCapacity = min(stagingPages, cursor.capacity - cursor.used)
                    }
                }
            }
            if !zero { p.withUnsafeBytes { (runBuffer + runCount * 4096).copyMemory(from: $0.baseAddress!, byteCount: 4096) } }
            runCRC.append(zero ? MemoryDigest.zeroPageCRC : p.checksum)
            runCount += 1
            // A vCPU is waiting for this page: map it now, not after the rest of the run.
            if switchedOver && requested.contains(page) { try flush() }
        }
        try flush()
        wakeWaiters()
    }

    // MARK: faults

    /// Sends a page request unless one is outstanding. Thread-safe; never blocks on the page.
    func request(_ page: Int, vcpu: Int, faultTime: UInt64 = fl_now_ns(), encoder: inout WireEncoder) {
        guard requested.insert(page) else { return }
        requestVcpu[page] = Int32(vcpu)
        requestTime[page] = faultTime
        faultCount.wrappingIncrement(ordering: .relaxed)
        guard let channel = currentFault else { return }
        do {
            try encoder.encode(.pageRequest(requestID: UInt64(page), pageIndex: UInt64(page), count: 1))
            try channel.flush(&encoder)
        } catch {
            encoder.removeAll()  // the connection is down: re-sent after the reconnect
        }
    }

    /// vcpu-exit: requests are handed to a fault-path thread, so a vCPU thread (which runs at
    /// low priority during post-copy) never holds the fault connection's send lock.
    var pendingLock = pthread_mutex_t()
    var pending: [(page: Int, vcpu: Int, time: UInt64)] = []
    var requestFD: Int32 = -1
    var requester: OSThread?

    func startRequester() throws {
        pthread_mutex_init(&pendingLock, nil)
        pending.reserveCapacity(layout.vcpus * 2)
        requestFD = fl_eventfd(0, Int32(O_CLOEXEC))
        requester = try OSThread(name: "fault requester", niceness: OSThread.Niceness.faultPath,
                                 cpu: options.faultPathCPU.resolved) { [self] in
            var encoder = WireEncoder(reservingCapacity: 4096)
            var batch: [(page: Int, vcpu: Int, time: UInt64)] = []
            batch.reserveCapacity(layout.vcpus * 2)
            var counter: UInt64 = 0
            while read(requestFD, &counter, 8) == 8 && !stopping.load(ordering: .relaxed) {
                pthread_mutex_lock(&pendingLock)
                swap(&batch, &pending)
                pthread_mutex_unlock(&pendingLock)
                for r in batch { request(r.page, vcpu: r.vcpu, faultTime: r.time, encoder: &encoder) }
                batch.removeAll(keepingCapacity: true)
            }
        }
    }

    func stopRequester() {
        guard let requester else { return }
        var one: UInt64 = 1
        _ = write(requestFD, &one, 8)
        requester.join()
        close(requestFD)
        self.requester = nil
    }

    /// vcpu-exit: the vCPU thread asks for the page and waits until it is installed.
    public func resolveOnVcpu(_ vcpu: Int, ramOffset: UInt64) throws {
        let page = layout.lowPages + Int(ramOffset / 4096)
        if present.contains(page) { return }
        let t0 = fl_now_ns()
        pthread_mutex_lock(&pendingLock)
        pending.append((page, vcpu, t0))
        pthread_mutex_unlock(&pendingLock)
        var one: UInt64 = 1
        _ = write(requestFD, &one, 8)
        pthread_mutex_lock(&waitLock)
        while !present.contains(page) && !stopping.load(ordering: .relaxed) {
            conditionWait(&waitCond, &waitLock, nanoseconds: 50_000_000)
        }
        pthread_mutex_unlock(&waitLock)
        UnsafeAtomic<UInt64>(at: stallNanoseconds + vcpu).wrappingIncrement(by: fl_now_ns() &- t0, ordering: .relaxed)
        if !present.contains(page) { throw MigrationError.connectionClosed("stopped while vcpu \(vcpu) waited for page \(page)") }
    }

    func vcpuForThread(_ tid: UInt32) -> Int {
        for i in 0..<layout.vcpus where vm.threadIDs[i] == Int32(bitPattern: tid) { return i }
        return -1
    }

    func readerLoop(_ uffd: Userfaultfd) {
        let events = UnsafeMutableBufferPointer<fl_uffd_msg>.allocate(capacity: 16)
        defer { events.deallocate() }
        var encoder = WireEncoder(reservingCapacity: 64)
        let base = vm.ram.hostAddress.rawValue
        do {
            while try uffd.waitReadable(orStop: stopFD) {
                let n = try uffd.readEvents(into: events)
                for i in 0..<n {
                    guard case .pagefault(let address, _, let tid) = UffdEvent(events[i]) else { continue }
                    let offset = (address.rawValue &- base) & ~4095
                    let page = layout.lowPages + Int(offset / 4096)
                    if present.contains(page) {
                        // Installed meanwhile: make sure the faulting thread is not left asleep.
                        let at = HostAddress(rawValue: base + offset)
                        if options.faultMode == .uffdMinor { _ = try uffd.continue(at: at, length: 4096) }
                        else { try uffd.wake(start: at, length: 4096) }
                        continue
                    }
                    request(page, vcpu: vcpuForThread(tid), encoder: &encoder)
                }
            }
        } catch {
            fputs("faultline receive: \(uffd.label) reader: \(error)\n", stderr)
        }
    }

    func startFaultReceiver() {
        let channel = fault!
        faultReceiver = try? OSThread(name: "fault receiver", niceness: OSThread.Niceness.faultPath,
                                         cpu: options.faultPathCPU.resolved) { [self] in
            let staging = UnsafeMutableRawPointer.allocate(byteCount: 64 * 4096, alignment: 4096)
            defer { staging.deallocate() }
            var cursor = PoolCursor()
            while true {
                do {
                    switch try channel.receive() {
                    case .pageReply(_, let batch): try installBatch(batch, demand: true, staging: staging, stagingPages: 64, cursor: &cursor)
                    case .error(let m): fputs("faultline receive: the source reported: \(m)\n", stderr); return
                    case let other: throw MigrationError.protocolViolation("unexpected \(other.type) on the fault connection")
                    }
                } catch let error as WireError where error.leavesStreamInSync {
                    // A corrupted reply is dropped, never installed; ask again for everything outstanding.
                    if case .checksumMismatch = error { corruptCount.wrappingIncrement(ordering: .relaxed) }
                    rerequestOutstanding()
                } catch {
                    // Connection gone: the bulk loop notices and reconnects. Anything else is fatal.
                    if !Self.isConnectionLoss(error) && !stopping.load(ordering: .relaxed) {
                        fputs("faultline receive: fault receiver: \(error)\n", stderr)
                        fatalFault.store(true, ordering: .relaxed)
                    }
                    return
                }
            }
        }
    }

    func rerequestOutstanding() {
        var encoder = WireEncoder(reservingCapacity: 4096)
        guard let channel = currentFault else { return }
        for page in layout.lowPages..<layout.totalPages where requested.contains(page) && !present.contains(page) {
            try? encoder.encode(.pageRequest(requestID: UInt64(page), pageIndex: UInt64(page), count: 1))
            if encoder.bytes.count > 60_000 { try? channel.flush(&encoder) }
        }
        try? channel.flush(&encoder)
    }

    /// Asks for every page still missing (after the stream ended, e.g. a dropped corrupt batch).
    func requestMissing() {
        var encoder = WireEncoder(reservingCapacity: 4096)
        guard let channel = currentFault else { return }
        for page in 0..<layout.totalPages where !present.contains(page) {
            requested.insert(page)
            try? encoder.encode(.pageRequest(requestID: UInt64(page), pageIndex: UInt64(page), count: 1))
            if encoder.bytes.count > 60_000 { try? channel.flush(&encoder) }
        }
        try? channel.flush(&encoder)
    }

    // MARK: switch-over

    func switchOver(owed: [Range<UInt64>]) throws {
        // Pages the source will send again (dirtied after pre-copy): drop our stale copy.
        for r in owed {
            guard r.upperBound <= UInt64(layout.totalPages), r.lowerBound >= UInt64(layout.lowPages) else {
                throw MigrationError.protocolViolation("owed range \(r) is outside guest RAM")
            }
            var had = false
            for page in Int(r.lowerBound)..<Int(r.upperBound) where present.remove(page) {
                claimed.remove(page)
                had = true
            }
            // One madvise per range (MINOR keeps the stale copy in the file: it is unmapped and is
            // overwritten before UFFDIO_CONTINUE maps it).
            if had && options.faultMode != .uffdMinor {
                try vm.ram.discard(offset: ramOffset(Int(r.lowerBound)), length: UInt64(r.count) * 4096)
            }
        }
        // Register userfaultfd over RAM.
        let features: UffdFeatures = options.faultMode == .uffdMinor ? .minorShmem
            : (options.faultMode == .vcpuExit ? [.sigbus] : [.threadID])
        let mode: UffdRegisterMode = options.faultMode == .uffdMinor ? .minor : .missing
        let count = options.uffd == .perVcpu && options.faultMode != .vcpuExit ? layout.vcpus : 1
        pagesPerUffd = layout.ramPages / count
        for i in 0..<count {
            let u = try Userfaultfd(required: features.union(options.faultMode == .vcpuExit ? [] : [.threadID])
                                        .union(pool != nil ? [.move] : []), label: "uffd \(i)")
            try u.register(start: vm.ram.hostAddress.adding(UInt64(i * pagesPerUffd) * 4096)!,
                           length: UInt64(pagesPerUffd) * 4096, mode: mode)
            uffds.append(u)
        }
        switchedOver = true
        if options.faultMode == .vcpuExit {
            try startRequester()
            vm.faultHandler = self
        } else {
            for u in uffds {
                for _ in 0..<options.readers {
                    readerThreads.append(try OSThread(name: "\(u.label) reader", niceness: OSThread.Niceness.faultPath,
                                                      cpu: options.faultPathCPU.resolved) { [self] in
                        readerLoop(u)
                    })
                }
            }
        }
        startFaultReceiver()
        vm.startNiceness = options.vcpuNicenessDuringPostcopy
        try vm.start()
    }

    func finishPostcopy() {
        if options.vcpuNicenessDuringPostcopy != 0 { vm.setVcpuNiceness(0) }
        for u in uffds { try? u.unregister(start: vm.ram.hostAddress, length: vm.ram.size) }
        var one: UInt64 = 1
        _ = write(stopFD, &one, 8)
        for t in readerThreads { t.join() }
        readerThreads = []
    }

    // MARK: the whole receive

    public func run(onReady: ((SocketEndpoint) -> Void)? = nil) throws -> DestinationReport {
        stopFD = fl_eventfd(0, Int32(O_CLOEXEC))
        defer { close(stopFD) }
        var preallocated: GuestMemoryRegion?
        if options.preallocBytes > 0 {
            if options.faultMode == .uffdMinor {
                let region = try GuestMemoryRegion(backing: .memfd, size: options.preallocBytes, label: "guest-ram")
                try region.allocateFile()
                preallocated = region
            } else {
                preparePool(ramBytes: options.preallocBytes)
            }
        }
        onReady?(listener.endpoint)
        // The hellos are answered once guest memory is ready, so preparing it never counts
        // as downtime (the source pauses only after both acks).
        let (b, f, hello) = try acceptPair(timeout: options.acceptSeconds, expectSession: nil, ack: false)
        let t0 = fl_now_ns()
        bulk = b
        fault = f
        sessionID = hello.sessionID
        layout = try MachineLayout(vcpus: Int(hello.vcpuCount), memory: try hello.memoryLayout())
        let ramRegion = preallocated?.size == layout.ramSize ? preallocated : nil
        vm = try MigratableVM(layout: layout, backing: options.faultMode == .uffdMinor ? .memfd : .anonymous, ram: ramRegion)
        if options.faultMode == .uffdMinor && ramRegion == nil { try vm.ram.allocateFile() }
        present = PageBitmap(count: layout.totalPages)
        claimed = PageBitmap(count: layout.totalPages)
        requested = PageBitmap(count: layout.totalPages)
        requestTime = .allocate(capacity: layout.totalPages)
        requestTime.initialize(repeating: 0, count: layout.totalPages)
        requestVcpu = .allocate(capacity: layout.totalPages)
        requestVcpu.initialize(repeating: -1, count: layout.totalPages)
        crc = .allocate(capacity: layout.totalPages)
        crc.initialize(repeating: 0, count: layout.totalPages)
        stallNanoseconds = .allocate(capacity: layout.vcpus)
        stallNanoseconds.initialize(repeating: .init(0), count: layout.vcpus)
        preparePool(ramBytes: layout.ramSize)
        for channel in [bulk!, fault!] {
            try channel.send(.helloAck(version: WireProtocol.version, features: hello.features.intersection(.supported)))
        }
        defer {
            requestTime.deallocate(); requestVcpu.deallocate(); crc.deallocate(); stallNanoseconds.deallocate()
            if let pool { munmap(pool, poolPages * 4096) }
        }

        let staging = UnsafeMutableRawPointer.allocate(byteCount: 256 * 4096, alignment: 4096)
        defer { staging.deallocate() }
        var cursor = PoolCursor()
        var tSwitch: UInt64 = 0, tRunning: UInt64 = 0, tComplete: UInt64 = 0
        var precopyPages = 0
        var sourceDigest: UInt64?
        var vcpuStates = 0
        var bytesFromClosedChannels: UInt64 = 0
        receiveLoop: while true {
            do {
                let message = try bulk.receive()
                switch message {
                case .pages(let batch):
                    if !switchedOver { precopyPages += batch.count }
                    // MINOR installs stay exclusive, so a fault on a page of a bulk run waits for
                    // the whole run (written into the file, then mapped): keep those runs short.
                    try installBatch(batch, demand: false, staging: staging,
                                     stagingPages: options.faultMode == .uffdMinor ? 32 : 256, cursor: &cursor)
                case .vcpuState(let id, let blob):
                    if tSwitch == 0 { tSwitch = fl_now_ns() }
                    try vm.loadVcpuState(Int(id), blob: blob)
                    vcpuStates += 1
                case .pageSetSummary(let owed):
                    guard vcpuStates == layout.vcpus else {
                        throw MigrationError.protocolViolation("switch-over with \(vcpuStates) of \(layout.vcpus) vCPU states")
                    }
                    if tSwitch == 0 { tSwitch = fl_now_ns() }
                    try switchOver(owed: owed)
                    tRunning = fl_now_ns()
                    try bulk.send(.ack(0))
                case .digest(let algorithm, let bytes):
                    guard algorithm == .pageCRC32CXor, let value = MemoryDigest.value(bytes) else {
                        throw MigrationError.protocolViolation("unsupported digest")
                    }
                    sourceDigest = value
                case .complete:
                    guard switchedOver, let expected = sourceDigest else {
                        throw MigrationError.protocolViolation("complete before switch-over and digest")
                    }
                    // Everything has been sent; anything still missing (a dropped corrupt batch,
                    // a reply in flight) is asked for on the fault connection.
                    let deadline = fl_now_ns() + UInt64(options.reconnectSeconds * 1e9)
                    var lastAsk: UInt64 = 0
                    while !present.isFull {
                        if fl_now_ns() - lastAsk > 200_000_000 { requestMissing(); lastAsk = fl_now_ns() }
                        if fl_now_ns() > deadline {
                            throw MigrationError.timeout("waiting for the last \(layout.totalPages - present.populationCount) pages "
                                                         + "(first: \(present.firstClear(from: 0) ?? -1))")
                        }
                        usleep(1000)
                    }
                    tComplete = fl_now_ns()
                    finishPostcopy()
                    var digest: UInt64 = 0
                    for page in 0..<layout.totalPages { digest ^= MemoryDigest.mix(page: page, crc: crc[page]) }
                    report.sourceDigest = expected
                    report.destinationDigest = digest
                    report.digestMatch = digest == expected
                    if report.digestMatch { try bulk.send(.ack(1)) }
                    else {
                        try? bulk.send(.error(message: "\(MigrationError.digestMismatch(source: expected, destination: digest))"))
                    }
                    break receiveLoop
                case .error(let m):
                    throw MigrationError.peerError(m)
                case .hello, .helloAck, .reject, .pageRequest, .pageReply, .prioritize, .resume, .ack:
                    throw MigrationError.protocolViolation("unexpected \(message.type) on the bulk connection")
                }
            } catch let error as WireError where error.leavesStreamInSync && switchedOver {
                if case .checksumMismatch = error { corruptCount.wrappingIncrement(ordering: .relaxed) } else { throw error }
            } catch let error where switchedOver && Self.isConnectionLoss(error) {
                // Keep everything: the guest waits for its pages; the source reconnects.
                bytesFromClosedChannels += bulk.bytesReceived + fault.bytesReceived
                fputs("faultline receive: connection lost (\(error)); waiting for the source to reconnect\n", stderr)
                bulk.close()
                fault.close()
                faultReceiver?.join()
                let (nb, nf, _) = try acceptPair(timeout: options.reconnectSeconds, expectSession: sessionID)
                pthread_mutex_lock(&channelLock)
                bulk = nb
                fault = nf
                pthread_mutex_unlock(&channelLock)
                var missing: [Range<UInt64>] = []
                present.forEachClearRange { missing.append(UInt64($0.lowerBound)..<UInt64($0.upperBound)) }
                try bulk.send(.resume(sessionID: sessionID, installedPages: UInt64(present.populationCount), missing: missing))
                startFaultReceiver()
                rerequestOutstanding()
                report.reconnects += 1
            }
        }

        // The source may ask to time a plain TCP copy on the same link (the yardstick).
        bulk.socket.setReceiveTimeout(seconds: 5)
        if case .ack(2)? = try? bulk.receive(), let socket = try listener.accept(timeoutSeconds: 10) {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
            defer { buffer.deallocate() }
            var total: UInt64 = 0
            while let n = try? socket.receive(into: buffer), n > 0 { total += UInt64(n) }
            try? bulk.send(.ack(total))
        }

        // The guest now runs on plain memory; let it run, then stop and check it.
        let runUntil = fl_now_ns() + UInt64(options.runAfterSeconds * 1e9)
        let passesAtComplete = vm.counters.totalPasses
        while fl_now_ns() < runUntil && vm.error == nil { usleep(10_000) }
        stopping.store(true, ordering: .relaxed)
        let vcpuError = vm.stop()
        stopRequester()
        bulk.close()
        fault.close()
        faultReceiver?.join()
        if let vcpuError { throw MigrationError.peerError("destination \(vcpuError)") }

        report.totalSeconds = Double(fl_now_ns() - t0) / 1e9
        report.switchoverMilliseconds = Double(tRunning &- tSwitch) / 1e6
        report.postcopySeconds = Double(tComplete &- tRunning) / 1e9
        report.precopyPages = precopyPages
        report.demandPages = demandCount.load(ordering: .relaxed)
        report.backgroundPages = backgroundCount.load(ordering: .relaxed)
        report.zeroPages = zeroCount.load(ordering: .relaxed)
        report.faults = faultCount.load(ordering: .relaxed)
        report.corruptPagesRejected = corruptCount.load(ordering: .relaxed)
        report.bytesReceived = bytesFromClosedChannels + bulk.bytesReceived + fault.bytesReceived
        if latency.totalCount > 0 {
            report.faultLatencyMicroseconds = (Double(latency.valueAtPercentile(50)) / 1000, Double(latency.valueAtPercentile(90)) / 1000,
                                               Double(latency.valueAtPercentile(99)) / 1000, Double(latency.max) / 1000)
        }
        report.vcpuStallMilliseconds = (0..<layout.vcpus).map {
            Double(UnsafeAtomic<UInt64>(at: stallNanoseconds + $0).load(ordering: .relaxed)) / 1e6
        }
        report.guestMismatches = vm.counters.mismatches.load(ordering: .relaxed)
        report.firstMismatch = vm.counters.firstMismatch
        report.passesAfterMigration = vm.counters.totalPasses - passesAtComplete
        return report
    }

    static func isConnectionLoss(_ error: Error) -> Bool {
        if let e = error as? MigrationError, case .connectionClosed = e { return true }
        if let e = error as? SystemError { return [EPIPE, ECONNRESET, ENOTCONN, ETIMEDOUT].contains(e.errno) }
        if let e = error as? WireError, case .truncated = e { return true }
        return false
    }
}
