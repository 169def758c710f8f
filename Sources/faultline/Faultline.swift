import ArgumentParser
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
#if canImport(Glibc)
import Glibc
#endif

@main
struct Faultline: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "faultline",
        abstract: "Post-copy live migration and lazy restore of KVM guest memory.",
        subcommands: [Demo.self, Run.self, Receive.self, Restore.self, ServeSnapshot.self, SnapshotCommand.self, UffdServe.self, Probe.self,
                      Bench.self, PrivateCommand.self]
    )
}

/// Errors reach the user as one line naming the operation, with exit code 2.
struct CLIError: Error, CustomStringConvertible {
    let description: String
}

func fail(_ error: Error) -> Never {
    fputs("faultline: error: \(describe(error))\n", stderr)
    Glibc.exit(2)
}

/// An error as a user of the command line reads it: a setting the engine refused is named by
/// its flag.
func describe(_ error: Error) -> String {
    guard let invalid = error as? InvalidSetting else { return "\(error)" }
    return "\(flag(for: invalid.setting)) \(invalid.problem)"
}

/// The flag that sets `setting`.
func flag(for setting: InvalidSetting.Setting) -> String {
    switch setting {
    case .faultAround: "--fault-around"
    case .postcopyVcpuNiceness: "--postcopy-vcpu-nice"
    case .faultMode: "--fault-mode"
    case .vcpus: "--vcpus"
    case .vmType: "--vm-type"
    }
}

struct Probe: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show what this machine's kernel offers and which modes can run.")

    @Flag(help: "One JSON object instead of the table.") var json = false

    func run() throws {
        let p = SystemProbe.collect()
        if json {
            printJSON(ProbeReport(p, guestMemfd: GuestMemfdProbe.collect()))
            return
        }
        let width = p.rows.map(\.name.count).max() ?? 10
        print("Kernel capabilities")
        for r in p.rows {
            let pad = String(repeating: " ", count: width - r.name.count)
            print("  \(r.name)\(pad)  \(r.value)\(r.note.isEmpty ? "" : "  (\(r.note))")")
        }
        print("Faultline modes")
        let mw = p.modes.map(\.0.count).max() ?? 10
        for (mode, why) in p.modes {
            let pad = String(repeating: " ", count: mw - mode.count)
            print("  \(mode)\(pad)  \(why == nil ? "yes" : "no: \(why!)")")
        }
        print("Migration --fault-mode auto: \(p.autoFaultMode.mode) (\(p.autoFaultMode.reason))")
        print(guestMemfdProbeText(GuestMemfdProbe.collect()))
        print(guestMemfdOnlyProbeText(p.guestMemfdOnly))
    }
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Benchmarks (JSON with --json).",
                                                    subcommands: [DemandPaging.self, BenchChaos.self, BenchInstall.self, BenchConversions.self, BenchPreFault.self,
                                                                  BenchClones.self])
}

extension FaultMode: ExpressibleByArgument {}
extension FaultModeChoice: ExpressibleByArgument {
    public var defaultValueDescription: String { argument }
    public static var allValueStrings: [String] { spellings }
}
extension UffdTopology: ExpressibleByArgument {}
extension ExecutionBackend: ExpressibleByArgument {}
extension BackingKind: ExpressibleByArgument {}

struct DemandPagingOptions: ParsableArguments {
    @Option(help: "none | prefilled | uffd-missing | uffd-minor | vcpu-exit") var mode: FaultMode = .vcpuExit
    @Option(help: "single | per-vcpu: one userfaultfd for all memory or one per vCPU chunk") var uffd: UffdTopology = .single
    @Option(help: "Reader threads per userfaultfd") var readers = 1
    @Option(help: "Number of vCPUs") var vcpus = 1
    @Option(name: .customLong("mem-per-vcpu"), help: "MiB of guest memory per vCPU") var memPerVcpu = 64
    @Option(name: .customLong("delay-us"), help: "Injected page-fetch latency in microseconds") var delayUs = 0
    @Option(help: "anonymous | memfd | hugetlb | guest-memfd (default: memfd for uffd-minor, else anonymous)")
    var backing: BackingKind?
    @Option(help: "sequential | random | read | stride") var pattern = "sequential"
    @Option(help: "kvm | soft (default: kvm when /dev/kvm is usable)") var backend: ExecutionBackend?

