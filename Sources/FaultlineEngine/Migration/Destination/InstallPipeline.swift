import Atomics
import FaultlineCore
import FaultlineLinux

/// The bulk stream in two stages on two threads: the bulk receiver verifies, (after the
/// switch-over) claims and stages each batch into a free scratch, and an installer thread
/// stores or maps what is staged (pre-copy: ``PageInstaller/stagePrecopy`` and
/// ``PageInstaller/applyPrecopy``, on one installer thread, in order; post-copy:
/// ``PageInstaller/stage`` and ``PageInstaller/apply``). Receiving and checking
/// the next batch then overlaps with mapping this one - on this machine mapping a page
/// (allocating it) costs about twice what receiving and checking it does, and a single thread
/// paid both one after the other. The scratches are allocated once; a full ring makes the
/// receiver wait (the socket then pushes back on the source).
final class InstallPipeline: @unchecked Sendable {
    enum Stage { case precopy, postcopy }
    let installer: PageInstaller
    let stage: Stage
    let runPages: Int
    private let scratches: [PageInstaller.Scratch]
    private let condition = TimedCondition()
    // Under `condition`:
    private var free: [Int]
    private var queued: [Int] = []
    private var busy = 0
    private var stopped = false
    private var failure: Error?
    /// Pool chunk shared by the scratches' runs (receiver thread only).
    private var pool = PageInstaller.PoolCursor()
    private var threads: [OSThread] = []
    private let onFailure: (Error) -> Void
    /// Post-copy: where each staged page is, for the fault path (``resolveStaged(_:)``).
    let staged: StagedPages?

    /// `depth` scratches of `scratchPages` pages each; `installers` mapping threads (pre-copy:
    /// always one, since a later copy of a page must win).
    /// `tableAllocator`: where the per-page staging entries live (zero-filled memory).
    init(_ stage: Stage = .postcopy, installer: PageInstaller, depth: Int, scratchPages: Int, runPages: Int, installers: Int,
         tableAllocator: ZeroFilledAllocator? = nil, onFailure: @escaping (Error) -> Void) throws {
        self.stage = stage
        self.installer = installer
        self.runPages = runPages
        self.onFailure = onFailure
        scratches = (0..<max(depth, 1)).map { PageInstaller.Scratch(pages: scratchPages, index: $0) }
        staged = stage == .postcopy ? StagedPages(pages: installer.table.count, allocator: tableAllocator) : nil
        // Only the post-copy pipeline: the pre-copy one, built later on the same installer, must
        // not switch sealing off (a run written over a page a fault took would overwrite what
        // the guest wrote there since).
        if stage == .postcopy && installer.exclusiveInstalls { installer.sealing = staged }
        free = Array(scratches.indices)
        queued.reserveCapacity(scratches.count)
        for i in 0..<(stage == .precopy ? 1 : max(installers, 1)) {
            threads.append(try OSThread(name: "installer \(i)", niceness: stage == .postcopy ? OSThread.Niceness.postcopyInstaller : 0) { [self] in
                installLoop()
            })
        }
    }

    deinit { stop() }

    /// Sets the installer threads' niceness (best effort).
    func setInstallerNiceness(_ value: Int32) {
        for t in threads { try? ThreadScheduling.setNiceness(value, ofThread: t.threadID) }
    }

    /// Receiver: stages `batch` and hands it to the installer threads. Throws the installers'
    /// failure, if any.
    func submit(_ batch: PageBatch) throws {
        var pages = batch.makeIterator()
        while true {
            let index = try takeFree()
            let scratch = scratches[index]
            let finished: Bool
            do {
                finished = stage == .precopy ? try installer.stagePrecopy(&pages, into: scratch)
                    : try installer.stage(&pages, demand: false, into: scratch, pool: &pool, runPages: runPages)
            } catch {
                // Nothing of it is mapped: give the claims back with the scratch.
                if stage == .postcopy { unclaim(scratch) }
                scratch.reset()
                condition.withLock { free.append(index) }
                throw error
            }
            if scratch.isEmpty {
                condition.withLock { free.append(index) }
            } else {
                if let staged {
                    do { try publish(scratch, in: staged) } catch {
                        unclaim(scratch)
                        scratch.reset()
                        condition.withLock { free.append(index) }
                        throw error
                    }
                }
                // A page a vCPU waits for goes ahead of the rest.
                condition.withLock { if scratch.urgent { queued.insert(index, at: 0) } else { queued.append(index) } }
                condition.broadcast()
            }
            if finished { return }
        }
    }

