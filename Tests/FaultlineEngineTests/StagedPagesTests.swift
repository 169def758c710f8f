@testable import FaultlineEngine
import Atomics
import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A fault on a page the bulk stream has staged but not mapped yet is resolved from the
/// staged bytes (no request). The installer is held inside its first mapping call, so every
/// case here is forced, not left to timing.
@Suite("Faults resolved from staged pages (no kernel)", .timeLimit(.minutes(5)))
struct StagedPagesTests {
    let helper = InstallPipelineTests()

    /// A gate the installer waits at; `open()` lets it through for good.
    final class Gate: @unchecked Sendable {
        private let condition = TimedCondition()
        private var isOpen = false
        private(set) var arrivals = ManagedAtomic<Int>(0)
        func wait() {
            arrivals.wrappingIncrement(ordering: .relaxed)
            condition.wait { isOpen }
        }
        func open() {
            condition.withLock { isOpen = true }
            condition.broadcast()
        }
        /// Waits (at most 10 s) until a thread is held here.
        func awaitArrival() -> Bool {
            let deadline = MonotonicClock.deadline(after: 10)
            while arrivals.load(ordering: .relaxed) == 0 && MonotonicClock.nanoseconds() < deadline { MonotonicClock.sleep(microseconds: 200) }
            return arrivals.load(ordering: .relaxed) > 0
        }
    }

    func heldPipeline(pages: Int, depth: Int = 2, exclusive: Bool = false)
        throws -> (DestinationPageTable, MemoryPageMapper, PageInstaller, InstallPipeline, Gate) {
        let (table, mapper, installer) = try helper.setUp(pages: pages, exclusiveInstalls: exclusive)
        let gate = Gate()
        mapper.beforeBulkMap = { _, _ in gate.wait() }
        let pipeline = try InstallPipeline(installer: installer, depth: depth, scratchPages: 256, runPages: 64, installers: 1,
                                           onFailure: { _ in })
        return (table, mapper, installer, pipeline, gate)
    }

    @Test func entriesRoundTrip() {
        for e in [StagedPages.Entry(scratch: 0, generation: 0, slot: 0, zero: false),
                  StagedPages.Entry(scratch: 7, generation: 0xFFFF_FFFF, slot: 255, zero: true),
                  StagedPages.Entry(scratch: StagedPages.maxScratches - 1, generation: 3, slot: StagedPages.maxSlots - 1, zero: false)] {
            #expect(StagedPages.decode(StagedPages.encode(e)) == e)
        }
        #expect(StagedPages.decode(0) == nil)
        let staged = StagedPages(pages: 8)
        #expect(staged.lookup(3) == nil)
        #expect(staged.lookup(8) == nil && staged.lookup(-1) == nil)
        staged.publish(3, .init(scratch: 1, generation: 2, slot: 5, zero: false), crc: 0xABCD)
        #expect(staged.lookup(3)?.entry == .init(scratch: 1, generation: 2, slot: 5, zero: false))
        #expect(staged.lookup(3)?.crc == 0xABCD)
    }

    @Test func aFaultOnAStagedPageIsMappedFromTheStagedBytes() throws {
        let pages = 16 + 512
        let (table, mapper, installer, pipeline, gate) = try heldPipeline(pages: pages)
        defer { gate.open(); pipeline.stop() }
        // One batch: data pages and zero markers; the installer stops at its first mapping.
        try pipeline.submit(try helper.batch((16..<272).map { ($0, $0 % 4 == 0 ? nil : helper.tag($0)) }))
        #expect(gate.awaitArrival(), "the installer never reached its first mapping")
        #expect(!table.installed.contains(200))
        // A fault on a data page and on a zero page, while the installer is held.
        #expect(try pipeline.resolveStaged(201))
        #expect(try pipeline.resolveStaged(200))
        #expect(table.installed.contains(201) && table.installed.contains(200))
        #expect(mapper.bytes(of: 201).load(as: UInt8.self) == helper.tag(201))
        #expect(mapper.bytes(of: 201).load(fromByteOffset: 4095, as: UInt8.self) == 0xEE)
        #expect(mapper.bytes(of: 200).load(as: UInt8.self) == 0)
        #expect(table.receivedCRC[201] == CRC32C.checksum(UnsafeRawBufferPointer(start: mapper.bytes(of: 201), count: 4096)))
        // Not staged (never sent): left to a request.
        #expect(try !pipeline.resolveStaged(400))
        #expect(!table.installed.contains(400))
        gate.open()
        try pipeline.drain()
        // The installer stepped over the two pages; every page went in exactly once.
        for p in 16..<272 {
            #expect(mapper.mapCount[p] == 1, "page \(p) mapped \(mapper.mapCount[p]) times")
            #expect(mapper.bytes(of: p).load(as: UInt8.self) == (p % 4 == 0 ? 0 : helper.tag(p)), "page \(p)")
        }
        #expect(table.installedCount == 256)
        let fromStaging = installer.stagedFaultCount.load(ordering: .relaxed)
        let background = installer.backgroundCount.load(ordering: .relaxed)
        #expect(fromStaging == 2)
        #expect(background == 256)
    }

