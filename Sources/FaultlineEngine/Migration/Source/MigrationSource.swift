import Atomics
import FaultlineCore
import FaultlineLinux

/// One migration attempt on the source: connect, pre-copy while the guest runs, pause,
/// switch over, commit, then serve the destination - its page requests first, on their own
/// connection, and a background stream of everything else - until the destination confirmed
/// the digest. Before the commit any failure resumes the guest here and is thrown as
/// ``SourceAttemptFailed``; after it, a broken connection is resumed and anything else is
/// unrecoverable.
public final class MigrationSource: @unchecked Sendable {
    public let machine: SourceMachine
    public let options: MigrationOptions
    let layout: MachineLayout
    let sessionID = UInt64.random(in: 1...UInt64.max)
    /// Set = the destination has (or is being sent) the current contents of the page.
    let done: PageBitmap
    let sender: PageSender
    let cursor = ManagedAtomic<Int>(0)
    let failures = FailureSlot()
    let faultServer: FaultServer
    /// Held while post-copy runs (``PostcopyCPULatency``).
    let cpuLatency = PostcopyCPULatency()
    var report = SourceReport()
    var phase = MigrationPhase.handshake
    var paused = false
    var dirtyLogging = false
    var bulk: WireChannel!
    var fault: WireChannel!
    var bytesFromClosedChannels: UInt64 = 0
    /// The features the destination accepted on the bulk connection.
    var accepted: FeatureFlags = []

    public init(machine: SourceMachine, options: MigrationOptions) {
        self.machine = machine
        self.options = options
        layout = machine.layout
        done = PageBitmap(count: machine.layout.totalPages)
        sender = PageSender(machine: machine, batchPages: options.batchPages)
        faultServer = FaultServer(sender: sender, done: done, cursor: cursor, failures: failures)
        failures.onFailure = { [weak self] in self?.bulk?.close() }
    }

    var hello: WireMessage.Hello {
        WireMessage.Hello(role: .bulk, sessionID: sessionID, layout: layout.memory, vcpuCount: UInt32(layout.vcpus),
                          features: .supported)
    }

    // MARK: connections

    /// `ackTimeout`: how long each hello may wait for its answer (default: `timeout`, at least
    /// the peer timeout - a destination answers once its memory is prepared).
    func connect(timeout: Double, ackTimeout: Double? = nil) throws {
        let deadline = MonotonicClock.deadline(after: timeout)
        let b = WireChannel(socket: try StreamSocket.connect(to: options.destination, timeoutSeconds: timeout), role: .bulk)
        try b.send(.hello(hello))
        var faultHello = hello
        faultHello.role = .fault
        let f = WireChannel(socket: try StreamSocket.connect(to: options.destination,
                                                             timeoutSeconds: max(1, MonotonicClock.secondsLeft(until: deadline))),
                            role: .fault)
        try f.socket.preferLatency()
        try f.send(.hello(faultHello))
        for channel in [b, f] {
            // The destination answers once its memory is ready (it may take a while for big guests).
            channel.socket.setReceiveTimeout(seconds: ackTimeout ?? max(timeout, options.peerTimeoutSeconds))
            switch try channel.receive() {
            case .helloAck(_, let features): if channel === b { accepted = features }
            case .reject(let reason): throw MigrationError.rejected(reason)
            case .error(let message): throw MigrationError.peerError(message)
            case let other: throw MigrationError.protocolViolation("expected helloAck, got \(other.type)")
            }
        }
        bulk = b
        fault = f
    }

    /// Before the commit, a peer that stops reading or answering abandons the attempt;
    /// after it, only the reconnect logic decides.
    func setPeerTimeouts(_ seconds: Double) {
        for channel in [bulk, fault] {
            channel?.socket.setSendTimeout(seconds: seconds)
            channel?.socket.setReceiveTimeout(seconds: seconds)
        }
        fault?.socket.setReceiveTimeout(seconds: 0)  // the fault server waits for requests for as long as it takes
    }

    // MARK: the attempt

