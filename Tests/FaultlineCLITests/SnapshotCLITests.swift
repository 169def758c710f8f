import FaultlineTestSupport
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `run --snapshot-to`, `snapshot verify` and `restore` end to end on the real kernel: a
/// running guest is snapshotted, checked, and restored lazily in every fault mode this kernel
/// allows and eagerly; the restored guest's memory digest is read back from its memory and
/// its own check stays green. Bad snapshots are refused with a clear error.
@Suite("Snapshot and restore (CLI)", .serialized, .gate(.snapshotAndRestore))
struct SnapshotCLITests {
    /// One snapshot of a running selfcheck guest, shared by the tests of this suite.
    static let folder: String = {
        let path = NSTemporaryDirectory() + "faultline-cli-snapshot-\(getpid())"
        _ = try? run(["run", "--vcpus", "2", "--memory", "16M", "--workload", "selfcheck", "--snapshot-to", path,
                      "--snapshot-after", "0.5", "--json"], timeout: 120)
        return path
    }()

    /// A dirtier that rewrites 64 pages per vCPU over prefilled RAM: nearly every page of the
    /// restored guest still holds the snapshot's bytes, so the digest is read from its memory.
    static let quietFolder: String = {
        let path = NSTemporaryDirectory() + "faultline-cli-snapshot-quiet-\(getpid())"
        _ = try? run(["run", "--vcpus", "2", "--memory", "16M", "--workload", "dirtier", "--working-set", "64", "--prefill",
                      "--snapshot-to", path, "--snapshot-after", "0.5", "--json"], timeout: 120)
        return path
    }()

    func copyOfSnapshot(_ name: String) throws -> String {
        let copy = Self.folder + "-" + name
        try? FileManager.default.removeItem(atPath: copy)
        try FileManager.default.copyItem(atPath: Self.folder, toPath: copy)
        return copy
    }

    @Test("run --snapshot-to writes a snapshot that verifies", .timeLimit(.minutes(2)))
    func snapshotVerifies() throws {
        let r = try run(["snapshot", "verify", Self.folder, "--json"], timeout: 60)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect(j?["outcome"] as? String == "verified")
        #expect((j?["pages"] as? Int ?? 0) == 16 + 4096, "low memory and RAM")
    }