    @Test func aPageAVcpuWaitsForIsInstalledAsSoonAsItIsStaged() throws {
        let pages = 16 + 512
        let (table, mapper, installer, pipeline, gate) = try heldPipeline(pages: pages)
        defer { gate.open(); pipeline.stop() }
        // The installer is held by a first batch; a vCPU then faults on page 300 (its request
        // is out), and the stream brings 300 in the next batch, queued behind the first.
        try pipeline.submit(try helper.batch((16..<100).map { ($0, helper.tag($0)) }))
        #expect(gate.awaitArrival())
        #expect(installer.book.noteRequest(300, vcpu: 0, at: MonotonicClock.nanoseconds()))
        try pipeline.submit(try helper.batch((280..<320).map { ($0, helper.tag($0)) }))
        // The receiver mapped it on its way through; the installer has not moved.
        #expect(table.installed.contains(300))
        #expect(mapper.bytes(of: 300).load(as: UInt8.self) == helper.tag(300))
        #expect(!table.installed.contains(299) && !table.installed.contains(16))
        #expect(installer.book.latencyLog2.buckets().reduce(0, +) == 1)  // its wait was recorded
        gate.open()
        try pipeline.drain()
        for p in Array(16..<100) + Array(280..<320) { #expect(mapper.mapCount[p] == 1, "page \(p)") }
        let fromStaging = installer.stagedFaultCount.load(ordering: .relaxed)
        #expect(fromStaging == 1)
    }

    @Test func aFaultThatAskedJustBeforeItsPageWasStagedLooksAgain() throws {
        // The fault path looked (nothing staged), the receiver staged the page before the
        // request was noted, and the request went out: the look after the request maps it.
        let pages = 16 + 512
        let (table, mapper, _, pipeline, gate) = try heldPipeline(pages: pages)
        defer { gate.open(); pipeline.stop() }
        try pipeline.submit(try helper.batch((16..<200).map { ($0, helper.tag($0)) }))
        #expect(gate.awaitArrival())
        #expect(pipeline.installer.book.noteRequest(150, vcpu: 0, at: MonotonicClock.nanoseconds()))
        #expect(!table.installed.contains(150))
        try pipeline.lookAgainAfterRequest(150)
        #expect(table.installed.contains(150))
        #expect(mapper.bytes(of: 150).load(as: UInt8.self) == helper.tag(150))
        try pipeline.lookAgainAfterRequest(400)  // never staged: nothing happens
        #expect(!table.installed.contains(400))
    }

    @Test func aRetiredScratchIsNeverReadAgain() throws {
        let pages = 16 + 512
        let (table, mapper, _, pipeline, gate) = try heldPipeline(pages: pages, depth: 1)
        gate.open()
        defer { pipeline.stop() }
        try pipeline.submit(try helper.batch((16..<80).map { ($0, helper.tag($0)) }))
        try pipeline.drain()
        // The scratch was retired after its pages went in: an entry naming its old generation
        // (as a fault path thread may still read it) must not be followed, even for a page
        // that is not installed: its bytes may be another page's by now.
        let staged = try #require(pipeline.staged)
        let old = try #require(staged.lookup(20)).entry
        staged.publish(450, old, crc: 0)
        #expect(try !pipeline.resolveStaged(450))
        #expect(!table.installed.contains(450) && mapper.mapCount[450] == 0)
    }

    @Test func retiringAScratchWaitsForItsPins() throws {
        let scratch = PageInstaller.Scratch(pages: 4)
        let generation = scratch.generation.load(ordering: .relaxed)
        scratch.pins.wrappingIncrement(ordering: .sequentiallyConsistent)
        let retired = ManagedAtomic<Bool>(false)
        let t = try OSThread(name: "retire") {
            scratch.reset()
            retired.store(true, ordering: .sequentiallyConsistent)
        }
        MonotonicClock.sleep(microseconds: 50_000)
        let retiredEarly = retired.load(ordering: .sequentiallyConsistent)
        let advanced = scratch.generation.load(ordering: .relaxed)
        #expect(!retiredEarly, "reset did not wait for the pin")
        #expect(advanced == generation &+ 1)  // but new readers are turned away at once
        scratch.pins.wrappingDecrement(ordering: .sequentiallyConsistent)
        t.join()
        let retiredAtLast = retired.load(ordering: .sequentiallyConsistent)
        #expect(retiredAtLast)
    }

    @Test func withExclusiveInstallsAFaultTakesAPageAndTheInstallerLeavesItOut() throws {
        // uffd-minor: a page is written by one thread only (a second write could land after
        // the guest's own write). The fault path takes a staged page; the bulk run skips it.
        let pages = 16 + 512
        let (table, mapper, installer, pipeline, gate) = try heldPipeline(pages: pages, exclusive: true)
        // As in a migration with pre-copy: the pre-copy pipeline is built later, on the same
        // installer (it once switched the sealing off: the selfcheck guest caught the overwrite).
        let precopy = try InstallPipeline(.precopy, installer: installer, depth: 1, scratchPages: 64, runPages: 64, installers: 1,
                                          onFailure: { _ in })
        precopy.stop()
        let bulkMaps = Locked<[Range<Int>]>([])
        mapper.beforeBulkMap = { first, count in
            bulkMaps.withLock { $0.append(first..<(first + count)) }
            gate.wait()
        }
        defer { gate.open(); pipeline.stop() }
        // Runs of 64 pages: 16..<80 (the installer is held in its mapping, sealed), 80..<144, ...
        try pipeline.submit(try helper.batch((16..<272).map { ($0, helper.tag($0)) }))
        #expect(gate.awaitArrival())
        #expect(try !pipeline.resolveStaged(40))  // sealed by the installer: the fault waits for its run
        #expect(!table.installed.contains(40))
        #expect(try pipeline.resolveStaged(100))  // not reached yet: taken by the fault
        #expect(table.installed.contains(100))
        #expect(mapper.bytes(of: 100).load(as: UInt8.self) == helper.tag(100))
        #expect(try !pipeline.resolveStaged(100))  // taken once
        gate.open()
        try pipeline.drain()
        let maps = bulkMaps.withLock { $0 }
        #expect(!maps.contains { $0.contains(100) }, "the bulk installer wrote page 100 too: \(maps)")
        #expect(maps.contains { $0.contains(99) } && maps.contains { $0.contains(101) })
        for p in 16..<272 {
            #expect(mapper.mapCount[p] == 1, "page \(p)")
            #expect(mapper.bytes(of: p).load(as: UInt8.self) == helper.tag(p), "page \(p)")
        }
        let fromStaging = installer.stagedFaultCount.load(ordering: .relaxed)
        #expect(fromStaging == 1)
        #expect(table.installedCount == 256)
    }

    @Test(.gate(.installerLentRealTime))
    func aFaultOnASealedRunMakesItsInstallerRealTimeUntilTheRunIsMapped() throws {
        // uffd-minor: the fault waits for the sealed run; the installer (nice -5) lost the CPU
        // there to the fault path for milliseconds. The fault lends it real-time priority.
        let pages = 16 + 512
        let (table, mapper, installer, pipeline, gate) = try heldPipeline(pages: pages, exclusive: true)
        let installerThread = ManagedAtomic<Int32>(0)
        mapper.beforeBulkMap = { _, _ in
            installerThread.store(ThreadScheduling.currentThreadID(), ordering: .relaxed)
            gate.wait()
        }
        defer { gate.open(); pipeline.stop() }
        try pipeline.submit(try helper.batch((16..<272).map { ($0, helper.tag($0)) }))
        #expect(gate.awaitArrival())
        let tid = installerThread.load(ordering: .relaxed)
        #expect(sched_getscheduler(tid) == SCHED_OTHER, "the installer runs real-time before any fault waits for it")
        #expect(try !pipeline.resolveStaged(40))  // sealed: the fault waits, and hurries the run
        #expect(sched_getscheduler(tid) == SCHED_FIFO)
        #expect(try !pipeline.resolveStaged(41))  // a second fault on the same run changes nothing
        #expect(installer.hurriedRuns.load(ordering: .relaxed) == 1)
        gate.open()
        try pipeline.drain()
        #expect(table.installed.contains(40) && mapper.mapCount[40] == 1)
        #expect(sched_getscheduler(tid) == SCHED_OTHER, "the installer stayed real-time after its run")
        #expect(getpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(tid)) == OSThread.Niceness.postcopyInstaller)
    }

    @Test func takingAndSealingExcludeEachOther() {
        let staged = StagedPages(pages: 4)
        let e = StagedPages.Entry(scratch: 0, generation: 1, slot: 2, zero: false)
        staged.publish(1, e, crc: 7)
        staged.publish(2, e, crc: 7)
        #expect(staged.take(1, e))
        #expect(!staged.seal(1, e))  // taken: the run leaves it out
        #expect(staged.seal(2, e))
        #expect(!staged.take(2, e))  // sealed: the fault waits for the run
        #expect(staged.lookup(1) == nil && staged.lookup(2) == nil)
        // An entry of an older generation neither takes nor seals as if it were current.
        staged.publish(3, e, crc: 7)
        #expect(!staged.take(3, .init(scratch: 0, generation: 0, slot: 2, zero: false)))
    }
}
