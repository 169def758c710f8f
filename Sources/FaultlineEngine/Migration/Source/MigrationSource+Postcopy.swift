import Atomics
import FaultlineCore
import FaultlineLinux

extension MigrationSource {
    /// After the commit: the background stream of every page still owed (the fault server
    /// answers requests meanwhile), the digest of the paused state, and the verdict. A lost
    /// connection is resumed; anything else is unrecoverable.
    func postcopy(_ encoder: inout WireEncoder) throws {
        // Without a stream the destination reads the owed pages itself: their digest entries
        // come from this memory too (it is a snapshot: it does not change).
        if options.noBackgroundStream { done.forEachClearRange { self.carried.insert($0) } }
        // Digest entries of the carried pages, from the paused memory (a helper thread).
        var carriedDigest: UInt64 = 0
        let carried = self.carried
        let digestThread = try OSThread(name: "digest") { [self] in
            var d: UInt64 = 0
            var bad: Error?
            carried.forEachSetPage { page in
                // A snapshot's chunks are checked here too, ahead of the stream and the faults.
                guard bad == nil else { return }
                do { try machine.checkPages(page..<page + 1) } catch { bad = error; return }
                // A page the paused guest never touched reads as zeros: its entry needs no read,
                // which would fault the zero page in (a millisecond per 500 pages here).
                let crc = sender.isUntouched(page) ? MemoryDigest.zeroPageCRC
                    : CRC32C.checksum(UnsafeRawBufferPointer(start: machine.pagePointer(page), count: 4096))
                d ^= MemoryDigest.mix(page: page, crc: crc)
            }
            carriedDigest = d
            if let bad { failures.record("source memory", bad) }
        }
        var digestJoined = false
        defer { if !digestJoined { digestThread.join() } }
        var sentBackground = 0
        var injectedCut = false, injectedCorruption = false, injectedViolation = false
        if let e = failedCommitSend { failedCommitSend = nil; try recover(from: e) }
        if let wanted = options.holdStreamUntilDemandPages {
            let until = MonotonicClock.deadline(after: 10)
            while faultServer.demandServed.load(ordering: .relaxed) < wanted && MonotonicClock.nanoseconds() < until
                && !faultServer.broken.load(ordering: .relaxed) && failures.failure == nil {  // a cut ends the wait
                MonotonicClock.sleep(seconds: 0.001)
            }
        }
        if options.streamDelaySeconds > 0 {
            let until = MonotonicClock.deadline(after: options.streamDelaySeconds)
            while MonotonicClock.nanoseconds() < until && failures.failure == nil && !faultServer.broken.load(ordering: .relaxed) {
                MonotonicClock.sleep(seconds: 0.005)  // the fault server answers meanwhile
            }
        }
        var streamFirstNext = 0
        while true {
            do {
                if let failure = failures.failure { throw failure }
                encoder.removeAll()
                encoder.beginPages(pageSize: 4096)
                if options.violateProtocolAfterCommit && !injectedViolation {
                    injectedViolation = true
                    encoder.appendZeroPage(index: UInt64(layout.totalPages + 7))  // outside guest memory
                }
                while !options.noBackgroundStream, let page = nextBackgroundPage(&streamFirstNext) {
                    guard done.insert(page) else { continue }
                    let corrupt = options.corruptOnePage && !injectedCorruption
                    if try sender.append(page, to: &encoder, channel: bulk, corrupt: corrupt) {
                        report.nonZeroBytes += 4096
                        if corrupt { injectedCorruption = true }
                    }
                    sentBackground += 1
                    if let progress = options.progress, sentBackground % 4096 == 0 {
                        progress(MigrationProgress(pagesDone: done.populationCount, pagesTotal: layout.totalPages, finished: false))
                    }
                    if let cut = options.disconnectAfterPages, !injectedCut, sentBackground >= cut {
                        injectedCut = true
                        bulk.close()
                        fault.close()
                    }
                    if faultServer.broken.load(ordering: .relaxed) { throw MigrationError.connectionClosed("fault connection") }
                    if let failure = failures.failure { throw failure }
                }
                try sender.finish(&encoder, channel: bulk)
                phase = .completion
                if !digestJoined { digestThread.join(); digestJoined = true }  // once: a resume comes back here
                var digest = carriedDigest
                for page in 0..<layout.totalPages where !carried.contains(page) {
                    digest ^= MemoryDigest.mix(page: page, crc: sender.sentCRC[page])
                }
                report.digest = digest
                try bulk.send(.digest(algorithm: .pageCRC32CXor, bytes: MemoryDigest.bytes(digest)))
                try bulk.send(.complete)
                // The destination's verdict: ack when the digest it read back from memory matched.
                switch try bulk.receive() {
                case .ack(SessionAck.verified): break
                case .error(let m): throw MigrationError.peerError(m)
                case let other: throw MigrationError.protocolViolation("expected the verdict, got \(other.type)")
                }
                // The destination waits for this before it lets go of the session; if it is
                // lost, the destination gives up waiting after its reconnect timeout, verified.
                try? bulk.send(.ack(SessionAck.verdictReceived))
                break
            } catch {
                try recover(from: failures.failure ?? error)
            }
        }
        report.backgroundPages = sentBackground
        options.progress?(MigrationProgress(pagesDone: layout.totalPages, pagesTotal: layout.totalPages, finished: true))
    }