    /// Makes the staged pages of `scratch` findable by the fault path. Pages a vCPU already
    /// waits for are installed here and now: each would otherwise wait behind the runs queued
    /// ahead of its scratch, or for the source's reply to a request its stream had answered.
    private func publish(_ scratch: PageInstaller.Scratch, in staged: StagedPages) throws {
        let generation = scratch.generation.load(ordering: .relaxed)
        for run in scratch.runs where installer.publishes(run) {
            for i in 0..<run.count {
                staged.publish(run.first + i, scratch.stagedEntry(run, i, generation: generation), crc: scratch.crc[run.crcStart + i])
            }
        }
        // Every page, not only those requested while staging: a fault may have looked for its
        // page just before it was published and asked the source meanwhile. The fault path
        // looks again after its request (``lookAgainAfterRequest``); with a full fence on both
        // sides, one of the two sees the other.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        for run in scratch.runs where installer.publishes(run) {
            for page in run.first..<(run.first + run.count) where installer.book.requested.contains(page) && !installer.table.installed.contains(page) {
                _ = try resolveStaged(page)
            }
        }
    }

    /// The fault path, after its request for `page` went out: the page may have been staged
    /// between its first look and the request (see ``publish``); maps it if so.
    func lookAgainAfterRequest(_ page: Int) throws {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if !installer.table.installed.contains(page) { _ = try resolveStaged(page) }
    }

    /// The fault path: if `page` is staged (verified, claimed by the bulk installer, not
    /// mapped yet), maps it from the staged bytes and returns true. The scratch is pinned
    /// meanwhile, so it cannot be refilled under the copy.
    func resolveStaged(_ page: Int) throws -> Bool {
        guard let staged else { return false }
        guard let (entry, crc) = staged.lookup(page), entry.scratch < scratches.count else {
            if installer.exclusiveInstalls && staged.isSealed(page) { installer.hurrySealedRun() }  // its run is being written
            return false
        }
        let scratch = scratches[entry.scratch]
        scratch.pins.wrappingIncrement(ordering: .sequentiallyConsistent)
        defer { scratch.pins.wrappingDecrement(ordering: .sequentiallyConsistent) }
        guard scratch.generation.load(ordering: .sequentiallyConsistent) == entry.generation else { return false }
        // MINOR: one writer per page - take it from the bulk installer, or leave it to its run.
        if installer.exclusiveInstalls {
            guard installer.sealing === staged else { return false }
            guard staged.take(page, entry) else { installer.hurrySealedRun(); return false }  // sealed meanwhile
        }
        try installer.installStaged(page, data: entry.zero ? nil : UnsafeRawPointer(scratch.staging + entry.slot * 4096), crc: crc)
        return true
    }

    /// Waits until every staged page is mapped; throws the installers' failure, if any.
    func drain() throws {
        condition.wait { queued.isEmpty && busy == 0 || failure != nil || stopped }
        if let failure = condition.withLock({ failure }) { throw failure }
    }

    /// Stops and joins the installer threads (idempotent); staged pages not mapped yet stay
    /// claimed by nobody: their claims are given back.
    func stop() {
        condition.withLock { stopped = true }
        condition.broadcast()
        for t in threads { t.join() }
        threads = []
        for index in condition.withLock({ queued }) {
            if stage == .postcopy { unclaim(scratches[index]) }
            scratches[index].reset()
        }
        condition.withLock { queued.removeAll() }
    }

    private func unclaim(_ scratch: PageInstaller.Scratch) {
        for run in scratch.runs {
            for i in 0..<run.count where !installer.table.installed.contains(run.first + i) { installer.table.unclaim(run.first + i) }
        }
    }

    private func takeFree() throws -> Int {
        condition.wait { !free.isEmpty || failure != nil || stopped }
        return try condition.withLock {
            if let failure { throw failure }
            if stopped { throw MigrationError.connectionClosed("the installer threads were stopped") }
            return free.removeLast()
        }
    }

    private func installLoop() {
        while true {
            condition.wait { !queued.isEmpty || stopped }
            guard let index: Int = condition.withLock({
                guard !stopped, failure == nil, !queued.isEmpty else { return nil }
                busy += 1
                return queued.removeFirst()
            }) else { return }
            let scratch = scratches[index]
            var failed: Error?
            do {
                if stage == .precopy { try installer.applyPrecopy(scratch) } else { try installer.apply(scratch, demand: false) }
            } catch {
                failed = error
            }
            scratch.reset()
            condition.withLock {
                busy -= 1
                free.append(index)
                if let failed, failure == nil { failure = failed }
            }
            condition.broadcast()
            if let failed {
                onFailure(failed)
                return
            }
        }
    }
}
