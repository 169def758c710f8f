import ArgumentParser
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation

/// The options of `restore --clone`.
struct CloneArguments: ParsableArguments {
    @Flag(name: .customLong("clone"),
          help: "Map the snapshot's memory file private (copy-on-write) as the guest's RAM: pages the guest does not write stay shared with every other clone, in the page cache; every chunk is checked first")
    var enabled = false
    @Option(help: "--clone: run until every vCPU has completed this many passes after the restore (instead of --run-after seconds)")
    var passes: UInt64?
    @Option(name: .customLong("passes-timeout"), help: "--clone: seconds to wait for --passes") var passesTimeout = 600.0
    @Flag(help: "--clone: then pause the guest, print one JSON line (outcome \"holding\", with the memory counts) and wait for a line or the end of standard input before stopping it (`bench clones` measures the clones meanwhile)")
    var hold = false

    /// Whether any clone option was given (they all need --clone).
    var requested: Bool { enabled || passes != nil || hold }
}

extension Restore {
    /// `restore DIR --clone`: a ``SnapshotClone`` run for `--run-after` seconds or `--passes`.
    func runClone(started: UInt64) {
        do {
            guard clone.enabled else { throw CLIError(description: "--passes and --hold need --clone") }
            guard lazy == .lazy else { throw CLIError(description: "--clone maps the snapshot; it cannot be combined with --eager") }
            guard faultMode == .auto else {
                throw CLIError(description: "--clone has no fault path (the kernel reads the file in): --fault-mode does not apply")
            }
            guard let folder, remote.from == nil else { throw CLIError(description: "--clone maps a local snapshot folder (not --from)") }
            let clone = try SnapshotClone(folder: folder, started: started)
            try clone.start()
            var shortOfPasses: String?
            if let passes = self.clone.passes {
                if !clone.waitForPasses(passes, timeoutSeconds: self.clone.passesTimeout) {
                    shortOfPasses = "the guest did not complete \(passes) passes on every vCPU within \(self.clone.passesTimeout) s"
                }
            } else {
                MonotonicClock.sleep(seconds: runAfter)
            }
            if self.clone.hold && shortOfPasses == nil {
                try clone.pause()
                print(try jsonLine(Merged(clone.report, OutcomeFields(outcome: "holding", pid: "\(getpid())"))))
                fflush(stdout)
                _ = readLine()  // a line, or the end of input
            }
            let report = try clone.stop()
            print(json ? try jsonLine(report) : report.text)
            if let shortOfPasses {
                fputs("faultline: error: \(shortOfPasses)\n", stderr)
                Foundation.exit(1)
            }
            if !report.guestCheck {
                fputs("faultline: error: the clone's guest reported memory that does not match what it wrote\n", stderr)
                Foundation.exit(1)
            }
        } catch {
            if json { printJSON(FailureReport(side: "restore", mode: "clone", outcome: "failed", error: "\(error)")) }
            fail(error)
        }
    }
}
