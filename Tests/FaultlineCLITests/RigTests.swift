import FaultlineTestSupport
import Foundation
import Testing

/// The kernel rig (rig/run, rig/test): Linux with TDP under QEMU (6.12, 6.12 with KVM
/// Userfault, 7.3 with KVM Userfault and userfaultfd on guest_memfd), where a vCPU fault on
/// missing RAM is a bare EFAULT. Runs rig/test against the release binary when the rig
/// kernel is there and the release binary is at least as new as the sources.
enum Rig {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    /// Where rig/run looks: $FAULTLINE_RIG, ../shared/rig next to the repository, /work/shared/rig.
    static let folder: URL = {
        if let env = ProcessInfo.processInfo.environment["FAULTLINE_RIG"] { return URL(fileURLWithPath: env) }
        let sibling = root.deletingLastPathComponent().appendingPathComponent("shared/rig")
        if FileManager.default.fileExists(atPath: sibling.path) { return sibling }
        return URL(fileURLWithPath: "/work/shared/rig")
    }()
    static let kernel = folder.appendingPathComponent("bzImage")
    /// The same kernel with the KVM Userfault series (docs/design.md, "vcpu-exit on KVM Userfault").
    static let userfaultKernel = folder.appendingPathComponent("bzImage-6.12-userfault")
    /// Linux 7.3 with KVM Userfault, userfaultfd on guest_memfd and write() population.
    static let gmemUffdKernel = folder.appendingPathComponent("bzImage-7.3-gmem-uffd")
    /// Every rig kernel, by file name, with the version its banner shows ("rig: kernel 6.12.117").
    static let kernels = [("bzImage", "6.12"), ("bzImage-6.12-userfault", "6.12"), ("bzImage-7.3-gmem-uffd", "7.3")]
    static let releaseBinary = root.appendingPathComponent(".build/release/faultline")

    static let hasKernel = FileManager.default.fileExists(atPath: kernel.path)
    static let hasReleaseBinary = FileManager.default.isExecutableFile(atPath: releaseBinary.path)
    /// The rig boots QEMU with software emulation, which takes both cores of a small machine:
    /// the rig suites run when asked (`FAULTLINE_RIG_TESTS=1`, as .ci/run does after the main
    /// test run), not in the middle of the timing-sensitive migration tests.
    static let requested = ProcessInfo.processInfo.environment["FAULTLINE_RIG_TESTS"] == "1"
    static let notRequested = "the rig suites run with FAULTLINE_RIG_TESTS=1 (.ci/run does: FAULTLINE_RIG_TESTS=1 swift test --filter RigTests)"
    /// Inside the rig the host-side suites must not start a rig of their own.
    static let insideRig = ProcessInfo.processInfo.environment["FAULTLINE_INSIDE_RIG"] == "1"

    /// False when a source file is newer than the release binary (rig/test would test old code).
    static let releaseBinaryIsCurrent: Bool = {
        let fm = FileManager.default
        guard let built = (try? fm.attributesOfItem(atPath: releaseBinary.path))?[.modificationDate] as? Date,
              let files = fm.enumerator(atPath: root.appendingPathComponent("Sources").path) else { return false }
        for case let file as String in files {
            let path = root.appendingPathComponent("Sources").appendingPathComponent(file).path
            if let m = (try? fm.attributesOfItem(atPath: path))?[.modificationDate] as? Date, m > built { return false }
        }
        return true
    }()

    /// Runs a script of the repository (rig/test, rig/tests) and returns its status and output.
    static func script(_ name: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = root.appendingPathComponent(name)
        p.arguments = arguments
        p.currentDirectoryURL = root
        var env = ProcessInfo.processInfo.environment
        env["FAULTLINE_RIG"] = folder.path
        p.environment = env
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (p.terminationStatus, text)
    }
}

@Suite("Kernel rig", .serialized,
       .enabled(if: Rig.requested && !Rig.insideRig, Comment(rawValue: Rig.notRequested)),
       .enabled(if: Rig.hasKernel, "no rig kernel (looked for $FAULTLINE_RIG, ../shared/rig, /work/shared/rig)"),
       .enabled(if: Rig.hasReleaseBinary, "no release binary: run swift build -c release"),
       .enabled(if: Rig.releaseBinaryIsCurrent, "the release binary is older than Sources/: run swift build -c release"),
       .gate(.kernelRig))
struct RigTests {
    /// Runs rig/test with `arguments`; every check in `checks` passed and auto picked `auto`.
    static func expectRigChecks(_ arguments: [String], checks: [String], auto: String) throws {
        let (status, text) = try Rig.script("rig/test", arguments)
        #expect(status == 0, "rig/test exited \(status):\n\(text)")
        let lines = text.split(whereSeparator: \.isNewline)
        for check in checks {
            let line = lines.first { $0.hasPrefix("rig check \(check) (") }
            #expect(line?.contains("): ok") == true, "check \(check): \(line ?? "missing")\n\(text)")
        }
        #expect(text.contains("auto picks \(auto)"), "\(text)")
    }

    @Test("rig/test on the KVM Userfault kernel: vcpu-exit works through KVM Userfault (bench, post-copy demo), auto picks it",
          .enabled(if: FileManager.default.fileExists(atPath: Rig.userfaultKernel.path), "no bzImage-6.12-userfault in the rig folder"),
          .timeLimit(.minutes(20)))
    func rigChecksPassOnTheUserfaultKernel() throws {
        try Self.expectRigChecks(["--kernel", Rig.userfaultKernel.path], checks: ["a", "b", "f", "g", "h"], auto: "vcpu-exit")
    }

