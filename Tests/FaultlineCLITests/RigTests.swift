import Foundation
import Testing

/// The kernel rig (rig/run, rig/test): Linux 6.12 with TDP under QEMU, where a vCPU fault on
/// missing RAM is a bare EFAULT. Runs rig/test against the release binary when the rig
/// kernel is there and the release binary is at least as new as the sources.
enum Rig {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    static let folder = ProcessInfo.processInfo.environment["FAULTLINE_RIG"].map { URL(fileURLWithPath: $0) }
        ?? root.deletingLastPathComponent().appendingPathComponent("shared/rig")
    static let kernel = folder.appendingPathComponent("bzImage")
    /// The same kernel with the KVM Userfault series (docs/design.md, "vcpu-exit on KVM Userfault").
    static let userfaultKernel = folder.appendingPathComponent("bzImage-6.12-userfault")
    static let releaseBinary = root.appendingPathComponent(".build/release/faultline")

    static let hasKernel = FileManager.default.fileExists(atPath: kernel.path)
    static let hasReleaseBinary = FileManager.default.isExecutableFile(atPath: releaseBinary.path)

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
}

@Suite("Kernel rig", .serialized,
       .enabled(if: Rig.hasKernel, "no rig kernel at ../shared/rig/bzImage (or $FAULTLINE_RIG/bzImage)"),
       .enabled(if: Rig.hasReleaseBinary, "no release binary: run swift build -c release"),
       .enabled(if: Rig.releaseBinaryIsCurrent, "the release binary is older than Sources/: run swift build -c release"),
       .enabled(if: getuid() == 0, "the rig runs QEMU as root"))
struct RigTests {
    /// Runs rig/test (with `arguments`) and returns its exit status and output.
    static func rigTest(_ arguments: [String] = []) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = Rig.root.appendingPathComponent("rig/test")
        p.arguments = arguments
        p.currentDirectoryURL = Rig.root
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (p.terminationStatus, text)
    }

    /// Runs rig/test with `arguments`; every check in `checks` passed and auto picked `auto`.
    static func expectRigChecks(_ arguments: [String], checks: [String], auto: String) throws {
        let (status, text) = try rigTest(arguments)
        #expect(status == 0, "rig/test exited \(status):\n\(text)")
        let lines = text.split(whereSeparator: \.isNewline)
        for check in checks {
            let line = lines.first { $0.hasPrefix("rig check \(check) (") }
            #expect(line?.contains("): ok") == true, "check \(check): \(line ?? "missing")\n\(text)")
        }
        #expect(text.contains("auto picks \(auto)"), "\(text)")
    }

    @Test("rig/test on the KVM Userfault kernel: vcpu-exit works through KVM Userfault (bench, post-copy demo), auto picks it",
          .enabled(if: FileManager.default.fileExists(atPath: Rig.userfaultKernel.path), "no ../shared/rig/bzImage-6.12-userfault"),
          .timeLimit(.minutes(20)))
    func rigChecksPassOnTheUserfaultKernel() throws {
        try Self.expectRigChecks(["--kernel", Rig.userfaultKernel.path], checks: ["a", "b", "f", "g", "h"], auto: "vcpu-exit")
    }

    @Test("rig/test: probe, default demo in fault mode auto, vcpu-exit refused up front", .timeLimit(.minutes(20)))
    func rigChecksPass() throws {
        try Self.expectRigChecks([], checks: ["a", "b", "c", "d", "e"], auto: "uffd-missing")
    }
}
