import Atomics
import FaultlineCore
import FaultlineLinux

/// The destination's connections after the switch-over: reconnects, the fault receiver, the
/// end of post-copy.
extension DestinationAttempt {
    // MARK: connections

    func closeChannels() {
        try? pipeline?.drain()  // what is staged goes in before the source is told what is missing
        bytesFromClosedChannels += bulk.bytesReceived + fault.bytesReceived
        bulk.close()
        fault.close()
        requester.setChannel(nil)
        faultReceiver?.join()
        faultReceiver = nil
    }

    /// After the commit the connection broke: keep everything; the guest waits for its pages
    /// while the source reconnects.
    func reconnect(after cause: Error) throws {
        FaultlineLog.note("destination: connection lost (\(cause)); waiting for the source to reconnect")
        closeChannels()
        let pair: SessionAcceptor.Pair
        do {
            pair = try sessions.acceptPair(timeout: options.reconnectSeconds, session: sessionID)
        } catch {
            try? bulk.send(.error(message: "destination: the source did not reconnect"))
            throw MigrationError.unrecoverable("\(cause), and the source did not reconnect within \(options.reconnectSeconds) s: \(error)")
        }
        try resume(pair)
    }

    func resume(_ pair: SessionAcceptor.Pair) throws {
        try SessionAcceptor.ack(pair)
        bulk = pair.bulk
        fault = pair.fault
        // As on the first connection: a source that goes silent on an open connection is
        // treated as lost (and waited for again), never waited for forever.
        bulk.socket.setReceiveTimeout(seconds: verified ? options.reconnectSeconds : options.idleSeconds)
        var missing: [Range<UInt64>] = []
        table.installed.forEachClearRange { missing.append(UInt64($0.lowerBound)..<UInt64($0.upperBound)) }
        try bulk.send(.resume(sessionID: sessionID, installedPages: UInt64(table.installedCount), missing: missing))
        requester.setChannel(fault)
        faultConnectionLost.store(false, ordering: .relaxed)
        try startFaultReceiver()
        requester.rerequest(all: false)
        report.reconnects += 1
    }

    func startFaultReceiver() throws {
        let channel = fault!
        let scratch = PageInstaller.Scratch(pages: 64)
        faultReceiver = try OSThread(name: "fault receiver", niceness: OSThread.Niceness.faultPath, cpu: faultCPU) { [self] in
            var injected = !options.failFaultPathThread
            while true {
                do {
                    switch try channel.receive() {
                    case .pageReply(let requestID, let batch):
                        book.noteReply(Int(truncatingIfNeeded: requestID), at: MonotonicClock.nanoseconds())
                        if !injected && batch.count > 0 {
                            injected = true
                            throw MigrationError.protocolViolation("injected: the fault receiver fails on its first reply")
                        }
                        try installer.install(batch, demand: true, scratch: scratch, runPages: 64)
                    case .error(let m):
                        failures.record("the source", MigrationError.peerError(m))
                        return
                    case let other:
                        throw MigrationError.protocolViolation("unexpected \(other.type) on the fault connection")
                    }
                } catch let error as WireError where Self.isDroppedBatch(error) {
                    // A damaged reply is dropped, never installed; ask again for everything outstanding.
                    installer.countCorrupt()
                    requester.rerequest(all: false)
                } catch {
                    if stopping.load(ordering: .relaxed) { return }
                    // Every page is in: the fault connection is not needed any more (the source
                    // closes it once it has the verdict; the bulk connection carries on, with
                    // `verdictReceived` and the baseline copy).
                    if table.isComplete && FailureClassifier.isConnectionLoss(error) { return }
                    if FailureClassifier.isConnectionLoss(error) {
                        faultConnectionLost.store(true, ordering: .relaxed)
                        bulk.close()  // the main loop reconnects both
                    } else {
                        failures.record("fault receiver", error)
                    }
                    return
                }
            }
        }
    }

    /// Every page has been sent; ask for anything still missing (a dropped batch, a reply in
    /// flight) until it is in.
    func waitForEveryPage() throws {
        let deadline = MonotonicClock.deadline(after: options.reconnectSeconds)
        var lastAsk: UInt64 = 0
        while !table.isComplete {
            if let failure = failures.failure { throw failure }
            if faultConnectionLost.load(ordering: .relaxed) {
                // The re-requests below travel on the fault connection: reconnect first.
                throw MigrationError.connectionClosed("fault connection, while waiting for the last \(table.count - table.installedCount) pages")
            }
            if MonotonicClock.nanoseconds() &- lastAsk > 200_000_000 {
                requester.rerequest(all: true)
                lastAsk = MonotonicClock.nanoseconds()
            }
            if MonotonicClock.nanoseconds() > deadline {
                throw MigrationError.timeout("waiting for the last \(table.count - table.installedCount) pages "
                                             + "(first: \(table.installed.firstClear(from: 0) ?? -1))")
            }
            MonotonicClock.sleep(microseconds: 1000)
        }
    }

    /// RAM went in write-protected and userfaultfd readers log the guest's writes (a
    /// guest_memfd VM: no dirty log on its RAM slot).
    var tracksWritesWithUserfaultfd: Bool { (mapper as? UffdPageMapper)?.writeLog != nil }

    func finishPostcopy() {
        guard report.postcopy else { return }
        cpuLatency.release()  // every page is in: no fault waits any more
        // Write tracking needs the readers and the registration until the digest is taken
        // (tearDown ends both).
        if tracksWritesWithUserfaultfd { return }
        // Readers first: a reader still resolving a fault (for a page the stream installed
        // meanwhile) would otherwise find its range unregistered under it - UFFDIO_CONTINUE
        // answers ENOENT there - and fail the migration.
        // Unregistering then wakes any vCPU still queued on a fault; every page is present.
        requester.stop()
        mapper.disarmFaults()
        if options.preFault, let vm = machine as? MigratableVM {
            // Every page is in: all of RAM into KVM's page tables, through a vCPU of its own
            // (the guest's vCPUs are in KVM_RUN).
            do {
                report.preFaultAfterPostcopy = vm.preFaultRAM([0..<layout.ramPages], through: try vm.makePreFaultVcpu())
            } catch {
                var failed = PreFaultSummary()
                failed.error = "\(error)"
                report.preFaultAfterPostcopy = failed
            }
        }
    }
}
