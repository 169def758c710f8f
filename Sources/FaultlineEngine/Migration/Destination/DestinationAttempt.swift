import Atomics
import FaultlineCore
import FaultlineLinux

/// One migration attempt on the destination: the guest, its pages and the threads that fill
/// them, from the hello to the verdict. Thrown away whole when the attempt fails before
/// the commit.
final class DestinationAttempt: RAMFaultHandler, @unchecked Sendable {
    let options: DestinationOptions
    unowned let destination: MigrationDestination
    let sessions: SessionAcceptor
    var prepared: GuestMemoryRegion?

    var layout: MachineLayout!
    var machine: DestinationMachine!
    var mapper: PageMapper!
    var table: DestinationPageTable!
    var book: FaultBook!
    var installer: PageInstaller!
    var requester: FaultRequester!
    let failures = FailureSlot()
    let waiters = TimedCondition()
    let stopping = ManagedAtomic<Bool>(false)
    var phase = MigrationPhase.handshake
    /// Between `ready` and `commit`: everything is prepared, the vCPUs have not started.
    var awaitingCommit = false
    var guestStarted = false
    /// Where the per-page tables written on the fault path live (``ZeroFilledArena``).
    var tableArena: ZeroFilledArena?
    /// When the vCPU threads were started (the guest's first instruction).
    var guestRunningSince: UInt64 = 0
    /// Every page is in and the digest read back from memory matched (the verdict is sent).
    var verified = false
    /// The fault receiver lost its connection (the main loop reconnects both).
    let faultConnectionLost = ManagedAtomic<Bool>(false)
    var sessionID: UInt64 = 0
    var bulk: WireChannel!
    var fault: WireChannel!
    var faultReceiver: OSThread?
    /// Held from the switch-over until every page is in (``PostcopyCPULatency``).
    let cpuLatency = PostcopyCPULatency()
    /// Post-copy's background stream: staged here, mapped by installer threads.
    var pipeline: InstallPipeline?
    /// Pre-copy rounds: staged here, stored in order by an installer thread.
    var precopyPipeline: InstallPipeline?
    /// Post-copy's background fill, read in this process (``DestinationOptions/localFill``).
    var localFill: LocalFill?
    var report = DestinationReport()
    var bytesFromClosedChannels: UInt64 = 0
    let faultCPU: Int32?
    /// The switch-over's parts, first vCPU state to running.
    var switchParts = PartClock()
    /// vcpu-exit: how faults reach the vCPU threads on this kernel (nil in uffd modes).
    let vcpuExitMechanism: VcpuExitMechanism?
    /// vcpu-exit: exits for pages that were still missing.
    let vcpuExitFaults = ManagedAtomic<Int>(0)

    init(options: DestinationOptions, destination: MigrationDestination, sessions: SessionAcceptor, prepared: GuestMemoryRegion?) {
        self.options = options
        self.destination = destination
        self.sessions = sessions
        self.prepared = prepared
        faultCPU = options.faultPathCPU.resolved
        report.faultMode = options.faultMode
        report.faultAround = options.faultAround
        vcpuExitMechanism = options.faultMode == .vcpuExit
            ? (options.machineFactory == nil ? FaultModeSelection.vcpuExitMechanism(probe: .current) ?? .sigbusExit : .sigbusExit)
            : nil
        report.vcpuExitMechanism = vcpuExitMechanism
    }

    // MARK: set-up

    func build(_ hello: WireMessage.Hello) throws {
        let announced = try MachineLayout(vcpus: Int(hello.vcpuCount), memory: try hello.memoryLayout())
        if let layout {  // built ahead for the layout the caller expected
            guard announced == layout else {
                throw MigrationError.protocolViolation("the source announced \(announced.vcpus) vCPUs and \(announced.ramSize) bytes of RAM; "
                                                       + "\(layout.vcpus) and \(layout.ramSize) were expected")
            }
            return
        }
        try build(layout: announced)
    }

