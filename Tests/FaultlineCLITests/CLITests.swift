import FaultlineTestSupport
import Foundation
import Testing

@Suite("faultline CLI", .serialized)
struct CLITests {
    @Test(arguments: [
        (["--vcpus", "0"], "--vcpus must be at least 1"),
        (["--vcpus", "64", "--mem-per-vcpu", "64"], "does not fit the guest's address range"),
        (["--mem-per-vcpu", "0"], "--mem-per-vcpu must be at least 1"),
        (["--mode", "uffd-missing", "--backing", "guest-memfd"], "cannot register a guest_memfd"),
        (["--mode", "vcpu-exit", "--backing", "guest-memfd"], "no guest_memfd mmap"),
        (["--mode", "uffd-minor", "--backing", "anonymous"], "page cache"),
        (["--pattern", "zigzag"], "unknown --pattern"),
        (["--readers", "0"], "--readers"),
    ])
    func badInputIsRefusedClearly(args: [String], message: String) throws {
        let r = try run(["bench", "demand-paging", "--backend", "soft"] + args)
        #expect(r.status == 2, "\(args): exit \(r.status)")
        #expect(r.stderr.contains(message), "\(args): \(r.stderr)")
        #expect(!r.stderr.contains("Fatal error"))
    }

    @Test func unknownModeIsAUsageError() throws {
        let r = try run(["bench", "demand-paging", "--mode", "telepathy"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("telepathy"))
    }

    @Test(.gate(.hugetlbRefusedWithoutReservedPages))
    func hugetlbWithoutReservedPages() throws {
        let r = try run(["bench", "demand-paging", "--backend", "soft", "--mode", "uffd-missing", "--backing", "hugetlb",
                         "--mem-per-vcpu", "2"])
        #expect(r.status == 2)
        #expect(r.stderr.contains("huge pages"), "\(r.stderr)")
    }

    /// With reserved 2 MiB pages (root reserves a few for the test and gives them back),
    /// hugetlb backing works in every mode that can use it; MINOR writes through an alias mapping.
    @Test(.gate(.hugetlbWithReservedPages))
    func hugetlbWithReservedPages() throws {
        let path = "/proc/sys/vm/nr_hugepages"
        let before = (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
        try "\(before + 8)\n".write(toFile: path, atomically: false, encoding: .utf8)
        defer { try? "\(before)\n".write(toFile: path, atomically: false, encoding: .utf8) }
        let reserved = (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
        try #require(reserved >= before + 8, "the kernel reserved \(reserved - before) of 8 huge pages (memory too fragmented?)")
        for mode in ["prefilled", "uffd-missing", "uffd-minor"] {
            let r = try run(["bench", "demand-paging", "--mode", mode, "--backing", "hugetlb", "--vcpus", "2", "--mem-per-vcpu", "4"])
            #expect(r.status == 0, "\(mode): \(r.stderr)")
            #expect(r.stdout.contains("Verification: OK - 2048 pages checked, 0 bad"), "\(mode)")
            if mode != "prefilled" { #expect(r.stdout.contains("; 4 resolved"), "\(mode): one fault per 2 MiB page") }
        }
    }

    @Test(.gate(.softBackendCLI))
    func softBackendRunsAndSaysSo() throws {
        let r = try run(["bench", "demand-paging", "--backend", "soft", "--mode", "uffd-missing", "--vcpus", "2",
                         "--mem-per-vcpu", "1"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("backend: soft"))
        #expect(r.stdout.contains("Verification: OK - 512 pages checked, 0 bad"))
        #expect(r.stdout.contains("Per-vcpu demand paging rate:"))
    }

    @Test(.gate(.benchJSON))
    func jsonHasTheReferenceKeys() throws {
        let r = try run(["bench", "demand-paging", "--mode", "vcpu-exit", "--vcpus", "2", "--mem-per-vcpu", "1", "--json",
                         "--repeat", "2"])
        #expect(r.status == 0, "\(r.stderr)")
        let lines = r.stdout.split(separator: "\n")
        #expect(lines.count == 2)
        let object = try JSONSerialization.jsonObject(with: Data(lines[0].utf8)) as? [String: Any]
        for key in ["mode", "uffd", "readers", "vcpus", "mem_per_vcpu_mib", "delay_us", "seconds", "pages_per_sec_per_vcpu",
                    "pages_per_sec", "resolved", "bad_pages", "latency_us", "backend"] {
            #expect(object?[key] != nil, "missing \(key)")
        }
        #expect(object?["bad_pages"] as? Int == 0)
        #expect(object?["resolved"] as? Int == 512)
        #expect(object?["backend"] as? String == "kvm")
    }

    /// As uid 65534 (root drops to it with setpriv); the fallback pages in user mode.
    @Test(.gate(.kvmRefusedToOtherUsers))
    func withoutPermissionForKVM() throws {
        let nobody = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        let explicit = try run(["bench", "demand-paging", "--backend", "kvm", "--mem-per-vcpu", "1"], as: nobody)
        #expect(explicit.status == 2)
        #expect(explicit.stderr.contains("open /dev/kvm: EACCES"), "\(explicit.stderr)")
        // Left to choose, it falls back to software vCPUs and says why.
        let auto = try run(["bench", "demand-paging", "--mode", "uffd-missing", "--mem-per-vcpu", "1"], as: nobody)
        #expect(auto.status == 0, "\(auto.stderr)")
        #expect(auto.stdout.contains("backend: soft (no usable /dev/kvm (open /dev/kvm: EACCES"))
        #expect(auto.stdout.contains("Verification: OK"))
    }

    @Test func probePrintsTheTable() throws {
        let r = try run(["probe"])
        #expect(r.status == 0)
        #expect(r.stdout.contains("userfaultfd"))
        #expect(r.stdout.contains("Faultline modes"))
    }
}
