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
    @Test("rig/test: probe, default demo in fault mode auto, vcpu-exit refused up front", .timeLimit(.minutes(20)))
    func rigChecksPass() throws {
        let p = Process()
        p.executableURL = Rig.root.appendingPathComponent("rig/test")
        p.currentDirectoryURL = Rig.root
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0, "rig/test exited \(p.terminationStatus):\n\(text)")
        let lines = text.split(whereSeparator: \.isNewline)
        for check in ["a", "b", "c", "d", "e"] {
            let line = lines.first { $0.hasPrefix("rig check \(check) (") }
            #expect(line?.contains("): ok") == true, "check \(check): \(line ?? "missing")\n\(text)")
        }
        #expect(text.contains("auto picks uffd-missing"), "\(text)")
    }
}