    /// The next page for the background stream: the pages of ``MigrationOptions/streamFirst``
    /// not sent yet, in their order, then the first unsent page from the cursor (which the fault
    /// server moves next to each fault). Nil when every page is sent.
    func nextBackgroundPage(_ streamFirstNext: inout Int) -> Int? {
        while streamFirstNext < options.streamFirst.count {
            let page = options.streamFirst[streamFirstNext]
            streamFirstNext += 1
            if page >= 0 && page < layout.totalPages && !done.contains(page) { return page }
        }
        guard let page = done.firstClear(from: cursor.load(ordering: .relaxed)) else { return nil }
        cursor.store(page + 1 < layout.totalPages ? page + 1 : 0, ordering: .relaxed)
        return page
    }

    /// After the commit: reconnect on a lost connection, give up with the cause otherwise.
    func recover(from error: Error) throws {
        switch FailurePolicy.action(phase: phase, kind: FailureClassifier.classify(error)) {
        case .reconnect:
            FaultlineLog.note("source: connection lost after the switch-over (\(error)); reconnecting")
            try reconnectAndResume(after: error)
        case .abandonAttempt, .unrecoverable:
            try? bulk.send(.error(message: "source: \(error)"))
            try? fault.send(.error(message: "source: \(error)"))
            faultServer.stop()
            FaultlineLog.warn("source: unrecoverable after the switch-over: \(error); the paused guest is kept")
            throw MigrationError.unrecoverable("\(error)")
        }
    }

