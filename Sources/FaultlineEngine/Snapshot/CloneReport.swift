import FaultlineCore
import FaultlineLinux

/// What a clone restore did, as one Codable value (the JSON and the text report). Times count
/// from the command's start. There is no memory digest: once the guest runs it writes, and
/// a digest of the snapshot's memory would read all of it again. What is checked is said in
/// ``checked``: every chunk's CRC32C before the file is mapped, and the guest's own check of
/// every page it reads while it runs.
public struct CloneReport: Sendable, Codable, Equatable {
    public var side = "restore"
    public var mode = "clone"
    public var snapshot: String
    public var vcpus: Int
    public var memoryBytes: UInt64
    public var snapshotDataPages: Int
    /// What the clone's RAM is: the snapshot's memory file mapped private at RAM's offset.
    public var ramBacking = MemoryBacking.privateFile.rawValue
    /// Host address of the RAM mapping (its entry in /proc/PID/smaps starts there).
    public var ramAddress: String = ""
    public var checked = "every chunk's CRC32C before the file was mapped; the guest's own check of every page it reads"
    public var chunksChecked = 0
    /// Time to check every chunk (reading the whole memory file once, through the page cache).
    public var verifySeconds = 0.0
    /// Low memory pages copied out of the snapshot (RAM is mapped, never copied).
    public var lowPagesCopied = 0
    public var firstInstructionMilliseconds = 0.0
    public var runSeconds = 0.0
    /// Progress exits after the restore, summed over vCPUs, and the fewest of any vCPU.
    public var passesAfterRestore: UInt64 = 0
    public var fewestVcpuPasses: UInt64 = 0
    public var guestCheck = false
    public var guestMismatches = 0
    public var firstMismatch: String?
    public var vcpuError: String?
    /// The RAM mapping as smaps counts it when the guest was stopped (or paused): `anonymous`
    /// is what the clone has written (its own copies), the rest is the file's shared pages.
    public var ram = MemoryUsage()
    /// The whole process, from smaps_rollup, at the same moment.
    public var process = MemoryUsage()

    enum CodingKeys: String, CodingKey {
        case side, mode, snapshot, vcpus, memoryBytes = "memory_bytes", snapshotDataPages = "snapshot_data_pages"
        case ramBacking = "ram_backing", ramAddress = "ram_address", checked, chunksChecked = "chunks_checked"
        case verifySeconds = "verify_seconds", lowPagesCopied = "low_pages_copied"
        case firstInstructionMilliseconds = "first_instruction_ms", runSeconds = "run_seconds"
        case passesAfterRestore = "passes_after_restore", fewestVcpuPasses = "fewest_vcpu_passes"
        case guestCheck = "guest_check", guestMismatches = "guest_mismatches", firstMismatch = "first_mismatch"
        case vcpuError = "vcpu_error", ram, process
    }

    public init(snapshot: String, vcpus: Int, memoryBytes: UInt64, snapshotDataPages: Int) {
        self.snapshot = snapshot
        self.vcpus = vcpus
        self.memoryBytes = memoryBytes
        self.snapshotDataPages = snapshotDataPages
    }

    /// The text report.
    public var text: String {
        func mib(_ kib: UInt64) -> String { "\((Double(kib) / 1024 * 10).rounded() / 10) MiB" }
        return [
            "restore complete (clone): \(vcpus) vCPU(s), \(memoryBytes >> 20) MiB from \(snapshot), RAM mapped private from the memory file",
            "  snapshot checked         \(chunksChecked) chunks' CRC32C in \((verifySeconds * 1e6).rounded() / 1e3) ms, before mapping",
            "  first guest instruction  \((firstInstructionMilliseconds * 1e3).rounded() / 1e3) ms after the start "
                + "(\(lowPagesCopied) low-memory pages copied, RAM not copied)",
            "  guest check              \(guestCheck ? "green" : "RED: \(guestMismatches) mismatches, first: \(firstMismatch ?? vcpuError ?? "?")"), "
                + "\(passesAfterRestore) passes after the restore (fewest on one vCPU: \(fewestVcpuPasses)) in \((runSeconds * 1e3).rounded() / 1e3) s",
            "  guest RAM                \(mib(ram.rss)) resident, \(mib(ram.anonymous)) written (own copies), Pss \(mib(ram.pss))",
            "  process                  Rss \(mib(process.rss)), Pss \(mib(process.pss))",
        ].joined(separator: "\n")
    }
}