    /// Builds the guest, its page mapper and the fault path for `layout` (before or after the hello).
    func build(layout: MachineLayout) throws {
        self.layout = layout
        if options.faultMode == .vcpuExit, options.machineFactory == nil,
           let why = FaultModeSelection.obstacle(to: .vcpuExit, probe: .current) {
            throw FaultModeSelection.Refusal("vcpu-exit cannot work on this kernel: \(why)")
        }
        // The tables' memory is allocated in the background while the guest is built (a
        // restore reserved it earlier still, while the fault-mode probe ran).
        let arena = options.tableArena.flatMap { $0.reserved ? $0 : nil } ?? MigrationDestination.tableArena(for: layout)
        tableArena = arena
        report.guestMode = layout.mode
        if let factory = options.machineFactory {
            (machine, mapper) = try factory(layout)
        } else {
            let gmem = options.guestMemfdVM
            let ram = prepared?.size == layout.ramSize && !gmem ? prepared : nil
            // Dirty logging on the destination: the digest is read back from guest memory,
            // except for pages the guest itself rewrote after they were installed. A guest_memfd
            // RAM slot cannot log: its RAM goes in write-protected and the readers log the writes.
            // vcpu-exit on KVM Userfault: the RAM memslot is created with KVM_MEM_USERFAULT and a
            // bitmap that starts with every page missing (docs/design.md, "Fault mode on TDP hosts").
            if gmem && options.faultMode == .vcpuExit && vcpuExitMechanism != .kvmUserfault {
                throw DemandPagingConfig.Invalid("vcpu-exit on a guest_memfd VM needs KVM_CAP_USERFAULT (KVM_MEM_USERFAULT), "
                                                 + "which this kernel does not have")
            }
            let userfault = vcpuExitMechanism == .kvmUserfault ? PageBitmap(count: layout.ramPages, polarity: .setMeansMissing) : nil
            let vm = try MigratableVM(layout: layout, backing: options.faultMode == .uffdMinor ? .memfd : .anonymous,
                                      dirtyLogging: true, ram: ram, userfaultBitmap: userfault, guestMemfdRAM: gmem)
            if gmem { vm.guestWriteLog = PageBitmap(count: layout.totalPages) }
            // uffd-minor: the memfd is not allocated here; pages are allocated as they are written
            // (holes fault as MISSING: see UffdPageMapper.armFaults).
            if vcpuExitMechanism == .sigbusExit { vm.hostCompletedWrites = PageBitmap(count: layout.totalPages) }
            if options.preallocBytes > 0 && !gmem { destination.preparePool(ramBytes: layout.ramSize) }
            machine = vm
            mapper = try UffdPageMapper.armedForPrecopy(vm: vm, faultMode: options.faultMode, topology: options.uffd,
                                                        pool: gmem ? nil : destination.pool, writeLog: vm.guestWriteLog)
        }
        table = DestinationPageTable(count: layout.totalPages, allocator: arena?.allocator ?? AnonymousMapping.zeroFilled)
        book = FaultBook(pages: layout.totalPages, vcpus: layout.vcpus, vcpusAccountOwnStall: options.faultMode == .vcpuExit,
                         allocator: arena?.allocator ?? AnonymousMapping.zeroFilled)
        installer = PageInstaller(table: table, mapper: mapper, book: book, lowPages: layout.lowPages,
                                  exclusiveInstalls: options.faultMode == .uffdMinor)
        installer.damageAfterInstall = options.damageInstalledPage
        if options.faultMode == .vcpuExit { installer.afterBatch = { [waiters] in waiters.broadcast() } }
        requester = try FaultRequester(table: table, book: book, failures: failures, faultPathCPU: faultCPU, faultAround: options.faultAround)
        requester.local = options.localPages.map { LocalDemand(supplier: $0, installer: installer, replaying: options.localFillFirst) }
        failures.onFailure = { [weak self] in self?.abortOnThreadFailure() }
        // Post-copy's background stream: ready before the switch-over, so that starting it costs
        // nothing between the pause and the guest running. MINOR: a fault on a page staged for
        // the background waits for it (exclusive installs), so little is staged ahead there.
        pipeline = try InstallPipeline(installer: installer, depth: options.faultMode == .uffdMinor ? 2 : 8, scratchPages: 256,
                                       runPages: bulkRunPages, installers: 1, tableAllocator: arena?.allocator ?? AnonymousMapping.zeroFilled,
                                       onFailure: { [failures] in failures.record("installer", $0) })
        if let pipeline, pipeline.staged != nil {
            requester.resolveStaged = { [pipeline] in try pipeline.resolveStaged($0) }
            requester.lookAgainAfterRequest = { [pipeline] in try pipeline.lookAgainAfterRequest($0) }
        }
    }

    /// A fault-path thread failed: tell the source why (best effort) and wake the main loop.
    func abortOnThreadFailure() {
        let cause = failures.failure.map { "\($0)" } ?? "a fault-path thread failed"
        tellSource("destination: \(cause)")
        waiters.broadcast()
    }

