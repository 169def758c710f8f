import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation
import Testing

/// Migrations between two in-process fakes (``MemoryMachine`` guests, ``MemoryPageMapper``
/// memory) over loopback TCP: the engine's logic with no /dev/kvm and no userfaultfd.
final class FakePair: @unchecked Sendable {
    let layout: MachineLayout
    let source: MemoryMachine
    var destinationMachine: MemoryMachine?
    var destinationMapper: MemoryPageMapper?
    var configureDestinationMachine: (MemoryMachine) -> Void = { _ in }
    var failMapCall: Int?

    init(ramPages: Int = 256, vcpus: Int = 1) throws {
        layout = try MachineLayout(vcpus: vcpus, ramSize: UInt64(ramPages) * 4096)
        source = MemoryMachine(layout: layout)
        for page in layout.lowPages..<layout.totalPages where page % 3 != 0 { source.write(page: page, byte: UInt8(page % 251) | 1) }
    }

    /// Runs both sides; returns what each ended with.
    func migrate(source configure: (inout MigrationOptions) -> Void = { _ in },
                 destination configureDestination: (inout DestinationOptions) -> Void = { _ in })
        throws -> (source: Result<SourceReport, Error>, destination: Result<DestinationReport, Error>) {
        var d = DestinationOptions(listen: SocketEndpoint(host: "127.0.0.1", port: 0))
        d.runAfterSeconds = 0
        d.acceptSeconds = 5
        d.reconnectSeconds = 5
        d.idleSeconds = 5
        d.faultPathCPU = .unpinned
        d.machineFactory = { [self] layout in
            let m = MemoryMachine(layout: layout)
            configureDestinationMachine(m)
            let mapper = MemoryPageMapper(pages: layout.totalPages)
            mapper.failMapCall = failMapCall
            destinationMachine = m
            destinationMapper = mapper
            return (m, mapper)
        }
        configureDestination(&d)
        let destination = try MigrationDestination(options: d)
        var options = MigrationOptions(destination: destination.endpoint)
        options.faultPathCPU = .unpinned
        options.reconnectSeconds = 5
        options.peerTimeoutSeconds = 5
        options.retryDelaySeconds = 0.1
        configure(&options)
        let destinationResult = Locked<Result<DestinationReport, Error>?>(nil)
        let thread = try OSThread(name: "destination") {
            let r = Result { try destination.run() }
            destinationResult.withLock { $0 = r }
        }
        let sourceResult = Result { try SourceMigration.run(source, options: options).1 }
        thread.join()
        return (sourceResult, destinationResult.withLock { $0! })
    }

    /// Destination memory equals the source's (paused) memory, page by page.
    func memoriesMatch() -> Bool {
        guard let mapper = destinationMapper else { return false }
        return memcmp(mapper.memory, source.memory, layout.totalPages * 4096) == 0
    }
}

@Suite("Migration logic against fakes (no kernel)")
struct MigrationWithFakesTests {
    @Test func aPageSentAgainInALaterRoundReplacesTheEarlierCopy() throws {
        let pair = try FakePair()
        let low = pair.layout.lowPages
        // Round 1 sends everything; meanwhile the guest rewrites pages A and B. Round 2 sends them
        // again; meanwhile the guest rewrites B once more (B is owed at the switch-over, A is not:
        // A's round-2 copy must be the one the destination keeps - the lost page of issue 7).
        pair.source.onCollect = { m, n in
            if n == 0 { m.write(page: low + 10, byte: 0xA1); m.write(page: low + 20, byte: 0xB1) }
            if n == 1 { m.write(page: low + 20, byte: 0xB2) }
        }
        let r = try pair.migrate(source: { $0.precopyRounds = 3; $0.postcopy = .always })
        let s = try r.source.get(), d = try r.destination.get()
        #expect(s.precopyRounds.count == 3)
        #expect(s.precopyRounds.map(\.dirtyAfter) == [2, 1, 0])
        #expect(d.digestMatch)
        #expect(pair.memoriesMatch())
        #expect(pair.destinationMapper!.bytes(of: low + 10).load(as: UInt8.self) == 0xA1)
        #expect(pair.destinationMapper!.bytes(of: low + 20).load(as: UInt8.self) == 0xB2)
        #expect(d.digestPagesFromMemory == pair.layout.totalPages)
    }

