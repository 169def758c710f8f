import ArgumentParser
import FaultlineCore
import FaultlineEngine

/// `faultline bench install`: the ways a destination can put received pages into guest memory.
struct BenchInstall: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "install",
        abstract: "Time the ways received pages can go into guest memory (store, UFFDIO_COPY, ZEROPAGE, MOVE from a pool, memfd + CONTINUE).")

    @Option(name: .customLong("mib"), help: "MiB of memory per method and run") var mib = 256
    @Option(name: .customLong("run-pages"), help: "Consecutive pages per install call") var runPages = 64
    @Option(help: "Alternating runs of every method") var runs = 3
    @Option(help: "Methods, comma-separated (default: all)") var methods: String?
    @Flag(help: "One JSON line per run and method") var json = false

    func run() throws {
        let chosen = try (methods?.split(separator: ",").map(String.init) ?? InstallBench.Method.allCases.map(\.rawValue)).map {
            guard let m = InstallBench.Method(rawValue: $0) else { throw CLIError(description: "unknown method '\($0)'") }
            return m
        }
        for r in 0..<max(runs, 1) {
            // Alternate the order so that no method always runs first (or last) on a busy machine.
            for method in r % 2 == 0 ? chosen : chosen.reversed() {
                let result = try InstallBench.run(method, megabytes: mib, runPages: max(runPages, 1))
                let report = InstallBenchReport(run: r, method: method, runPages: runPages, result: result)
                if json { printJSON(report) } else { print(report.text) }
            }
        }
    }
}