    /// Reports a fatal cause on both connections (the source's fault server reads its
    /// connection all the time, so it learns at once) and gives it a moment to arrive before
    /// anything is closed (closing with unread data would reset the connection).
    func tellSource(_ message: String) {
        try? bulk?.send(.error(message: message))
        try? fault?.send(.error(message: message))
    }

    // MARK: the attempt

    func run(bulk b: WireChannel, fault f: WireChannel, hello: WireMessage.Hello) throws -> DestinationReport {
        let t0 = MonotonicClock.nanoseconds()
        bulk = b
        fault = f
        sessionID = hello.sessionID
        do {
            try build(hello)
            // The hellos are answered once guest memory is ready, so preparing it never counts
            // as downtime (the source pauses only after both acks).
            try SessionAcceptor.ack(SessionAcceptor.Pair(bulk: b, fault: f, hello: hello))
        } catch {
            throw AttemptAbandoned(cause: error)
        }
        phase = .precopy
        requester.setChannel(fault)
        bulk.socket.setReceiveTimeout(seconds: options.idleSeconds)
        var tSwitch: UInt64 = 0, tRunning: UInt64 = 0, tComplete: UInt64 = 0
        var sourceDigest: UInt64?
        var vcpuStates = 0
        let scratch = PageInstaller.Scratch(pages: 256)
        scratch.staging.initializeMemory(as: UInt8.self, repeating: 0, count: scratch.pages * 4096)  // no first touch later
        receiveLoop: while true {
            do {
                if let failure = failures.failure { throw failure }
                let message = try bulk.receive()
                switch message {
                case .pages(let batch):
                    if phase == .precopy && !awaitingCommit {
                        try precopyStores().submit(batch)
                    } else if phase.isBeforeCommit && !awaitingCommit {
                        // The switch-over (low memory): stored here, nothing is started in the downtime.
                        try installer.storePrecopy(batch, scratch: scratch)
                        if let n = options.exitDuringPrecopyAfterPages, installer.precopyCount.load(ordering: .relaxed) >= n {
                            HostProcess.exitImmediately(status: 9)  // the injection: a destination that dies mid-pre-copy
                        }
                    }
                    else if guestStarted, let pipeline { try pipeline.submit(batch) }
                    else if guestStarted { try installer.install(batch, demand: false, scratch: scratch, runPages: bulkRunPages) }
                    else { throw MigrationError.protocolViolation("pages between ready and commit") }
                case .vcpuState(let id, let blob):
                    guard phase == .precopy || phase == .switchover, !awaitingCommit else {
                        throw MigrationError.protocolViolation("vCPU state after the switch-over")
                    }
                    if tSwitch == 0 { tSwitch = MonotonicClock.nanoseconds(); switchParts.start(at: tSwitch) }
                    try finishPrecopyStores()
                    phase = .switchover
                    try machine.loadVcpuState(Int(id), blob: blob)
                    vcpuStates += 1
                case .pageSetSummary(let owed):
                    guard phase == .switchover, !awaitingCommit, vcpuStates == layout.vcpus else {
                        throw MigrationError.protocolViolation("switch-over with \(vcpuStates) of \(layout.vcpus) vCPU states")
                    }
                    try finishPrecopyStores()
                    switchPart("vcpu_state_and_low_memory")
                    try prepareSwitchover(owed: owed)
                    awaitingCommit = true
                    try bulk.send(.ack(SessionAck.ready))
                    switchPart("ready_sent")
                case .ack(SessionAck.commit):
                    guard awaitingCommit else { throw MigrationError.protocolViolation("commit before the switch-over was prepared") }
                    switchPart("awaiting_commit")
                    try startGuest()
                    tRunning = guestRunningSince
                    switchPart("start_guest")
                case .ack(SessionAck.roundSent) where phase == .precopy && !awaitingCommit:
                    try precopyPipeline?.drain()  // stored, not queued
                    try acknowledgeRound()
                case .discard(let ranges) where phase == .precopy && !awaitingCommit:
                    try precopyPipeline?.drain()  // a queued older copy must not come back after the drop
                    try dropStaleEarly(ranges)
                case .digest(let algorithm, let bytes):
                    guard algorithm == .pageCRC32CXor, let value = MemoryDigest.value(bytes) else {
                        throw MigrationError.protocolViolation("unsupported digest algorithm \(algorithm.rawValue) "
                                                               + "(this destination checks only pageCRC32CXor)")
                    }
                    sourceDigest = value
                case .complete:
                    guard guestStarted, let expected = sourceDigest else {
                        throw MigrationError.protocolViolation("complete before the commit and the digest")
                    }
                    phase = .completion
                    if !verified {
                        localFill?.join()  // it has handed every page to the pipeline (or failed)
                        if let failure = failures.failure { throw failure }
                        try pipeline?.drain()
                        try waitForEveryPage()
                        tComplete = MonotonicClock.nanoseconds()
                        finishPostcopy()
                        // The vCPUs keep their post-copy niceness while memory is read back: at
                        // the same priority four guest threads left the check a fraction of a CPU.
                        defer { if report.postcopy { machine.setVcpuScheduling(.normal) } }
                        try verify(expected: expected)
                        guard report.digestMatch else {
                            let cause = MigrationError.digestMismatch(source: expected, destination: report.destinationDigest)
                            try? bulk.send(.error(message: "destination: \(cause)"))
                            break receiveLoop
                        }
                        verified = true
                    }
                    // Sent again after a reconnect: the first verdict may have been lost. The
                    // source confirms it has it (`verdictReceived`); until then a lost
                    // connection is waited for like any other after the commit.
                    bulk.socket.setReceiveTimeout(seconds: options.reconnectSeconds)
                    try bulk.send(.ack(SessionAck.verified))
                case .ack(SessionAck.verdictReceived) where verified:
                    break receiveLoop
                case .error(let m):
                    throw MigrationError.peerError(m)
                case .hello, .helloAck, .reject, .pageRequest, .pageReply, .prioritize, .resume, .ack, .discard:
                    throw MigrationError.protocolViolation("unexpected \(message.type) on the bulk connection")
                }
            } catch let error as WireError where guestStarted && Self.isDroppedBatch(error) {
                // A damaged batch is never installed; its pages stay missing and are asked for again.
                installer.countCorrupt()
            } catch {
                let cause = failures.failure ?? error
                let kind = FailureClassifier.classify(cause)
                if awaitingCommit && !guestStarted && (kind == .connectionLost || kind == .corruptTransport) {
                    // The commit may or may not have been sent: only the source knows. Its
                    // reconnect with this session means it committed; a new session means it
                    // did not (and gave up on this one).
                    try awaitCommitAfterLoss(cause)
                    tRunning = MonotonicClock.nanoseconds()
                    continue
                }
                if verified && (kind == .connectionLost || kind == .corruptTransport) {
                    // Everything is in and checked; only the source's receipt of the verdict is
                    // missing. Wait for it to reconnect and ask again, but succeed either way.
                    do { try reconnect(after: cause) } catch {
                        FaultlineLog.warn("destination: verified, but the source did not confirm the verdict: \(error)")
                        break receiveLoop
                    }
                    continue
                }
                switch FailurePolicy.action(phase: guestStarted ? phase : .switchover, kind: kind) {
                case .abandonAttempt:
                    bulk.close()
                    fault.close()
                    throw AttemptAbandoned(cause: cause)
                case .reconnect:
                    try reconnect(after: cause)
                case .unrecoverable:
                    tellSource("destination: \(cause)")
                    MonotonicClock.sleep(microseconds: 200_000)
                    FaultlineLog.warn("destination: unrecoverable after the switch-over: \(cause); the guest and "
                                      + "its \(table.installedCount) installed pages are kept as they are")
                    throw MigrationError.unrecoverable("\(cause)")
                }
            }
        }

        measureBaselineIfAsked()

        // The guest now runs on plain memory; let it run, then stop and check it.
        let runUntil = MonotonicClock.deadline(after: options.runAfterSeconds)
        let passesAtComplete = machine.counters.totalPasses
        while MonotonicClock.nanoseconds() < runUntil && machine.vcpuError == nil { MonotonicClock.sleep(microseconds: 10_000) }
        // ... and until the guest has completed a pass on this side (on a busy machine one pass
        // can take longer than `runAfterSeconds`), at most 60 s more: the report's
        // `passes_after_migration` then says the guest ran, not that the window was short.
        let patience = MonotonicClock.deadline(after: 60)
        while options.runAfterSeconds > 0 && machine.counters.totalPasses <= passesAtComplete && machine.vcpuError == nil
            && MonotonicClock.nanoseconds() < patience {
            MonotonicClock.sleep(microseconds: 10_000)
        }
        let vcpuError = tearDown()
        if let vcpuError { throw MigrationError.peerError("destination \(vcpuError)") }
        report.everyVcpuWholePassAt = machine.counters.everyVcpuWholePassAt ?? 0
        if options.recordFirstTouches { report.firstTouches = book.pagesInRequestOrder() }

        report.totalSeconds = Double(MonotonicClock.nanoseconds() - t0) / 1e9
        report.switchoverMilliseconds = Double(tRunning &- tSwitch) / 1e6
        report.guestStartedAt = tRunning
        report.everyPageInAt = tComplete
        report.switchoverParts = switchParts.parts
        report.postcopySeconds = Double(tComplete &- tRunning) / 1e9
        report.precopyPages = installer.precopyCount.load(ordering: .relaxed)
        report.demandPages = installer.demandCount.load(ordering: .relaxed)
        report.backgroundPages = installer.backgroundCount.load(ordering: .relaxed)
        report.zeroPages = installer.zeroCount.load(ordering: .relaxed)
        report.faults = book.faults.load(ordering: .relaxed)
        report.vcpuExitFaults = vcpuExitFaults.load(ordering: .relaxed)
        report.corruptPagesRejected = installer.corruptCount.load(ordering: .relaxed)
        report.pagesInstalledFromStaging = installer.stagedFaultCount.load(ordering: .relaxed)
        report.postcopyCPULatency = cpuLatency.outcome
        report.sealedRunsHurried = installer.hurriedRuns.load(ordering: .relaxed)
        (report.recycledPages, report.recycledPagesReused) = mapper.recycledPages
        report.bytesReceived = bytesFromClosedChannels + bulk.bytesReceived + fault.bytesReceived
        report.faultLatencyMicroseconds = book.latencyMicroseconds
        report.vcpuStallMilliseconds = book.stallMilliseconds
        report.faultLatencyLog2 = book.latencyLog2.buckets()
        report.slowFaultCount = book.slowCount.load(ordering: .relaxed)
        report.slowFaults = book.slowFaults.map {
            SlowFaultRecord(atMilliseconds: Double($0.sinceFirstFault) / 1e6, microseconds: Double($0.waited) / 1e3, vcpu: Int($0.vcpu),
                            page: $0.page, requestSentMicroseconds: $0.untilSent.map { Double($0) / 1e3 },
                            replyMicroseconds: $0.untilReply.map { Double($0) / 1e3 }, installedByReply: $0.byReply)
        }
        report.faultLatencyLog2PerVcpu = (0..<layout.vcpus).map { book.latencyLog2.buckets(vcpu: $0) }
        report.guestMismatches = machine.counters.mismatches.load(ordering: .relaxed)
        report.firstMismatch = machine.counters.firstMismatch
        report.passesAfterMigration = machine.counters.totalPasses - passesAtComplete
        return report  // digest_match false is reported, not thrown: the caller fails on it
    }

