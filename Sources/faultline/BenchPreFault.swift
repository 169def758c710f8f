import ArgumentParser
import FaultlineCore
import FaultlineEngine

/// `faultline bench prefault`: a guest's first touch of a region whose host pages are present,
/// with and without KVM_PRE_FAULT_MEMORY first.
struct BenchPreFault: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prefault",
        abstract: "First-touch cost of a region with and without KVM_PRE_FAULT_MEMORY (needs TDP: run inside the rig).")

    @Option(name: .customLong("mib"), help: "MiB of guest memory per run") var mib = 16
    @Option(help: "Alternating runs of each variant") var runs = 3
    @Flag(name: .customLong("thp"), help: "Let transparent huge pages back the region (default: 4 KiB pages, as after a post-copy)")
    var transparentHugePages = false
    @Flag(help: "One JSON line per run and variant") var json = false

    func run() {
        guard mib >= 1, mib <= 2048 else { fail(CLIError(description: "--mib must be between 1 and 2048 (got \(mib))")) }
        if let why = PreFaultBenchmark.obstacle() { fail(CLIError(description: why)) }
        var failed = false
        for r in 0..<max(runs, 1) {
            for preFault in r % 2 == 0 ? [false, true] : [true, false] {
                let result: PreFaultRun
                do { result = try PreFaultBenchmark.run(bytes: UInt64(mib) << 20, preFault: preFault,
                                                         transparentHugePages: transparentHugePages) } catch { fail(error) }
                if !result.verified { failed = true }
                let report = PreFaultBenchReport(run: r, preFault: preFault, transparentHugePages: transparentHugePages, result: result)
                if json { printJSON(report) } else { print(report.text) }
            }
        }
        if failed { fail(CLIError(description: "a guest's writes did not all land")) }
    }
}
