import FaultlineCore
import FaultlineEngine

/// `bench demand-paging --json`: one run, with the C reference's keys (bench/ compares the two)
/// plus latency and backend (docs/reports.md, "bench demand-paging").
struct DemandPagingReport: Codable, Sendable, Equatable {
    var implementation = "faultline"
    var backend: String
    var mode: String
    var uffd: String
    var readers: Int
    var vcpus: Int
    var memPerVcpuMiB: UInt64
    var delayMicroseconds: Int
    var backing: String
    var pattern: String
    var seconds: Double
    var pagesPerSecondPerVcpu: Double
    var pagesPerSecond: Double
    var resolved: Int
    var raced: Int
    var badPages: Int
    var checksumFailures: Int
    /// vcpu-exit only: how faults reached the vCPU threads, and the faults that came through the userfaultfd behind.
    var vcpuExitVia: String?
    var uffdFallbackFaults: Int?
    var latency: LatencyPercentiles

    enum CodingKeys: String, CodingKey {
        case implementation, backend, mode, uffd, readers, vcpus, memPerVcpuMiB = "mem_per_vcpu_mib", delayMicroseconds = "delay_us"
        case backing, pattern, seconds, pagesPerSecondPerVcpu = "pages_per_sec_per_vcpu", pagesPerSecond = "pages_per_sec"
        case resolved, raced, badPages = "bad_pages", checksumFailures = "checksum_failures", vcpuExitVia = "vcpu_exit_via"
        case uffdFallbackFaults = "uffd_fallback_faults", latency = "latency_us"
    }

    init(_ r: DemandPagingResult) {
        let c = r.config
        let l = r.latencyMicroseconds
        backend = r.backend.rawValue
        mode = c.mode.rawValue
        uffd = c.uffd.rawValue
        readers = c.readers
        vcpus = c.vcpus
        memPerVcpuMiB = c.bytesPerVcpu >> 20
        delayMicroseconds = c.delayMicroseconds
        backing = "\(c.effectiveBacking)"
        pattern = "\(c.pattern)"
        seconds = rounded(r.seconds, 6)
        pagesPerSecondPerVcpu = rounded(r.pagesPerSecondPerVcpu, 0)
        pagesPerSecond = rounded(r.pagesPerSecond, 0)
        resolved = r.resolved
        raced = r.raced
        badPages = r.badPages
        checksumFailures = r.checksumFailures
        vcpuExitVia = r.vcpuExitMechanism?.rawValue
        uffdFallbackFaults = r.vcpuExitMechanism == nil ? nil : r.uffdFallbackFaults
        latency = LatencyPercentiles(p50: l.p50, p90: l.p90, p99: l.p99, max: l.max)
    }
}

/// `bench install --json`: one run of one install method.
struct InstallBenchReport: Codable, Sendable, Equatable {
    var run: Int
    var method: String
    var pages: Int
    var runPages: Int
    var prepareSeconds: Double
    var installSeconds: Double
    var pagesPerSecond: Double
    var pagesPerSecondWithPrepare: Double

    enum CodingKeys: String, CodingKey {
        case run, method, pages, runPages = "run_pages", prepareSeconds = "prepare_seconds", installSeconds = "install_seconds"
        case pagesPerSecond = "pages_per_second", pagesPerSecondWithPrepare = "pages_per_second_with_prepare"
    }

    init(run: Int, method: InstallBench.Method, runPages: Int, result: InstallBench.Result) {
        self.run = run
        self.method = method.rawValue
        pages = result.pages
        self.runPages = runPages
        prepareSeconds = rounded(result.prepareSeconds, 6)
        installSeconds = rounded(result.installSeconds, 6)
        pagesPerSecond = rounded(result.pagesPerSecond, 0)
        pagesPerSecondWithPrepare = rounded(result.pagesPerSecondWithPrepare, 0)
    }

    var text: String {
        "run \(run) \(method): \(fmt(pagesPerSecond, 0)) pages/s (prepare \(fmt(prepareSeconds, 3)) s, install \(fmt(installSeconds, 3)) s)"
    }
}

/// `bench pre-fault --json`: one run, plain or pre-faulted.
struct PreFaultBenchReport: Codable, Sendable, Equatable {
    var run: Int
    var preFault: Bool
    var transparentHugePages: Bool
    var pages: Int
    var preFaultSeconds: Double
    var preFaultCalls: Int
    var preFaultRetries: Int
    var touchSeconds: Double
    var touchNanosecondsPerPage: Double
    var totalSeconds: Double
    var verified: Bool

    enum CodingKeys: String, CodingKey {
        case run, preFault = "pre_fault", transparentHugePages = "thp", pages, preFaultSeconds = "pre_fault_seconds"
        case preFaultCalls = "pre_fault_calls", preFaultRetries = "pre_fault_retries", touchSeconds = "touch_seconds"
        case touchNanosecondsPerPage = "touch_ns_per_page", totalSeconds = "total_seconds", verified
    }

    init(run: Int, preFault: Bool, transparentHugePages: Bool, result: PreFaultRun) {
        self.run = run
        self.preFault = preFault
        self.transparentHugePages = transparentHugePages
        pages = result.pages
        preFaultSeconds = rounded(result.preFaultSeconds, 6)
        preFaultCalls = result.preFaultCalls
        preFaultRetries = result.preFaultRetries
        touchSeconds = rounded(result.touchSeconds, 6)
        touchNanosecondsPerPage = rounded(result.touchNanosecondsPerPage, 0)
        totalSeconds = rounded(result.preFaultSeconds + result.touchSeconds, 6)
        self.verified = result.verified
    }

    var text: String {
        "run \(run) \(preFault ? "pre-faulted" : "plain      "): first touch \(fmt(touchSeconds * 1000, 2)) ms "
            + "(\(fmt(touchNanosecondsPerPage, 0)) ns/page)"
            + (preFault ? ", KVM_PRE_FAULT_MEMORY \(fmt(preFaultSeconds * 1000, 2)) ms in \(preFaultCalls) call(s)" : "")
            + (verified ? "" : " - VERIFICATION FAILED")
    }
}