    @Test(arguments: [PostcopyPolicy.always, .auto])
    func theTimeLimitCutsARoundShortAndPostcopySendsTheRest(postcopy: PostcopyPolicy) throws {
        // A time limit of a nanosecond: the policy lets the first round start (0 s elapsed)
        // and the round stops at its first check, after 255 of 8192+ pages. A page written in
        // the part that was sent must arrive in its new version too.
        let pair = try FakePair(ramPages: 8192)
        let low = pair.layout.lowPages
        pair.source.onCollect = { m, n in if n == 0 { m.write(page: low + 3, byte: 0xC3) } }
        // (auto: a downtime target nothing fits, or the rest would be stop-and-copied.)
        let r = try pair.migrate(source: { $0.precopyRounds = 5; $0.precopySeconds = 1e-9; $0.postcopy = postcopy
                                           $0.maxDowntimeMilliseconds = 0.000_001 })
        let s = try r.source.get(), d = try r.destination.get()
        #expect(s.precopyRounds.count == 1)
        #expect(s.precopyRounds.first?.cutShort == true)
        #expect(s.precopyRounds.first?.pages == 255)
        #expect(s.mode == "postcopy", "\(postcopy): the rest goes in post-copy")
        #expect(d.postcopy)
        #expect(d.digestMatch && pair.memoriesMatch())
        #expect(pair.destinationMapper!.bytes(of: low + 3).load(as: UInt8.self) == 0xC3)
    }

    @Test func aRoundCutAtItsLastCheckCountsThePagesItSentAndPostcopySendsTheRest() throws {
        // The time limit passes while the first round sends its last 256 pages: the round stops
        // at its last check (index 4095 of 4096), one page short. Its count says 4095, and that
        // page goes over in post-copy with the pages the guest dirtied meanwhile.
        let pair = try FakePair(ramPages: 4096)
        let low = pair.layout.lowPages
        let limit = 2.0
        let held = Locked(false)
        pair.source.onRead = { page in
            guard page == low + 4094, !held.withLock({ let was = $0; $0 = true; return was }) else { return }
            // The round reads its second-last page: hold it here until the time limit is past.
            let until = MonotonicClock.deadline(after: limit)
            while MonotonicClock.nanoseconds() < until { MonotonicClock.sleep(seconds: MonotonicClock.secondsLeft(until: until)) }
        }
        pair.source.onCollect = { m, n in if n == 0 { m.write(page: low + 3, byte: 0xC3) } }
        let r = try pair.migrate(source: { $0.precopyRounds = 1; $0.precopySeconds = limit; $0.postcopy = .always })
        let s = try r.source.get(), d = try r.destination.get()
        #expect(s.precopyRounds.count == 1)
        #expect(s.precopyRounds.first?.cutShort == true)
        #expect(s.precopyRounds.first?.pages == 4095)
        #expect(s.precopyPages == 4095)
        #expect(s.owedPages == 2, "the unsent last page and the page written after it was sent")
        #expect(s.demandPages + s.backgroundPages == s.owedPages)
        #expect(d.demandPages + d.backgroundPages == s.owedPages)
        #expect(d.digestMatch && pair.memoriesMatch())
        #expect(pair.destinationMapper!.bytes(of: low + 3).load(as: UInt8.self) == 0xC3)
    }

    @Test func withoutPostcopyARoundIsNotCutShort() throws {
        let pair = try FakePair(ramPages: 2048)
        let r = try pair.migrate(source: { $0.precopyRounds = 1; $0.precopySeconds = 1e-9; $0.postcopy = .never
                                           $0.maxDowntimeMilliseconds = 10_000 })
        let s = try r.source.get(), d = try r.destination.get()
        #expect(s.precopyRounds.first?.cutShort == false)
        #expect(s.precopyRounds.first?.pages == pair.layout.ramPages)
        #expect(d.digestMatch && pair.memoriesMatch())
    }

    @Test func pureStopAndCopyNeedsNoPostcopy() throws {
        let pair = try FakePair()
        pair.source.onCollect = { m, n in if n == 0 { m.write(page: m.layout.lowPages + 5, byte: 7) } }
        let r = try pair.migrate(source: { $0.precopyRounds = 5; $0.postcopy = .never; $0.maxDowntimeMilliseconds = 10_000 })
        let s = try r.source.get(), d = try r.destination.get()
        #expect(s.mode == "precopy")
        #expect(s.stopAndCopyPages == 1)
        #expect(!d.postcopy)
        #expect(d.digestMatch && pair.memoriesMatch())
    }

