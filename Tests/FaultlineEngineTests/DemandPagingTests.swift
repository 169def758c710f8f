import Dispatch
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Testing

func config(_ mode: FaultMode, backend: ExecutionBackend = .kvm, vcpus: Int = 2, kib: UInt64 = 1024,
            _ edit: (inout DemandPagingConfig) -> Void = { _ in }) -> DemandPagingConfig {
    var c = DemandPagingConfig()
    c.mode = mode
    c.vcpus = vcpus
    c.bytesPerVcpu = kib << 10
    c.backend = backend
    edit(&c)
    return c
}

/// A run that did not end in time (its thread is left behind; the test fails instead of hanging).
struct RanPastDeadline: Error, CustomStringConvertible { let description: String }

/// What a bounded body returned or threw, handed over from its thread.
final class BoundedOutcome: @unchecked Sendable { var value: Any?; var error: Error? }

/// Runs `body` on its own thread (8 MiB of stack, like a main thread) and waits at most
/// `seconds` for it; past that records an issue and throws.
func bounded<T>(_ what: String, within seconds: Int = 120, sourceLocation: SourceLocation = #_sourceLocation,
                _ body: @escaping () throws -> T) throws -> T {
    let outcome = BoundedOutcome(), done = DispatchSemaphore(value: 0)
    let thread = try OSThread(name: "bounded test", stackSize: 8 << 20) {
        do { outcome.value = try body() } catch { outcome.error = error }
        done.signal()
    }
    guard done.wait(timeout: .now() + .seconds(seconds)) == .success else {
        Issue.record("\(what) ran past \(seconds) s", sourceLocation: sourceLocation)
        throw RanPastDeadline(description: "\(what) ran past \(seconds) s")
    }
    thread.join()
    if let error = outcome.error { throw error }
    return outcome.value as! T
}

func runVerified(_ c: DemandPagingConfig, sourceLocation: SourceLocation = #_sourceLocation) throws -> DemandPagingResult {
    let r = try bounded("demand paging \(c.mode) \(c.pattern) on \(c.backend)", sourceLocation: sourceLocation) {
        try DemandPagingBenchmark(config: c).run()
    }
    #expect(r.badPages == 0, "\(c.mode) \(c.pattern): \(r.badPages) bad pages")
    #expect(r.checksumFailures == 0, "\(c.mode) \(c.pattern): read checksums")
    #expect(r.pages == Int(c.totalBytes / 4096))
    return r
}

/// The baselines need only KVM; each test of the userfaultfd modes needs what its modes need
/// (KVM's own accesses to guest memory are kernel-mode faults: a userfaultfd without
/// UFFD_USER_MODE_ONLY). guest_memfd backing runs the baselines only.
@Suite("Demand paging on KVM, every mode", .serialized, .gate(.kvmDemandPaging))
struct KVMDemandPagingTests {
    @Test(arguments: FaultMode.allCases.filter { !$0.usesUserfaultfd })
    func baselinesVerifyEveryPage(mode: FaultMode) throws {
        let r = try runVerified(config(mode))
        #expect(r.resolved == 0)
    }

    @Test(.gate(.everyModeOnKVM), arguments: FaultMode.allCases.filter(\.usesUserfaultfd))
    func everyModeVerifiesEveryPage(mode: FaultMode) throws {
        let r = try runVerified(config(mode))
        #expect(r.resolved + r.raced == r.pages, "every page was faulted in exactly once")
        #expect(r.faultsMeasured > 0)
    }

    @Test(.gate(.patternsUnderEachResolverOnKVM), arguments: ["random", "read", "stride"])
    func patternsUnderEachResolver(pattern: String) throws {
        for mode in [FaultMode.uffdMissing, .uffdMinor, .vcpuExit] {
            _ = try runVerified(config(mode) { $0.pattern = AccessPattern(name: pattern)! })
        }
    }

    @Test(.gate(.perVcpuUffdsAndReadersOnKVM))
    func perVcpuUffdsAndManyReaders() throws {
        _ = try runVerified(config(.uffdMissing, vcpus: 4, kib: 512) { $0.uffd = .perVcpu; $0.readers = 2 })
        _ = try runVerified(config(.uffdMinor, vcpus: 4, kib: 512) { $0.uffd = .perVcpu })
        _ = try runVerified(config(.uffdMissing, vcpus: 3, kib: 256) { $0.readers = 3 })
    }