    @Test("lazy restore in every fault mode this kernel offers", .timeLimit(.minutes(4)))
    func lazyRestoreInEveryMode() throws {
        let probe = try run(["probe", "--json"], timeout: 60)
        let modes = (lastJSON(probe.stdout)?["modes"] as? [String: Bool]) ?? [:]
        var ran = 0
        for mode in ["vcpu-exit", "uffd-missing", "uffd-minor"] where modes[mode + " (kvm)"] == true {
            let r = try run(["restore", Self.folder, "--lazy", "--fault-mode", mode, "--run-after", "0.3", "--json"], timeout: 120)
            #expect(r.status == 0, "\(mode): \(r.stdout)\n\(r.stderr)")
            let j = lastJSON(r.stdout)
            #expect(j?["mode"] as? String == "lazy")
            #expect(j?["fault_mode"] as? String == mode)
            #expect(j?["digest_match"] as? Bool == true, "\(mode): \(r.stdout)")
            #expect(j?["guest_check"] as? Bool == true)
            #expect((j?["passes_after_restore"] as? Int ?? 0) > 0, "\(mode): the restored guest ran")
            #expect((j?["digest_pages_from_memory"] as? Int ?? 0) > 0, "the digest was read from the restored memory")
            #expect((j?["pages_before_start"] as? Int ?? -1) < 100, "\(mode): lazy starts before RAM is in")
            let q = try run(["restore", Self.quietFolder, "--lazy", "--fault-mode", mode, "--run-after", "0.3", "--json"], timeout: 120)
            let qj = lastJSON(q.stdout)
            #expect(q.status == 0 && qj?["digest_match"] as? Bool == true, "\(mode): \(q.stdout)\n\(q.stderr)")
            // All but the 2 x 64 pages the guest rewrites (and may have rewritten since) come from memory.
            #expect((qj?["digest_pages_from_memory"] as? Int ?? 0) >= 16 + 4096 - 128, "\(mode): \(q.stdout)")
            // The demand path itself, forced: recording holds the background fill back, so every
            // page the guest touches in that second is a fault served from the file.
            let setFile = Self.folder + "-set-\(mode).json"
            defer { try? FileManager.default.removeItem(atPath: setFile) }
            let f = try run(["restore", Self.folder, "--lazy", "--fault-mode", mode, "--record-working-set", setFile,
                             "--record-seconds", "1", "--run-after", "0.3", "--json"], timeout: 120)
            let fj = lastJSON(f.stdout)
            #expect(f.status == 0 && fj?["digest_match"] as? Bool == true, "\(mode): \(f.stdout)\n\(f.stderr)")
            #expect((fj?["faults"] as? Int ?? 0) > 0 && (fj?["demand_pages"] as? Int ?? 0) > 0, "\(mode): \(f.stdout)")
            let recorded = try? JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: setFile))) as? [String: Any]
            #expect(((recorded?["pages"] as? [Int])?.count ?? 0) > 0, "\(mode): a working set was recorded")
            ran += 1
        }
        #expect(ran > 0, "no fault mode available: \(probe.stdout)")
    }

    @Test("eager restore checks and copies everything before the start", .timeLimit(.minutes(2)))
    func eagerRestore() throws {
        let r = try run(["restore", Self.folder, "--eager", "--run-after", "0.3", "--json"], timeout: 120)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        let j = lastJSON(r.stdout)
        #expect(j?["mode"] as? String == "eager")
        #expect(j?["digest_match"] as? Bool == true)
        #expect(j?["pages_before_start"] as? Int == 16 + 4096)
        #expect(j?["verify_seconds"] is Double)
    }

    @Test("a truncated, corrupt or foreign snapshot is refused with a clear error", .timeLimit(.minutes(4)))
    func badSnapshotsAreRefused() throws {
        let truncated = try copyOfSnapshot("truncated")
        #expect(truncate(truncated + "/memory.bin", 4096 * 100) == 0)
        let foreign = try copyOfSnapshot("foreign")
        try Data(#"{"format":"other","version":1}"#.utf8).write(to: URL(fileURLWithPath: foreign + "/manifest.json"))
        let corrupt = try copyOfSnapshot("corrupt")
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: corrupt + "/memory.bin"))
        try handle.seek(toOffset: 4096 * 3000 + 11)
        try handle.write(contentsOf: Data([0xEE, 0xEE]))
        try handle.close()
        defer { for f in [truncated, foreign, corrupt] { try? FileManager.default.removeItem(atPath: f) } }

        for (folder, expected) in [(truncated, "truncated"), (foreign, "not a snapshot manifest"), (corrupt, "corrupt")] {
            let v = try run(["snapshot", "verify", folder], timeout: 60)
            #expect(v.status == 2, "\(folder): \(v.stdout)")
            #expect(v.stderr.contains(expected), "\(v.stderr)")
            let e = try run(["restore", folder, "--eager", "--json"], timeout: 60)
            #expect(e.status == 2 && e.stderr.contains(expected), "eager \(folder): \(e.stderr)")
            #expect(!e.stdout.contains("restore complete") && lastJSON(e.stdout)?["outcome"] as? String == "failed")
        }
        // Lazy: the corrupt chunk is found before any of its pages is installed; the restore fails.
        let l = try run(["restore", corrupt, "--lazy", "--fault-mode", "uffd-missing", "--json"], timeout: 120)
        #expect(l.status != 0)
        #expect(l.stderr.contains("snapshot memory is corrupt"), "\(l.stderr)")
        #expect(lastJSON(l.stdout)?["digest_match"] == nil, "no restore completed")
    }

    @Test("--snapshot-to and --migrate-to together are refused")
    func snapshotAndMigrateRefused() throws {
        let r = try run(["run", "--memory", "16M", "--snapshot-to", "/tmp/x", "--migrate-to", "127.0.0.1:1"], timeout: 60)
        #expect(r.status == 2 && r.stderr.contains("cannot be combined"), "\(r.stderr)")
    }
}