    func config(backend: ExecutionBackend) throws -> DemandPagingConfig {
        guard let access = AccessPattern(name: pattern) else {
            throw CLIError(description: "unknown --pattern '\(pattern)' (sequential, random, read, stride)")
        }
        guard memPerVcpu >= 1 else { throw CLIError(description: "--mem-per-vcpu must be at least 1 MiB (got \(memPerVcpu))") }
        var c = DemandPagingConfig()
        c.mode = mode
        c.uffd = uffd
        c.readers = readers
        c.vcpus = vcpus
        c.bytesPerVcpu = UInt64(memPerVcpu) << 20
        c.delayMicroseconds = delayUs
        c.backing = backing
        c.pattern = access
        c.backend = backend
        try c.validate()
        return c
    }
}

struct DemandPaging: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demand-paging",
        abstract: "Each vCPU touches every page of its chunk while faults are resolved from a page source.")

    @OptionGroup var options: DemandPagingOptions
    @Option(help: "Run this many times") var `repeat` = 1
    @Flag(help: "One JSON line per run (the C reference's keys plus latency and backend)") var json = false

    func run() {
        let (backend, why) = BackendSelection.resolve(options.backend)
        do {
            let config = try options.config(backend: backend)
            if !json { print("backend: \(backend) (\(why))") }
            var failed = false
            for _ in 0..<max(1, self.repeat) {
                let result = try DemandPagingBenchmark(config: config, modeOption: "--mode").run()
                if json { printJSON(DemandPagingReport(result)) } else { print(result.humanReport) }
                if !result.verified { failed = true }
            }
            if failed { Glibc.exit(1) }
        } catch {
            fail(error)
        }
    }
}

extension DemandPagingResult {
    var humanReport: String {
        let c = config
        let l = latencyMicroseconds
        return """
        mode \(c.mode), \(c.vcpus) vCPU(s) x \(c.bytesPerVcpu >> 20) MiB, uffd \(c.uffd), \(c.readers) reader(s), \
        delay \(c.delayMicroseconds) us, backing \(c.effectiveBacking), pattern \(c.pattern), backend \(backend)
        Total guest execution time:\t\(fmt(seconds, 6))s
        Per-vcpu demand paging rate:\t\(fmt(pagesPerSecondPerVcpu, 6)) pgs/sec/vcpu
        Overall demand paging rate:\t\(fmt(pagesPerSecond, 6)) pgs/sec
        Fault latency (us): p50 \(fmt(l.p50, 1)) p90 \(fmt(l.p90, 1)) p99 \(fmt(l.p99, 1)) max \(fmt(l.max, 1)) over \(faultsMeasured) faults
        Verification: \(verified ? "OK" : "FAILED") - \(pages) pages checked, \(badPages) bad\
        \(checksumFailures > 0 ? ", \(checksumFailures) vCPU read checksums wrong" : ""); \(resolved) resolved, \(raced) raced\
        \(vcpuExitMechanism.map { "\nvCPU faults via: \($0.rawValue)" + ($0 == .kvmUserfault ? " (\(uffdFallbackFaults) through the userfaultfd behind it)" : "") } ?? "")
        """
    }

}

func fmt(_ v: Double, _ digits: Int) -> String {
    guard v.isFinite else { return "0" }
    var buf = [CChar](repeating: 0, count: 64)
    _ = withVaList([v]) { vsnprintf(&buf, 64, "%.\(digits)f", $0) }
    return String(cString: buf)
}