    @Test(.gate(.injectedDelayOnKVM))
    func injectedDelayIsPaid() throws {
        let r = try runVerified(config(.vcpuExit, vcpus: 1, kib: 256) { $0.delayMicroseconds = 200 })
        // 64 faults, each sleeping at least 200 us.
        #expect(r.seconds >= 64 * 200e-6)
        #expect(r.latencyMicroseconds.p50 >= 200)
    }

    @Test(.gate(.guestMemfdBaselines))
    func guestMemfdBackingRunsTheBaselines() throws {
        _ = try runVerified(config(.prefilled) { $0.backing = .guestMemfd })
        _ = try runVerified(config(.none) { $0.backing = .guestMemfd })
    }

    @Test(.gate(.twoHundredFiftySixVcpus))
    func twoHundredFiftySixVcpus() throws {
        let r = try runVerified(config(.vcpuExit, vcpus: 256, kib: 64))
        #expect(r.resolved == 256 * 16)
    }
}

@Suite("Demand paging on software vCPUs", .serialized, .gate(.softDemandPaging))
struct SoftDemandPagingTests {
    @Test(arguments: FaultMode.allCases)
    func everyModeVerifiesEveryPage(mode: FaultMode) throws {
        let r = try runVerified(config(mode, backend: .soft, vcpus: 3))
        #expect(r.backend == .soft)
        if mode.usesUserfaultfd { #expect(r.resolved + r.raced == r.pages) }
    }

    @Test func softPatternsAndPerVcpu() throws {
        _ = try runVerified(config(.uffdMissing, backend: .soft, vcpus: 4) { $0.uffd = .perVcpu; $0.pattern = .random(seed: 9) })
        _ = try runVerified(config(.vcpuExit, backend: .soft) { $0.pattern = .read })
        _ = try runVerified(config(.uffdMinor, backend: .soft) { $0.pattern = .stride(pages: 3) })
    }
}

@Suite("Refusals")
struct RefusalTests {
    @Test func badConfigurationsThrowBeforeTouchingTheKernel() {
        for c in [config(.vcpuExit, vcpus: 0), config(.uffdMissing) { $0.backing = .guestMemfd },
                  config(.vcpuExit, vcpus: 64, kib: 64 << 10)] {
            #expect(throws: DemandPagingConfig.Invalid.self) { _ = try DemandPagingBenchmark(config: c) }
        }
    }
}

@Suite("vCPU errors")
struct VcpuErrorTests {
    @Test func aVcpuErrorNamesItsVcpuOnce() {
        let exit = DemandPagingError.unexpectedExit(vcpu: 1, exit: .hlt)
        #expect(DemandPagingError.onVcpu(1, exit) == "vcpu 1: unexpected exit \(VcpuExit.hlt)")
        let plain = SystemError("KVM_RUN", errno: 14)
        #expect(DemandPagingError.onVcpu(2, plain) == "vcpu 2: \(plain)")
        #expect(DemandPagingError.onVcpu(12, DemandPagingError.unexpectedExit(vcpu: 1, exit: .hlt)).hasPrefix("vcpu 12: vcpu 1: "),
                "another vCPU's name is not this one's")
    }
}

@Suite("Migration plumbing")
struct MigrationPlumbingTests {
    @Test func faultPathCPUParsesAndResolves() throws {
        #expect(FaultPathCPU(parsing: "auto") == .automatic)
        #expect(FaultPathCPU(parsing: "none") == .unpinned)
        #expect(FaultPathCPU(parsing: "3") == .cpu(3))
        #expect(FaultPathCPU(parsing: "-1") == nil && FaultPathCPU(parsing: "x") == nil)
        #expect(FaultPathCPU.unpinned.resolved == nil)
        let cpu = try #require(FaultPathCPU.automatic.resolved)
        #expect(cpu >= 0)
        // A thread pinned there runs there.
        final class Seen: @unchecked Sendable { var cpu: Int32 = -1 }
        let seen = Seen()
        let t = try OSThread(name: "pinned", cpu: cpu) { seen.cpu = ThreadScheduling.currentCPU() ?? -1 }
        t.join()
        #expect(seen.cpu == cpu)
    }

    @Test func theFaultConnectionDoesNotPace() throws {
        let listener = try ListeningSocket(endpoint: SocketEndpoint(parsing: "127.0.0.1:0")!)
        let client = try StreamSocket.connect(to: listener.endpoint)
        try client.preferLatency()
        #expect(client.congestionControl == "reno")
        _ = try listener.accept(timeoutSeconds: 5)
    }
}