    @Test func neverFailsCleanlyWhenPrecopyCannotConverge() throws {
        let pair = try FakePair()
        pair.source.onCollect = { m, _ in for p in m.layout.lowPages..<m.layout.totalPages { m.write(page: p, byte: 9) } }
        let r = try pair.migrate(source: { $0.precopyRounds = 2; $0.postcopy = .never; $0.maxDowntimeMilliseconds = 0.000_001 },
                                 destination: { $0.acceptSeconds = 1 })
        #expect(throws: MigrationFailedBeforeSwitchover.self) { try r.source.get() }
        #expect(pair.source.paused == false)
        #expect(pair.source.pauses == 0)  // never paused: it gave up while the guest ran
    }

    @Test func aCutDuringPrecopyAbandonsTheAttemptAndARetrySucceeds() throws {
        let pair = try FakePair()
        let r = try pair.migrate(source: { $0.precopyRounds = 2; $0.postcopy = .always; $0.retries = 1
                                           $0.disconnectDuringPrecopyAfterPages = 40 })
        let s = try r.source.get(), d = try r.destination.get()
        #expect(s.failedAttempts.count == 1)
        #expect(d.abandonedAttempts.count == 1)
        #expect(d.digestMatch && pair.memoriesMatch())
        #expect(s.failedAttempts.first?.contains("during precopy") == true)
        #expect(pair.source.pauses == 1)  // only the attempt that went through paused the guest
    }

    @Test func aCorruptPrecopyPageAbandonsTheAttemptWithoutRetries() throws {
        let pair = try FakePair()
        let r = try pair.migrate(source: { $0.precopyRounds = 1; $0.postcopy = .always; $0.corruptOnePrecopyPage = true },
                                 destination: { $0.acceptSeconds = 1 })
        #expect(throws: MigrationFailedBeforeSwitchover.self) { try r.source.get() }
        #expect(pair.source.resumes == pair.source.pauses)
    }

    @Test func aCutAtTheCommitIsResolvedByTheReconnect() throws {
        let pair = try FakePair()
        let r = try pair.migrate(source: { $0.disconnectAtCommit = true })
        let s = try r.source.get(), d = try r.destination.get()
        #expect(s.reconnects == 1)
        #expect(s.failedAttempts.isEmpty)
        #expect(d.digestMatch && pair.memoriesMatch())
    }

    @Test func aCutDuringPostcopyResumes() throws {
        let pair = try FakePair(ramPages: 1024)
        let r = try pair.migrate(source: { $0.disconnectAfterPages = 300 })
        let s = try r.source.get(), d = try r.destination.get()
        #expect(s.reconnects == 1 && d.reconnects == 1)
        #expect(d.digestMatch && pair.memoriesMatch())
    }

    /// The engine reports post-copy's progress to whoever asks, and draws nothing itself.
    @Test func postcopyProgressIsReportedThroughTheCallback() throws {
        let pair = try FakePair(ramPages: 9000)
        let seen = Locked<[MigrationProgress]>([])
        let r = try pair.migrate(source: { o in
            o.postcopy = .always
            o.precopyRounds = 0
            o.progress = { p in seen.withLock { $0.append(p) } }
        })
        #expect(try r.destination.get().digestMatch)
        let steps = seen.withLock { $0 }
        #expect(steps.count >= 3, "every 4096 pages, and at the end: \(steps)")
        #expect(steps.last == MigrationProgress(pagesDone: pair.layout.totalPages, pagesTotal: pair.layout.totalPages, finished: true))
        #expect(zip(steps, steps.dropFirst()).allSatisfy { $0.pagesDone <= $1.pagesDone } && steps.dropLast().allSatisfy { !$0.finished })
    }

    @Test func aCorruptPostcopyPageIsNeverInstalledAndIsFetchedAgain() throws {
        let pair = try FakePair()
        let r = try pair.migrate(source: { $0.corruptOnePage = true })
        let d = try r.destination.get()
        #expect(d.corruptPagesRejected >= 1)
        #expect(d.digestMatch && pair.memoriesMatch())
    }