    public func migrate() throws -> SourceReport {
        let t0 = MonotonicClock.nanoseconds()
        report.passesBeforeMigration = machine.counters.totalPasses
        var encoder = WireEncoder(reservingCapacity: (options.batchPages + 1) * 4200)
        do {
            try connect(timeout: max(options.peerTimeoutSeconds, 60))
            setPeerTimeouts(options.peerTimeoutSeconds)
            // Ready before the switch-over: the destination's first faults come right after it.
            try faultServer.start(on: fault, cpu: options.faultPathCPU.resolved)
            phase = .precopy
            let decision = try precopy(&encoder, since: t0)
            try switchOver(&encoder, decision: decision)
        } catch {
            abandonBeforeCommit()
            throw SourceAttemptFailed(phase: phase, cause: failures.failure ?? error)
        }
        // The commit: from here the destination's guest is the live one.
        phase = .postcopy
        let tRunning = commit()
        setPausedWindowPriority(false)
        report.downtimeMilliseconds = Double(tRunning - tPause) / 1e6
        if dirtyLogging { try? machine.stopDirtyLog(); dirtyLogging = false }  // the guest stays paused
        setPeerTimeouts(0)
        sender.takeResidency()  // the vCPUs stay paused: valid for the rest of the migration
        if report.mode == "postcopy" { cpuLatency.hold(microseconds: options.postcopyCPULatencyMicroseconds) }
        defer { cpuLatency.release() }
        try postcopy(&encoder)
        cpuLatency.release()  // the fault server is done: before the baseline copy and the report
        report.postcopyCPULatency = cpuLatency.outcome
        faultServer.stop()
        report.demandPages = faultServer.demandServed.load(ordering: .relaxed)
        report.zeroPages = sender.zeroCount.load(ordering: .relaxed)
        report.faultRequests = faultServer.requests.load(ordering: .relaxed)
        report.faultRequestsForSentPages = faultServer.requestsForSentPages.load(ordering: .relaxed)
        report.bytesSent = bytesFromClosedChannels + bulk.bytesSent + fault.bytesSent
        let tEnd = MonotonicClock.nanoseconds()
        report.postcopySeconds = Double(tEnd - tRunning) / 1e9
        report.totalSeconds = Double(tEnd - t0) / 1e9
        return report
    }

    /// Before the commit: stop everything of this attempt; the guest runs on, unchanged.
    func abandonBeforeCommit() {
        setPausedWindowPriority(false)
        faultServer.stop()
        bulk?.close()
        fault?.close()
        if dirtyLogging { try? machine.stopDirtyLog(); dirtyLogging = false }
        if paused { machine.resume(); paused = false }
    }

    // MARK: pre-copy

    /// Pre-copy rounds while the guest runs: everything once, then what it dirtied, until
    /// the convergence policy says stop.
    func precopy(_ encoder: inout WireEncoder, since t0: UInt64) throws -> PrecopyDecision {
        let policy = options.policy
        var rounds: [PrecopyRound] = []
        if let why = options.immediateStopAndCopy { return .stopAndCopy(.noPrecopy(why)) }
        var decision = policy.decide(rounds: [], elapsed: 0)
        guard decision == .nextRound else { return decision }
        try machine.startDirtyLog()
        dirtyLogging = true
        var toSend = Array(layout.lowPages..<layout.totalPages)
        var injectedCut = false, injectedCorruption = false
        while decision == .nextRound {
            let tRound = MonotonicClock.nanoseconds()
            sender.takeResidency()  // a page touched after this is in the next dirty log
            encoder.removeAll()
            encoder.beginPages(pageSize: 4096)
            var dataPages = 0
            var sentCount = toSend.count
            var unsent: ArraySlice<Int> = []
            for (i, page) in toSend.enumerated() {
                // At the time limit a round stops where it is (post-copy sends the rest).
                if i & 255 == 255, policy.cutsRoundShort(elapsed: Double(MonotonicClock.nanoseconds() - t0) / 1e9) {
                    unsent = toSend[i...]
                    sentCount = i
                    break
                }
                let corrupt = options.corruptOnePrecopyPage && !injectedCorruption
                if try sender.append(page, to: &encoder, channel: bulk, corrupt: corrupt) {
                    dataPages += 1
                    if corrupt { injectedCorruption = true }
                }
                done.insert(page)
                if let cut = options.disconnectDuringPrecopyAfterPages, !injectedCut, report.precopyPages + dataPages >= cut {
                    injectedCut = true
                    bulk.close()
                    fault.close()
                }
            }
            try sender.finish(&encoder, channel: bulk)
            try awaitRoundStored()
            if let failure = failures.failure { throw failure }
            let dirty = PageBitmap(count: layout.totalPages)
            try machine.collectDirty(into: dirty)
            for page in unsent { dirty.insert(page) }  // still owed: sent with the final dirty set or in post-copy
            let seconds = Double(MonotonicClock.nanoseconds() - tRound) / 1e9
            toSend = []
            dirty.forEachSetPage { toSend.append($0) }
            // Zero markers cost almost nothing on the wire: the bandwidth is that of data pages.
            rounds.append(PrecopyRound(pagesSent: sentCount, bytesSent: UInt64(dataPages) * 4096, seconds: seconds,
                                       dirtyAfter: toSend.count))
            report.precopyRounds.append(PrecopyRoundReport(pages: sentCount, dataPages: dataPages, seconds: seconds,
                                                           dirtyAfter: toSend.count, cutShort: !unsent.isEmpty))
            report.precopyPages += sentCount
            decision = policy.decide(rounds: rounds, elapsed: Double(MonotonicClock.nanoseconds() - t0) / 1e9)
        }
        pendingDirty = toSend
        if case .postcopy = decision { try discardBeforePause(toSend) }
        return decision
    }

