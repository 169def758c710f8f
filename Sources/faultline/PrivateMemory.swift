import ArgumentParser
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
#if canImport(Glibc)
import Glibc
#endif

/// Options shared by `faultline private` and `faultline bench conversions`.
struct PrivateMemoryOptions: ParsableArguments {
    @Option(help: "Conversions the guest makes (each flips the bounce buffer between shared and private)")
    var conversions = 1000
    @Option(help: "eager (discard the stale backing at every conversion) | lazy (defer, coalesce, flush in batches)")
    var discard = "lazy"
    @Option(name: .customLong("batch"), help: "lazy: flush once this many pages have a pending discard")
    var batch = Int(DiscardPolicy.defaultBatchPages)
    @Option(help: "Pages in the bounce buffer (OVMF flips 1 or 2)") var pages = 1
    @Option(name: .customLong("region-pages"), help: "Pages of private-capable memory") var regionPages = 16
    @Option(name: .customLong("shared-backing"), help: "anonymous (MADV_DONTNEED) | memfd (MADV_REMOVE)")
    var sharedBacking = "anonymous"
    @Option(help: "Fail past this many seconds") var timeout = 300.0

    func config(readbacks: Bool) throws -> PrivateMemoryRunConfig {
        var c = PrivateMemoryRunConfig()
        switch discard {
        case "eager": c.policy = .eager
        case "lazy":
            guard batch >= 1 else { throw CLIError(description: "--batch must be at least 1 page (got \(batch))") }
            c.policy = .lazy(batchPages: UInt64(batch))
        default: throw CLIError(description: "unknown --discard '\(discard)' (eager, lazy)")
        }
        switch sharedBacking {
        case "anonymous": c.sharedBacking = .anonymous
        case "memfd": c.sharedBacking = .memfd
        default: throw CLIError(description: "unknown --shared-backing '\(sharedBacking)' (anonymous, memfd)")
        }
        guard conversions >= 0 else { throw CLIError(description: "--conversions must be >= 0 (got \(conversions))") }
        guard pages >= 1, regionPages >= pages + 1 else {
            throw CLIError(description: "--pages \(pages) and --region-pages \(regionPages): need 1 <= pages < region-pages")
        }
        c.guest.conversions = conversions
        c.guest.regionPages = UInt64(regionPages)
        c.guest.bufferPages = UInt64(pages)
        c.guest.bufferPage = UInt64(regionPages - pages)
        // Whole-range conversions first, leaving a mixed map: [0, n/2) shared, the rest private.
        c.guest.prologue = [
            .init(firstPage: 0, pages: UInt64(regionPages), target: .shared),
            .init(firstPage: UInt64(regionPages / 2), pages: UInt64(regionPages - regionPages / 2), target: .private),
        ]
        c.guest.readbacks = readbacks
        c.timeoutSeconds = timeout
        return c
    }
}

/// `faultline private`: the conversion guest in a SW-protected VM, checked.
struct PrivateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "private",
        abstract: "Run a guest in a KVM_X86_SW_PROTECTED_VM that converts a bounce buffer between shared and private "
            + "(KVM_HC_MAP_GPA_RANGE) and checks contents and the kernel's attributes against the range map.")

    @OptionGroup var options: PrivateMemoryOptions
    @Flag(help: "One JSON object instead of the report") var json = false

    func run() {
        do {
            let report = try PrivateMemoryRun.run(try options.config(readbacks: true))
            if json { printJSON(PrivateMemoryBenchReport(report)) } else { print(report.humanReport) }
            if !report.verified { Glibc.exit(1) }
        } catch {
            fail(error)
        }
    }
}

/// `faultline bench conversions`: the OVMF bounce-buffer pattern, eager vs lazy discard.
struct BenchConversions: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "conversions",
        abstract: "Conversions per second of a 1-2 page bounce buffer (OVMF's DMA pattern) and the cost of each part.")

    @OptionGroup var options: PrivateMemoryOptions
    @Option(help: "Run this many times") var `repeat` = 1
    @Flag(help: "Baseline: the guest asks for the state the buffer is already in; the host converts nothing (exit and re-entry only)")
    var baseline = false
    @Flag(help: "One JSON line per run") var json = false

    func run() {
        do {
            var config = try options.config(readbacks: false)
            config.guest.baseline = baseline
            var failed = false
            for _ in 0..<max(1, self.repeat) {
                let report = try PrivateMemoryRun.run(config)
                if json { printJSON(PrivateMemoryBenchReport(report)) } else { print(report.humanReport) }
                if !report.verified { failed = true }
            }
            if failed { Glibc.exit(1) }
        } catch {
            fail(error)
        }
    }
}

extension PrivateMemoryReport {
    private func perCall(_ ns: UInt64, _ n: Int) -> Double { n > 0 ? Double(ns) / Double(n) / 1000 : 0 }

    var humanReport: String {
        let c = config, g = config.guest
        var lines = [
            "private memory: SW-protected VM, \(g.regionPages) pages at 0x\(String(g.regionGPA, radix: 16)) "
                + "(guest_memfd + \(c.sharedBacking) shared backing), discard \(c.policy), hypercall \(hypercallInstruction.rawValue)",
            "guest: \(guestConversions) of \(g.conversions) conversions of a \(g.bufferPages)-page buffer, status \(guestStatus.map { "\($0)" } ?? "unknown")",
            "contents: \(checkedObservations) observations checked exactly; shared backing kept \(survivedShared) / zeros \(zeroShared), "
                + "private backing kept \(survivedPrivate) / zeros \(zeroPrivate) (zeros: discarded, or first use)",
        ]
        for r in readbacks {
            lines.append("readback \(r.index): kernel maps \(r.sharedPages) pages shared, \(r.privatePages) private: "
                + (r.mismatchCount == 0 ? "matches the range map" : "\(r.mismatchCount) MISMATCHES: " + r.mismatches.joined(separator: "; ")))
        }
        let k = costs
        lines.append("costs: \(k.conversions) conversions in \(fmt(seconds, 3)) s = \(fmt(conversionsPerSecond, 0))/s; "
            + "KVM_SET_MEMORY_ATTRIBUTES \(fmt(perCall(k.attributeNanoseconds, k.conversions), 1)) us each; "
            + "discards \(k.discardCalls) calls (\(discardCallsAtEnd) at the end) \(fmt(perCall(k.discardNanoseconds, k.discardCalls), 1)) us each, "
            + "\(k.discardedPrivatePages) private + \(k.discardedSharedPages) shared pages, \(cancelledDiscardPages) cancelled; "
            + "KVM_RUN \(fmt(perCall(kvmRunNanoseconds, exits), 1)) us per exit (\(exits) exits); "
            + "userspace \(fmt(perCall(userspaceNanoseconds, exits), 1)) us per exit")
        if k.refused > 0 || k.implicitConversions > 0 || k.unchanged > 0 {
            lines.append("requests: \(k.refused) refused, \(k.implicitConversions) implicit (memory-fault exits), \(k.unchanged) already in that state"
                + (lastRefusal.map { "; last refusal: \($0)" } ?? ""))
        }
        if let m = finalMap {
            lines.append("range map: " + m.pages.entries.map { "[\($0.range.lowerBound), \($0.range.upperBound)) \($0.value)" }.joined(separator: ", "))
        }
        for m in contentMismatches { lines.append("MISMATCH: \(m)") }
        lines.append("Verification: \(verified ? "OK" : "FAILED")")
        return lines.joined(separator: "\n")
    }
}