    @Test func aProtocolViolationAfterTheCommitIsNotRetried() throws {
        let pair = try FakePair()
        let r = try pair.migrate(source: { $0.violateProtocolAfterCommit = true })
        #expect(throws: MigrationError.self) { try r.source.get() }
        #expect(throws: MigrationError.self) { try r.destination.get() }
        if case .failure(let e) = r.destination { #expect("\(e)".contains("outside guest memory")) }
        if case .failure(let e) = r.source { #expect("\(e)".contains("unrecoverable")) }
    }

    @Test func aFailingFaultPathThreadFailsTheMigrationWithItsError() throws {
        let pair = try FakePair()
        // A corrupt background page is dropped, so at least that page must come as a reply on the
        // fault connection (whatever the simulated vCPU's fault races with): the injected failure
        // of the fault receiver is certain to happen.
        pair.configureDestinationMachine = { $0.simulatedFaults = [4096 * 100] }
        let r = try pair.migrate(source: { $0.corruptOnePage = true },
                                 destination: { $0.faultMode = .vcpuExit; $0.failFaultPathThread = true; $0.reconnectSeconds = 1 })
        guard case .failure(let e) = r.destination else { Issue.record("the destination completed"); return }
        #expect("\(e)".contains("fault receiver"))
        #expect("\(e)".contains("injected"))
        #expect(throws: MigrationError.self) { try r.source.get() }
    }

    @Test func aPageDamagedAfterInstallationFailsTheDigest() throws {
        let pair = try FakePair()
        let r = try pair.migrate(destination: { $0.damageInstalledPage = pair.layout.lowPages + 1 })
        let d = try r.destination.get()
        #expect(!d.digestMatch)
        #expect(throws: MigrationError.self) { try r.source.get() }
    }

    @Test func aFaultBringsItsFaultAroundWindowInOneReply() throws {
        // One simulated fault near the end of memory, and a source that holds its stream until
        // 16 pages went out on demand: only the fault-around window of that one fault brings
        // them (with a window of 1, one page comes on demand and the hold runs into its bound).
        let pair = try FakePair(ramPages: 8192)
        let page = 8000
        pair.configureDestinationMachine = { $0.simulatedFaults = [UInt64(4096 * page)] }
        let r = try pair.migrate(source: { $0.holdStreamUntilDemandPages = 16 },
                                 destination: { $0.faultMode = .vcpuExit; $0.faultAround = 16 })
        let d = try r.destination.get()
        #expect(d.faults == 1)
        #expect(d.faultAround == 16)
        #expect(d.demandPages >= 16, "the window came in the reply")
        #expect(d.digestMatch && pair.memoriesMatch())
    }

    @Test func faultAroundOutsideItsBoundsIsRefused() throws {
        var d = DestinationOptions(listen: SocketEndpoint(host: "127.0.0.1", port: 0))
        for bad in [0, Int(WireProtocol.maxPagesPerRequest) + 1] {
            d.faultAround = bad
            #expect { try d.validate() } throws: { ($0 as? InvalidSetting)?.setting == .faultAround }
        }
        d.faultAround = Int(WireProtocol.maxPagesPerRequest)
        try d.validate()
        for bad: Int32 in [-1, 20] {
            d.vcpuNicenessDuringPostcopy = bad
            #expect { try d.validate() } throws: { ($0 as? InvalidSetting)?.setting == .postcopyVcpuNiceness }
        }
        d.vcpuNicenessDuringPostcopy = 0
        try d.validate()
    }

    @Test func demandFaultsAreServedOnTheFaultConnection() throws {
        // The vCPU touches the last pages the stream would send, and the source holds its
        // stream until both were served on demand: the fault path is certain to run.
        let pair = try FakePair(ramPages: 8192)
        pair.configureDestinationMachine = { $0.simulatedFaults = [4096 * 8191, 4096 * 8000] }
        let r = try pair.migrate(source: { $0.holdStreamUntilDemandPages = 2 }, destination: { $0.faultMode = .vcpuExit })
        let d = try r.destination.get()
        #expect(d.faults >= 2)
        #expect(d.demandPages >= 2)
        #expect(pair.destinationMachine!.faultErrors.isEmpty)
        #expect(d.digestMatch && pair.memoriesMatch())
    }
}