    static func isDroppedBatch(_ error: WireError) -> Bool {
        switch error {
        case .checksumMismatch, .payloadChecksumMismatch(.pages), .payloadChecksumMismatch(.pageReply): return true
        default: return false
        }
    }

    // MARK: tear-down

    /// Stops and joins every thread of the attempt before anything they use goes away, on every
    /// path (idempotent). Returns the first vCPU error.
    @discardableResult
    func tearDown() -> String? {
        tableArena?.finishPopulating()
        stopping.store(true, ordering: .relaxed)
        waiters.broadcast()
        bulk?.close()
        fault?.close()
        faultReceiver?.join()
        faultReceiver = nil
        // Write-tracked RAM: unregistering lifts the protection and wakes a vCPU waiting on a
        // write-protect fault, before the readers that would answer it stop.
        if mapper != nil && tracksWritesWithUserfaultfd { mapper.disarmFaults() }
        localFill?.join()  // `stopping` ends it
        precopyPipeline?.stop()
        pipeline?.stop()
        requester?.stop()
        cpuLatency.release()
        // A guest stopped with pages still missing (an unrecoverable end) may sleep in a fault
        // nothing answers any more: unregistering wakes it, so that it sees the stop. Such a
        // guest is discarded; nothing it does on its way out is reported.
        if guestStarted, let table, !table.isComplete { mapper?.disarmFaults() }
        let vcpuError = guestStarted ? machine?.stopGuest() : nil
        guestStarted = false
        mapper?.disarmFaults()
        return vcpuError
    }
}