    @Test("rig/test on the 7.3 kernel: vcpu-exit through KVM Userfault, auto picks it, the guest_memfd-only probe says yes",
          .enabled(if: FileManager.default.fileExists(atPath: Rig.gmemUffdKernel.path), "no bzImage-7.3-gmem-uffd in the rig folder"),
          .timeLimit(.minutes(20)))
    func rigChecksPassOnTheGmemUffdKernel() throws {
        try Self.expectRigChecks(["--kernel", Rig.gmemUffdKernel.path], checks: ["a", "k", "b", "f", "g", "h"], auto: "vcpu-exit")
    }

    /// `faultline probe` inside the 7.3 rig: what its NOTES measured with a C program, found
    /// again by trying each thing (guest_memfd flags with WRITE named, mmap, userfaultfd MISSING
    /// and MINOR on the mapping, write() population, KVM_MEM_USERFAULT set at creation).
    @Test("faultline probe on the 7.3 kernel shows guest_memfd mmap, userfaultfd on it, write() and KVM Userfault",
          .enabled(if: FileManager.default.fileExists(atPath: Rig.gmemUffdKernel.path), "no bzImage-7.3-gmem-uffd in the rig folder"),
          .timeLimit(.minutes(10)))
    func probeOnTheGmemUffdKernel() throws {
        var (status, text) = (Int32(0), "")
        for _ in 1...3 {  // 125: the VM gave no status (an early boot death under TCG); retried
            (status, text) = try Rig.script("rig/run", ["--kernel", Rig.gmemUffdKernel.path, "--smp", "1", "--timeout", "300",
                                                        "--", Rig.releaseBinary.path, "probe"])
            if status != 125 { break }
        }
        #expect(status == 0, "probe exited \(status):\n\(text)")
        let lines = text.replacingOccurrences(of: "\r", with: "").split(separator: "\n").map(String.init)
        // The guest_memfd-only section repeats some row names of the SW-protected one above it.
        let section = Array(lines.drop { !$0.hasPrefix("guest_memfd-only VM") })
        #expect(!section.isEmpty, "no guest_memfd-only section:\n\(text)")
        func value(_ name: String) -> String? {
            let row = { (line: String) in line.hasPrefix("  \(name)  ") }
            return (section.first(where: row) ?? lines.first(where: row))
                .map { String($0.dropFirst(name.count + 2)).trimmingCharacters(in: .whitespaces) }
        }
        #expect(text.contains("rig: kernel 7.3"), "\(text)")
        #expect(value("KVM_CAP_GUEST_MEMFD_FLAGS") == "11  (MMAP|INIT_SHARED|WRITE)", "\(text)")
        #expect(value("KVM_CAP_GUEST_MEMFD_FLAGS (VM)") == "11 (MMAP|INIT_SHARED|WRITE)", "\(text)")
        for row in ["guest_memfd mmap", "userfaultfd MISSING", "userfaultfd MINOR", "write() populates (WRITE)",
                    "KVM_MEM_USERFAULT memslot", "fault path uffd-missing", "fault path uffd-minor", "fault path vcpu-exit",
                    "path stop-and-copy", "path postcopy-userfaultfd", "path postcopy-kvm-userfault", "backing guest-memfd"] {
            #expect(value(row)?.hasPrefix("yes") == true, "\(row): \(value(row) ?? "missing")\n\(text)")
        }
        // Measured there: KVM refuses to log a guest_memfd memslot's dirty pages (EINVAL).
        #expect(value("KVM_MEM_LOG_DIRTY_PAGES memslot")?.hasPrefix("no (KVM_SET_USER_MEMORY_REGION2 slot 1: EINVAL") == true, "\(text)")
        #expect(value("path precopy") == "no: needs KVM_MEM_LOG_DIRTY_PAGES on a guest_memfd memslot", "\(text)")
        #expect(value("vcpu-exit mechanism") == "kvm-userfault", "\(text)")
    }

    @Test("rig/test: probe, default demo in fault mode auto, vcpu-exit refused up front", .timeLimit(.minutes(20)))
    func rigChecksPass() throws {
        try Self.expectRigChecks([], checks: ["a", "b", "c", "d", "e"], auto: "uffd-missing")
    }

    /// The suites that need a rig kernel (SW-protected VMs, memory attributes, private
    /// guest_memfd, KVM_PRE_FAULT_MEMORY, KVM Userfault): on this machine they skip with a
    /// reason; here they run inside the rig, once per rig kernel.
    static let rigSuiteFilters = ["RigKernel", "PrivateMemory", "GuestMemfdMigration", "KVMUserfault", "PreFault", "GuestMemfdUffd"]

    @Test("rig/tests: the rig-only suites pass inside the rig", .timeLimit(.minutes(20)), arguments: Rig.kernels)
    func rigSuitesPass(kernel: String, version: String) throws {
        let path = Rig.folder.appendingPathComponent(kernel)
        try #require(FileManager.default.fileExists(atPath: path.path), "no rig kernel at \(path.path)")
        let (status, text) = try Rig.script("rig/tests", ["--kernel", path.path] + Self.rigSuiteFilters)
        #expect(status == 0, "rig/tests on \(kernel) exited \(status):\n\(text)")
        #expect(text.contains("Test run with"), "no test summary from inside the rig:\n\(text)")
        #expect(text.contains("rig: kernel \(version)"), "the rig did not boot:\n\(text)")
    }
}
