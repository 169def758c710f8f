import ArgumentParser
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation

/// `faultline bench clones`: K clone restores of one snapshot (`restore --clone`), each its own
/// process, each running its guest until every vCPU has done `--passes` passes (by then a
/// readmostly guest has read every page and written its working set), then holding paused
/// while their memory is measured together: the sum of Pss over the K processes (a page
/// shared by n processes counts 1/n in each, so every page counts once), against the target
/// 1.1 x (snapshot RAM + K x written). A page every clone has written is still in the page
/// cache though no clone maps it (Pss does not see it), so the target is judged on the sum of
/// Pss plus the memory file's page cache that no clone maps. The plain sum of Pss, the naive
/// sum of Rss (shared pages counted in every clone) and the file's page cache are reported too.
struct BenchClones: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clones",
        abstract: "Resident memory of K clone restores of one snapshot, as separate processes (sum of Pss).")

    @Option(help: "The snapshot folder; its guest must have written all of its RAM (e.g. `run --workload readmostly --working-set N --snapshot-to DIR`)")
    var snapshot: String
    @Option(help: "Number of clones") var count = 8
    @Option(name: .customLong("write-mib"), help: "MiB each clone's guest writes (the snapshot's working set x vCPUs): measured in each clone, it must match")
    var writeMiB = 16.0
    @Option(help: "Passes every vCPU of every clone completes before the measurement (2: every page read whole once, the working set written)")
    var passes: UInt64 = 2
    @Option(help: "Measurements (separate sets of clones); median and worst are reported") var runs = 1
    @Option(help: "Seconds one measurement may take") var timeout = 900.0
    @Flag(help: "One JSON line per measurement and a JSON summary") var json = false

    struct Measurement: Codable {
        var run: Int
        var clones: Int
        var totalPssMiB = 0.0
        /// `totalPssMiB` plus the memory file's page cache no clone maps: what the target is judged on.
        var residentMiB = 0.0
        var rssSumMiB = 0.0
        var ramPssMiB = 0.0
        var writtenMiBPerClone: [Double] = []
        var pageCacheMiB = 0.0
        var unmappedCacheMiB = 0.0
        var targetMiB = 0.0
        var met = false
        var guestChecks = false
        var passesPerClone: [Int] = []
        var firstInstructionMs: [Double] = []
        var verifyMs: [Double] = []
        var wrong: String?

        enum CodingKeys: String, CodingKey {
            case run, clones, totalPssMiB = "total_pss_mib", residentMiB = "resident_mib", rssSumMiB = "rss_sum_mib", ramPssMiB = "guest_ram_pss_mib"
            case writtenMiBPerClone = "written_mib_per_clone", pageCacheMiB = "page_cache_mib", unmappedCacheMiB = "unmapped_page_cache_mib", targetMiB = "target_mib", met
            case guestChecks = "guest_checks_green", passesPerClone = "passes_per_clone"
            case firstInstructionMs = "first_instruction_ms", verifyMs = "verify_ms", wrong
        }
    }

    func run() {
        do {
            if try !measureAll() { Foundation.exit(1) }
        } catch {
            fail(error)
        }
    }

    /// Every measurement and the summary, printed; whether every one met the target.
    func measureAll() throws -> Bool {
        guard count >= 1, runs >= 1, passes >= 1, writeMiB >= 0 else {
            throw CLIError(description: "bench clones: --count, --runs and --passes must be at least 1, --write-mib not negative")
        }
        let opened = try Snapshot(folder: snapshot)
        let layout = opened.layout
        let ramData = UnsafeMutablePointer<UInt8>.allocate(capacity: layout.ramPages)
        defer { ramData.deallocate() }
        try opened.ramDataMap(into: ramData)
        let dataPages = (0..<layout.ramPages).reduce(0) { $0 + Int(ramData[$1] & 1) }
        guard dataPages == layout.ramPages else {
            throw CLIError(description: "bench clones: \(layout.ramPages - dataPages) of the snapshot's \(layout.ramPages) RAM pages are zero "
                           + "(never written): its guest had not filled its memory, so the clones would; take the snapshot later")
        }
        let memoryFile = opened.memory
        let ramMiB = Double(layout.ramSize) / 1048576
        let target = 1.1 * (ramMiB + Double(count) * writeMiB)
        if !json {
            print("bench clones: \(count) clones of \(snapshot) (\(Int(ramMiB)) MiB RAM, \(layout.vcpus) vCPUs), \(writeMiB) MiB written by each; "
                  + "target: together at most 1.1 x (\(Int(ramMiB)) + \(count) x \(writeMiB)) = \(format(target)) MiB")
        }
        var results: [Measurement] = []
        for r in 1...runs {
            var m = try measure(run: r, memoryFile: memoryFile)
            m.targetMiB = target
            m.met = m.wrong == nil && m.residentMiB <= target
            results.append(m)
            print(json ? try jsonLine(Merged(m, BenchName(bench: "clones"))) : text(m))
            fflush(stdout)
        }
        let resident = results.map(\.residentMiB).sorted(), pss = results.map(\.totalPssMiB).sorted()
        let rss = results.map(\.rssSumMiB).sorted()
        let wrong = results.compactMap(\.wrong)
        let met = wrong.isEmpty && resident.last! <= target
        if json {
            print(try jsonLine(Summary(runs: runs, clones: count, ramMiB: ramMiB, writeMiB: writeMiB, targetMiB: target,
                                       residentMedianMiB: median(resident), residentWorstMiB: resident.last!,
                                       totalPssMedianMiB: median(pss), totalPssWorstMiB: pss.last!, rssSumMedianMiB: median(rss),
                                       met: met, wrong: wrong)))
        } else {
            print("summary over \(runs) measurement(s): resident median \(format(median(resident))) MiB, worst \(format(resident.last!)) MiB; "
                  + "sum of Pss median \(format(median(pss))) MiB, worst \(format(pss.last!)) MiB; "
                  + "Rss sum median \(format(median(rss))) MiB; target \(format(target)) MiB: \(met ? "met" : "NOT met")")
        }
        return met
    }

    struct Summary: Codable {
        var bench = "clones"
        var runs: Int
        var clones: Int
        var ramMiB: Double
        var writeMiB: Double
        var targetMiB: Double
        var residentMedianMiB: Double
        var residentWorstMiB: Double
        var totalPssMedianMiB: Double
        var totalPssWorstMiB: Double
        var rssSumMedianMiB: Double
        var met: Bool
        var wrong: [String]

        enum CodingKeys: String, CodingKey {
            case bench, runs, clones, ramMiB = "ram_mib", writeMiB = "write_mib", targetMiB = "target_mib"
            case residentMedianMiB = "resident_median_mib", residentWorstMiB = "resident_worst_mib"
            case totalPssMedianMiB = "total_pss_median_mib", totalPssWorstMiB = "total_pss_worst_mib"
            case rssSumMedianMiB = "rss_sum_median_mib", met, wrong
        }
    }

    /// One set of K clones: started together, measured while all hold, then released.
    func measure(run: Int, memoryFile: MappedFile) throws -> Measurement {
        var m = Measurement(run: run, clones: count)
        let binary = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        let logs = NSTemporaryDirectory() + "faultline-bench-clones-\(getpid())-\(run)"
        try FileSystem.makeDirectory(logs)
        defer { try? FileManager.default.removeItem(atPath: logs) }
        let arguments = [binary, "restore", snapshot, "--clone", "--passes", String(passes),
                         "--passes-timeout", String(timeout), "--hold", "--json"]
        var clones: [CloneProcess] = []
        defer { for c in clones { c.kill() } }
        for i in 0..<count { clones.append(try CloneProcess(arguments: arguments, stderrPath: "\(logs)/clone-\(i).stderr")) }
        let deadline = MonotonicClock.deadline(after: timeout)
        let holding = CloneProcess.pump(clones, until: { $0.json(outcome: "holding") != nil }, deadline: deadline)
        guard holding else {
            let failed = clones.first { $0.json(outcome: "holding") == nil }!
            m.wrong = "clone \(failed.pid) did not reach its hold: " + tail(failed.standardError + failed.lines.joined(separator: "\n"))
            return m
        }
        // Every clone is paused now: nothing changes while they are measured.
        var total = MemoryUsage(), ram = MemoryUsage()
        for c in clones {
            let hold = c.json(outcome: "holding")!
            guard let address = (hold["ram_address"] as? String).flatMap({ UInt($0.dropFirst(2), radix: 16) }) else {
                m.wrong = "clone \(c.pid) did not say where its RAM is mapped"
                return m
            }
            let mine = try ProcessMemory.mapping(startingAt: address, pid: c.pid)
            total = total + (try ProcessMemory.total(pid: c.pid))
            ram = ram + mine
            m.writtenMiBPerClone.append(Double(mine.anonymous) / 1024)
            m.firstInstructionMs.append(hold["first_instruction_ms"] as? Double ?? 0)
            m.verifyMs.append((hold["verify_seconds"] as? Double ?? 0) * 1000)
        }
        m.totalPssMiB = Double(total.pss) / 1024
        m.rssSumMiB = Double(total.rss) / 1024
        m.ramPssMiB = Double(ram.pss) / 1024
        m.pageCacheMiB = Double(try memoryFile.cachedPages()) * 4096 / 1048576
        // The clones' RAM mappings map file pages worth (Pss - anonymous) together; the rest of
        // the file's cache (low memory, pages every clone has replaced by its own copy) is no one's.
        let mappedFileMiB = Double(ram.pss - min(ram.pss, ram.anonymous)) / 1024
        m.unmappedCacheMiB = max(0, m.pageCacheMiB - mappedFileMiB)
        m.residentMiB = m.totalPssMiB + m.unmappedCacheMiB
        for c in clones { c.release() }
        let finished = CloneProcess.pump(clones, until: { $0.output < 0 }, deadline: MonotonicClock.deadline(after: 120))
        var problems: [String] = []
        if !finished { problems.append("a clone did not stop after its hold") }
        for c in clones {
            let status = c.reap()
            let report = c.json()
            m.passesPerClone.append(report?["passes_after_restore"] as? Int ?? 0)
            if status != 0 || report?["guest_check"] as? Bool != true {
                problems.append("clone \(c.pid) exited \(status), guest check \(report?["guest_check"] ?? "missing"): " + tail(c.standardError))
            }
        }
        m.guestChecks = problems.isEmpty
        let off = m.writtenMiBPerClone.filter { abs($0 - writeMiB) > max(writeMiB * 0.01, 0.1) }
        if !off.isEmpty {
            problems.append("clones wrote \(off.map(format)) MiB, not --write-mib \(writeMiB): the target would not describe them")
        }
        m.wrong = problems.isEmpty ? nil : problems.joined(separator: "; ")
        return m
    }

    func text(_ m: Measurement) -> String {
        let written = m.writtenMiBPerClone
        let writtenText = written.min() == written.max() ? "\(format(written.first ?? 0)) MiB"
                                                         : "\(format(written.min() ?? 0))-\(format(written.max() ?? 0)) MiB"
        let first = m.firstInstructionMs.sorted()
        return "run \(m.run): \(m.clones) clones, each wrote \(writtenText): resident together \(format(m.residentMiB)) MiB "
            + "(target \(format(m.targetMiB)) MiB: \(m.met ? "met" : "NOT met")) = sum of Pss \(format(m.totalPssMiB)) MiB "
            + "(guest RAM \(format(m.ramPssMiB)) MiB, the rest the processes themselves) + \(format(m.unmappedCacheMiB)) MiB of "
            + "the memory file's page cache no clone maps; page cache of the memory file \(format(m.pageCacheMiB)) MiB; "
            + "Rss sum \(format(m.rssSumMiB)) MiB; "
            + "guest checks \(m.guestChecks ? "green" : "RED"); first instruction median \(format(median(first))) ms, "
            + "max \(format(first.last ?? 0)) ms" + (m.wrong.map { " - WRONG: \($0)" } ?? "")
    }

    private func tail(_ text: String) -> String { text.split(separator: "\n").suffix(5).joined(separator: " | ") }
}

private func median(_ sorted: [Double]) -> Double {
    guard !sorted.isEmpty else { return 0 }
    let n = sorted.count
    return n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2
}

private func format(_ v: Double) -> String { fmt(v, 1) }

/// The key naming the benchmark on each `bench clones --json` measurement line.
struct BenchName: Codable, Sendable, Equatable {
    var bench: String
}