    /// After a broken connection: reconnect within the timeout, learn from the destination
    /// which pages it still lacks, and carry on from there. Nothing already installed is lost.
    func reconnectAndResume(after cause: Error) throws {
        faultServer.stop()
        bytesFromClosedChannels += bulk.bytesSent + fault.bytesSent
        bulk.close()
        fault.close()
        let deadline = MonotonicClock.deadline(after: options.reconnectSeconds)
        var lastError: Error = cause
        var handshaking = false
        while MonotonicClock.nanoseconds() < deadline {
            do {
                // A destination waiting for our reconnect answers at once: a hello that goes
                // unanswered for seconds hit a half-dead pairing, so try again.
                let left = max(1, MonotonicClock.secondsLeft(until: deadline))
                handshaking = true
                try connect(timeout: left, ackTimeout: min(left, 3))
                handshaking = false
                bulk.socket.setReceiveTimeout(seconds: options.peerTimeoutSeconds)
                let message = try bulk.receive()
                guard case .resume(let session, _, let missing) = message, session == sessionID else {
                    // A destination that answers with something else is not confused by a cut: stop.
                    throw MigrationError.protocolViolation("expected resume for session \(sessionID), got \(message.type)")
                }
                bulk.socket.setReceiveTimeout(seconds: 0)
                done.insert(0..<layout.totalPages)
                for r in missing {
                    guard r.upperBound <= UInt64(layout.totalPages) else {
                        throw MigrationError.protocolViolation("resume names pages \(r) outside guest memory")
                    }
                    for p in Int(r.lowerBound)..<Int(r.upperBound) { done.remove(p) }
                }
                cursor.store(0, ordering: .relaxed)
                report.reconnects += 1
                try faultServer.start(on: fault, cpu: options.faultPathCPU.resolved)
                return
            } catch {
                lastError = error
                let kind = FailureClassifier.classify(error)
                // A destination that could not read our hello (damaged on the way) turns it away
                // with `error` and keeps listening: that is the transport, try again. A `reject`
                // (unknown session) or an error after the handshake is the destination's answer.
                // Likewise an answer to our hello that arrives damaged (a WireError before the
                // first intact frame: the decoder calls a flipped magic "not a Faultline peer").
                var helloTurnedAway = false
                if handshaking {
                    if case MigrationError.peerError = error { helloTurnedAway = true }
                    if let wire = error as? WireError {
                        if case .unsupportedVersion = wire {} else { helloTurnedAway = true }
                    }
                }
                if !helloTurnedAway && (kind == .protocolViolation || kind == .peerReported) { throw error }
                bulk?.close()
                fault?.close()
                MonotonicClock.sleep(microseconds: 100_000)
            }
        }
        throw MigrationError.timeout("reconnecting to \(options.destination): \(lastError)")
    }

    /// Times a plain TCP copy of the same number of non-zero bytes to the destination,
    /// on the same link, right after the migration (the yardstick for its total time): 1 MiB
    /// sends from one reused buffer, as a plain copy program would do - not page by page from
    /// guest memory, whose first read here costs what the copy is meant to be compared with.
    public func measureBaseline(_ report: inout SourceReport) throws {
        let bytes = max(report.nonZeroBytes, 4096)
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { chunk.deallocate() }
        for i in 0..<chunk.count { chunk[i] = UInt8(truncatingIfNeeded: i &* 131 &+ 1) | 1 }
        try bulk.send(.ack(SessionAck.baselineFollows))
        let t0 = MonotonicClock.nanoseconds()
        let socket = try StreamSocket.connect(to: options.destination)
        var left = bytes
        while left > 0 {
            let n = Int(min(left, UInt64(chunk.count)))
            try socket.sendAll(UnsafeRawBufferPointer(rebasing: chunk[..<n]))
            left -= UInt64(n)
        }
        socket.shutdown()
        guard case .ack(let received) = try bulk.receive(), received == bytes else {
            throw MigrationError.protocolViolation("the baseline copy was not acknowledged")
        }
        report.baselineSeconds = Double(MonotonicClock.nanoseconds() - t0) / 1e9
    }
}

/// Runs attempts until one commits, as many as `retries` allows. Each failed attempt leaves
/// the guest running, unchanged; the causes are in the report (or in the error when every
/// attempt failed).
public enum SourceMigration {
    public static func run(_ machine: SourceMachine, options: MigrationOptions) throws -> (MigrationSource, SourceReport) {
        var causes: [String] = []
        var options = options
        for attempt in 0...max(options.retries, 0) {
            let source = MigrationSource(machine: machine, options: options)
            options.clearInjections()  // injected faults hit the first attempt only
            do {
                var report = try source.migrate()
                report.failedAttempts = causes
                return (source, report)
            } catch let failed as SourceAttemptFailed {
                causes.append("\(failed)")
                FaultlineLog.note("source: attempt \(attempt + 1) failed \(failed); the guest keeps running"
                                  + (attempt < options.retries ? ", retrying in \(options.retryDelaySeconds) s" : ""))
                if attempt < options.retries { MonotonicClock.sleep(microseconds: UInt64(options.retryDelaySeconds * 1e6)) }
            }
        }
        throw MigrationFailedBeforeSwitchover(causes: causes)
    }
}
