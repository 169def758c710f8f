import FaultlineCore
import FaultlineLinux

/// Restores a snapshot as a clone: the new guest's RAM is the snapshot's memory file mapped
/// private (``MemoryBacking/privateFile``) at RAM's offset in the file. A page the guest only
/// reads is the file's page-cache page, shared by every clone of the snapshot (and never
/// copied: the kernel reads it in on the first touch, as it does for any file mapping); a
/// page the guest writes becomes this clone's own copy, and the file never changes. Low
/// memory (the guest program, 64 KiB or 1 MiB) is copied; the vCPU states come from the
/// manifest.
///
/// No userfaultfd: the kernel's page cache already loads the file lazily and shares it, so a
/// fault path would only add a round trip. (A memfd with MINOR + CONTINUE would share pages
/// only between the mappings of one memfd, i.e. clones inside one process or handed the fd,
/// and needs the whole memory copied into it first.) The price is that no page can be
/// checked when it is first read, so every chunk's CRC32C is checked before the file is
/// mapped: a corrupt or truncated snapshot is refused before the guest exists. The file must
/// not change while clones run (a page no clone has written reads the file as it is then).
public final class SnapshotClone: @unchecked Sendable {
    public let vm: MigratableVM
    public let layout: MachineLayout
    public private(set) var report: CloneReport
    /// The command's start, which the report's times count from.
    private let started: UInt64
    private var runningSince: UInt64 = 0

    /// Opens and checks the snapshot in `folder` (manifest, size, every chunk), maps its RAM,
    /// copies low memory and loads the vCPU states. The vCPUs do not run until ``start()``.
    public init(folder: String, started: UInt64) throws {
        self.started = started
        let prepared = try Self.prepare(folder: folder)
        layout = prepared.layout
        report = CloneReport(snapshot: folder, vcpus: layout.vcpus, memoryBytes: layout.ramSize,
                             snapshotDataPages: prepared.manifest.dataPages)
        report.chunksChecked = prepared.manifest.chunkCount
        report.verifySeconds = prepared.verifySeconds
        vm = try MigratableVM(layout: layout, backing: .privateFile, ram: prepared.ram)
        report.ramAddress = "0x" + String(UInt(bitPattern: vm.ram.base), radix: 16)
        prepared.low.withUnsafeBytes { vm.low.base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        report.lowPagesCopied = layout.lowPages
        for vcpu in prepared.manifest.vcpus { try vm.loadVcpuState(vcpu.id, blob: vcpu.state) }
    }

    private struct Prepared {
        let manifest: SnapshotManifest
        let layout: MachineLayout
        let low: [UInt8]
        let ram: GuestMemoryRegion
        let verifySeconds: Double
    }

    /// Everything read from the snapshot. The snapshot's own read-only mapping, through which
    /// the chunks were checked, is unmapped on return (only the memory file stays open, held
    /// by the RAM region), so the clone maps each page once.
    private static func prepare(folder: String) throws -> Prepared {
        let snapshot = try Snapshot(folder: folder)
        let manifest = snapshot.manifest
        let t0 = MonotonicClock.nanoseconds()
        snapshot.memory.adviseWillNeed(offset: 0, length: snapshot.memory.size)
        try snapshot.checkPages(0..<manifest.totalPages)  // the first corrupt chunk throws
        let verifySeconds = Double(MonotonicClock.nanoseconds() - t0) / 1e9
        let low = [UInt8](UnsafeRawBufferPointer(start: snapshot.pagePointer(0), count: Int(manifest.lowSize)))
        let ram = try GuestMemoryRegion(privateMappingOf: snapshot.memory.file, offset: manifest.lowSize,
                                        size: manifest.ramSize, label: "clone of \(folder)")
        return Prepared(manifest: manifest, layout: snapshot.layout, low: low, ram: ram, verifySeconds: verifySeconds)
    }

    /// Starts every vCPU where the snapshot left it.
    public func start() throws {
        runningSince = MonotonicClock.nanoseconds()
        report.firstInstructionMilliseconds = Double(runningSince &- started) / 1e6
        try vm.start()
    }

    /// Waits until every vCPU has completed `passes` passes since the start (two: every page
    /// was visited once whole, whatever pass the snapshot caught), a vCPU failed, or
    /// `timeoutSeconds` passed. True when the passes were reached.
    public func waitForPasses(_ passes: UInt64, timeoutSeconds: Double) -> Bool {
        let deadline = MonotonicClock.nanoseconds() + UInt64(timeoutSeconds * 1e9)
        while true {
            if (0..<layout.vcpus).allSatisfy({ vm.counters.passes(of: $0) >= passes }) { return true }
            if vm.error != nil || MonotonicClock.nanoseconds() >= deadline { return false }
            MonotonicClock.sleep(nanoseconds: 2_000_000)  // the counters are polled: the guest signals nothing else
        }
    }

    /// Stops the vCPUs at an instruction boundary (they can be resumed or stopped) and
    /// updates the report, memory included: nothing the guest does changes it meanwhile.
    public func pause() throws {
        vm.pause()
        try update()
    }

    /// Stops and joins the vCPUs; the report is final. The guest's memory stays mapped
    /// until the clone is released.
    @discardableResult
    public func stop() throws -> CloneReport {
        report.vcpuError = vm.stop()
        try update()
        return report
    }

    private func update() throws {
        report.runSeconds = Double(MonotonicClock.nanoseconds() &- runningSince) / 1e9
        let passes = (0..<layout.vcpus).map { vm.counters.passes(of: $0) }
        report.passesAfterRestore = passes.reduce(0, +)
        report.fewestVcpuPasses = passes.min() ?? 0
        report.guestMismatches = vm.counters.mismatches.load(ordering: .relaxed)
        report.firstMismatch = vm.counters.firstMismatch
        if report.vcpuError == nil { report.vcpuError = vm.error }
        report.guestCheck = report.guestMismatches == 0 && report.vcpuError == nil
        report.ram = try ProcessMemory.mapping(startingAt: UInt(bitPattern: vm.ram.base))
        report.process = try ProcessMemory.total()
    }
}
