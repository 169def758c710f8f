import FaultlineTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `restore --clone` and `bench clones` end to end: clones of a running guest's snapshot run
/// with their RAM mapped private from the memory file, their guests' checks stay green and the
/// file is unchanged; bad snapshots and contradictory options are refused; the benchmark
/// measures two clones and checks what they wrote.
@Suite("Clones (CLI)", .serialized, .gate(.clonesCLI))
struct CloneCLITests {
    /// A 16 MiB, 2-vCPU snapshot written by `run` with `extra` options, `after` seconds into
    /// the run (left in the temporary folder, as the snapshot suite's is).
    static func snapshot(_ name: String, _ extra: [String], after: String = "1.5") -> String {
        let path = NSTemporaryDirectory() + "faultline-cli-clone-\(name)-\(getpid())"
        _ = try? run(["run", "--vcpus", "2", "--memory", "16M", "--snapshot-to", path, "--snapshot-after", after, "--json"] + extra,
                     timeout: 120)
        return path
    }

    static let selfcheck = snapshot("selfcheck", ["--workload", "selfcheck"], after: "0.5")
    /// Reads all 16 MiB, writes 128 pages per vCPU: 1 MiB per clone.
    static let readmostly = snapshot("readmostly", ["--workload", "readmostly", "--working-set", "128"])

    func copy(_ folder: String, as name: String) throws -> String {
        let copy = folder + "-" + name
        try? FileManager.default.removeItem(atPath: copy)
        try FileManager.default.copyItem(atPath: folder, toPath: copy)
        return copy
    }

    @Test("restore --clone runs the guest on the memory file mapped private; the file is unchanged", .timeLimit(.minutes(2)))
    func cloneRunsAndLeavesTheFile() throws {
        let r = try run(["restore", Self.selfcheck, "--clone", "--passes", "2", "--json"], timeout: 60)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect(j?["mode"] as? String == "clone" && j?["ram_backing"] as? String == "private-file")
        #expect(j?["guest_check"] as? Bool == true)
        #expect((j?["fewest_vcpu_passes"] as? Int ?? 0) >= 2, "every vCPU ran two passes")
        #expect((j?["ram"] as? [String: Any])?["anonymous_kib"] as? Int == 16 << 10, "selfcheck writes every page: its own copies")
        #expect((j?["chunks_checked"] as? Int ?? 0) == 65 && j?["verify_seconds"] is Double)
        let text = try run(["restore", Self.selfcheck, "--clone", "--run-after", "0.3"], timeout: 60)
        #expect(text.status == 0 && text.stdout.contains("restore complete (clone)") && text.stdout.contains("guest check              green"),
                "\(text.stdout)\n\(text.stderr)")
        let v = try run(["snapshot", "verify", Self.selfcheck], timeout: 60)
        #expect(v.status == 0, "the memory file still matches its checksums and digest: \(v.stdout)\n\(v.stderr)")
    }

    @Test("a truncated or corrupt snapshot, or contradictory options, are refused", .timeLimit(.minutes(2)))
    func badInputIsRefused() throws {
        let truncated = try copy(Self.selfcheck, as: "truncated")
        #expect(truncate(truncated + "/memory.bin", 4096 * 100) == 0)
        let corrupt = try copy(Self.selfcheck, as: "corrupt")
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: corrupt + "/memory.bin"))
        try handle.seek(toOffset: 4096 * 4000 + 5)
        try handle.write(contentsOf: Data([0xEE]))
        try handle.close()
        defer { for f in [truncated, corrupt] { try? FileManager.default.removeItem(atPath: f) } }
        for (folder, expected) in [(truncated, "truncated"), (corrupt, "snapshot memory is corrupt: chunk 62")] {
            let r = try run(["restore", folder, "--clone", "--json"], timeout: 60)
            #expect(r.status == 2 && r.stderr.contains(expected), "\(folder): \(r.stderr)")
            #expect(lastJSON(r.stdout)?["outcome"] as? String == "failed" && !r.stdout.contains("guest_check"))
        }
        for (arguments, expected) in [(["--clone", "--eager"], "cannot be combined with --eager"),
                                      (["--clone", "--fault-mode", "uffd-missing"], "--fault-mode does not apply"),
                                      (["--passes", "2"], "need --clone")] {
            let r = try run(["restore", Self.selfcheck] + arguments, timeout: 60)
            #expect(r.status == 2 && r.stderr.contains(expected), "\(arguments): \(r.stderr)")
        }
    }

    @Test("bench clones measures two clones and checks what each wrote", .timeLimit(.minutes(3)))
    func benchMeasuresClones() throws {
        let r = try run(["bench", "clones", "--snapshot", Self.readmostly, "--count", "2", "--write-mib", "1", "--json"], timeout: 120)
        let lines = r.stdout.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        let measurement = lines.first { $0["run"] != nil }, summary = lines.last
        #expect(measurement?["written_mib_per_clone"] as? [Double] == [1, 1])
        #expect(measurement?["guest_checks_green"] as? Bool == true, "\(r.stdout)\n\(r.stderr)")
        // Guest RAM: the 15 MiB neither clone wrote counted once, plus each clone's own 1 MiB.
        let ramPss = measurement?["guest_ram_pss_mib"] as? Double ?? 0
        #expect(abs(ramPss - 17) < 0.25, "\(ramPss)")
        let pss = measurement?["total_pss_mib"] as? Double ?? 0, rss = measurement?["rss_sum_mib"] as? Double ?? 0
        #expect(pss > ramPss && rss > 2 * 16, "Rss counts the shared 15 MiB in each clone: \(pss) vs \(rss)")
        #expect(measurement?["unmapped_page_cache_mib"] as? Double ?? 0 >= 1, "the pages both clones replaced stay cached")
        // At 16 MiB the processes' own few MiB are more than the 10 % margin: the verdict must follow the numbers.
        let resident = measurement?["resident_mib"] as? Double ?? 0, target = summary?["target_mib"] as? Double ?? 0
        #expect(target == 1.1 * 18 && summary?["clones"] as? Int == 2)
        #expect(summary?["met"] as? Bool == (resident <= target) && r.status == (resident <= target ? 0 : 1), "\(r.stdout)\n\(r.stderr)")

        let wrong = try run(["bench", "clones", "--snapshot", Self.readmostly, "--count", "2", "--write-mib", "4"], timeout: 120)
        #expect(wrong.status == 1 && wrong.stdout.contains("not --write-mib 4"), "\(wrong.stdout)\n\(wrong.stderr)")
        let unfilled = Self.snapshot("dirtier", ["--workload", "dirtier", "--working-set", "16"], after: "0.3")
        defer { try? FileManager.default.removeItem(atPath: unfilled) }
        let refused = try run(["bench", "clones", "--snapshot", unfilled, "--count", "2"], timeout: 60)
        #expect(refused.status == 2 && refused.stderr.contains("zero (never written)"), "\(refused.stderr)")
    }
}