    /// Pages pre-copy found dirty in its last round (sent at the switch-over, or owed).
    var pendingDirty: [Int] = []
    var tPause: UInt64 = 0

    // MARK: switch-over

    func switchOver(_ encoder: inout WireEncoder, decision: PrecopyDecision) throws {
        var stopAndCopy = false
        switch decision {
        case .nextRound: break
        case .stopAndCopy(let why): report.precopyStop = "\(why)"; stopAndCopy = true
        case .postcopy(let why): report.precopyStop = report.precopyRounds.isEmpty ? "no pre-copy" : "\(why)"
        case .fail(let why): throw MigrationError.didNotConverge("\(why) (post-copy is not allowed)")
        }
        report.mode = stopAndCopy ? "precopy" : "postcopy"
        phase = .switchover
        tPause = MonotonicClock.nanoseconds()
        parts.start(at: tPause)
        setPausedWindowPriority(true)
        machine.pause()
        paused = true
        part("pause")
        sender.invalidateResidency()  // retaken after the commit, while paused
        // The final dirty set: pages written since the last round was collected.
        if dirtyLogging {
            let dirty = PageBitmap(count: layout.totalPages)
            for page in pendingDirty { dirty.insert(page) }
            try machine.collectDirty(into: dirty)
            var missed = !options.missOneDirtyPage
            dirty.forEachSetPage { page in
                if !missed && CRC32C.checksum(UnsafeRawBufferPointer(start: machine.pagePointer(page), count: 4096)) != sender.sentCRC[page] {
                    missed = true
                    return
                }
                done.remove(page)
            }
            // Dirty logging stays on until after the commit: turning it off changes the memslot,
            // which under shadow paging costs time that grows with the guest's memory.
            part("dirty_log")
        }
        encoder.removeAll()
        if stopAndCopy {
            // Everything still owed, now, while paused: no post-copy.
            encoder.beginPages(pageSize: 4096)
            var page = layout.lowPages
            while let p = done.firstClear(from: page), p >= page {
                if try sender.append(p, to: &encoder, channel: bulk) { report.nonZeroBytes += 4096 }
                done.insert(p)
                report.stopAndCopyPages += 1
                page = p + 1
                if page >= layout.totalPages { break }
            }
            try sender.finish(&encoder, channel: bulk)
            part("stop_and_copy")
        }
        report.guestMismatchesBeforeMigration = machine.counters.mismatches.load(ordering: .relaxed)
        for id in 0..<layout.vcpus { try bulk.send(.vcpuState(id: UInt32(id), blob: try machine.vcpuStateBlob(id))) }
        encoder.beginPages(pageSize: 4096)
        for page in 0..<layout.lowPages {
            _ = try sender.append(page, to: &encoder, channel: bulk)
            done.insert(page)
        }
        try sender.finish(&encoder, channel: bulk)
        part("vcpu_state_and_low_memory")
        carried = PageBitmap(count: layout.totalPages)
        if !report.precopyRounds.isEmpty {
            // Pages sent before the pause and not dirtied since: the destination keeps them.
            // Their digest entry is recomputed from the paused memory below, not taken from
            // what was sent, so a write the dirty log missed fails the migration.
            carried.copyBits(from: done)
            for page in 0..<layout.lowPages { carried.remove(page) }
        }
        var owed: [Range<UInt64>] = []
        done.forEachClearRange { owed.append(UInt64($0.lowerBound)..<UInt64($0.upperBound)) }
        report.owedPages = owed.reduce(0) { $0 + $1.count }
        try bulk.send(.pageSetSummary(owed))
        part("page_set_summary")
        switch try bulk.receive() {
        case .ack(SessionAck.ready): break
        case .error(let m): throw MigrationError.peerError(m)
        case let other: throw MigrationError.protocolViolation("expected the ready ack, got \(other.type)")
        }
        part("destination_ready")
    }

    var carried = PageBitmap(count: 0)
    var parts = PartClock()

    /// Closes one part of the downtime breakdown.
    func part(_ name: String) {
        parts.close(name, at: MonotonicClock.nanoseconds())
        report.downtimeParts = parts.parts
    }

    /// Sends the commit. A failure to send it is a lost connection after the commit: the
    /// destination learns of the commit from the reconnect.
    func commit() -> UInt64 {
        if options.disconnectAtCommit {
            bulk.close()
            fault.close()
        }
        do { try bulk.send(.ack(SessionAck.commit)) } catch { failedCommitSend = error }
        part("commit")
        return parts.mark
    }

    var failedCommitSend: Error?
}

/// One attempt failed before the commit; the source guest kept running.
public struct SourceAttemptFailed: Error, CustomStringConvertible {
    public let phase: MigrationPhase
    public let cause: Error
    public var description: String { "during \(phase.rawValue): \(cause)" }
}
