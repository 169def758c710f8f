import ArgumentParser
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation

extension RunningWorkloadKind: ExpressibleByArgument {}
extension PostcopyPolicy: ExpressibleByArgument {}

extension FaultPathCPU: ExpressibleByArgument {
    public init?(argument: String) { self.init(parsing: argument) }

    public var defaultValueDescription: String { argument }

    /// The spelling `--fault-cpu` accepts.
    var argument: String {
        switch self {
        case .automatic: "auto"
        case .unpinned: "none"
        case .cpu(let n): String(n)
        }
    }
}

/// `--fault-cpu`, shared by run, receive and demo.
let faultCPUHelp: ArgumentHelp = "CPU for the fault-path threads: auto (the last CPU allowed), none, or a number"

let faultAroundHelp: ArgumentHelp = "Pages asked for per post-copy fault: the faulting page and the missing ones after it (1 = the faulting page only)"
let postcopyNiceHelp: ArgumentHelp = "Niceness of the vCPU threads while post-copy runs (0-19; higher leaves more CPU to the page stream)"
let offFaultCPUHelp: ArgumentHelp = "While post-copy runs, keep the vCPU threads off the fault path's CPU (--fault-cpu), where another CPU is left"
let cpuLatencyHelp: ArgumentHelp = "While post-copy runs, hold a PM QoS request (/dev/cpu_dma_latency, needs root) that keeps idle CPUs within this many microseconds of waking: 0 makes them poll instead of halting; off (the default) makes no request"

/// `--postcopy-cpu-latency`: microseconds, or `off`.
struct CPULatencySetting: ExpressibleByArgument, Equatable {
    let microseconds: Int32?
    init(microseconds: Int32?) { self.microseconds = microseconds }
    init?(argument: String) {
        if argument == "off" { microseconds = nil; return }
        guard let us = Int32(argument), us >= 0 else { return nil }
        microseconds = us
    }
    var argument: String { microseconds.map(String.init) ?? "off" }
    var defaultValueDescription: String { argument }
    static let off = CPULatencySetting(microseconds: nil)
}

let preFaultHelp: ArgumentHelp = "KVM_PRE_FAULT_MEMORY (TDP hosts): map installed pages at the switch-over and all RAM after post-copy"
/// `--fault-mode`, shared by receive and demo.
let faultModeHelp: ArgumentHelp = "auto | vcpu-exit | uffd-missing | uffd-minor (auto: the best mode that works on this kernel)"

/// The source's hidden fault-injection flags (for tests), shared by `run` and `demo`.
struct SourceFaultInjection: ParsableArguments {
    @Option(name: .customLong("inject-disconnect-after-pages"), help: .hidden) var disconnectAfter: Int?
    @Option(name: .customLong("inject-precopy-disconnect-after-pages"), help: .hidden) var precopyDisconnectAfter: Int?
    @Flag(name: .customLong("inject-corrupt-page"), help: .hidden) var corruptPage = false
    @Flag(name: .customLong("inject-corrupt-precopy-page"), help: .hidden) var corruptPrecopyPage = false
    @Flag(name: .customLong("inject-missed-dirty-page"), help: .hidden) var missDirtyPage = false
    @Flag(name: .customLong("inject-protocol-violation"), help: .hidden) var protocolViolation = false
    /// Post-copy's background stream waits (at most 10 s) until this many pages were served on
    /// demand: a test of the demand path then takes it whatever the timing.
    @Option(name: .customLong("inject-hold-stream-until-demand-pages"), help: .hidden) var holdStreamUntilDemandPages: Int?
}

/// How the source migrates: pre-copy, convergence, retries. Shared by `run` and `demo`.
struct SourceMigrationArguments: ParsableArguments {
    @Option(name: .customLong("precopy-rounds"), help: "The most pre-copy rounds with dirty logging (0 = pure post-copy)")
    var precopyRounds = 0
    @Option(name: .customLong("precopy-seconds"), help: "Time bound for pre-copy") var precopySeconds = 10.0
    @Option(help: "never (pure pre-copy, stop-and-copy once the rest fits --max-downtime-ms) | auto (switch to post-copy when pre-copy cannot converge) | always (post-copy after the pre-copy rounds)")
    var postcopy: PostcopyPolicy = .auto
    @Option(name: .customLong("max-downtime-ms"), help: "Downtime target for stopping pre-copy (estimated from the measured bandwidth)")
    var maxDowntimeMs = 300.0
    @Option(help: "Attempts after the first when one fails before the switch-over (the guest keeps running meanwhile)")
    var retries = 0
    @Option(name: .customLong("reconnect-seconds"), help: "How long to retry a broken connection after the switch-over")
    var reconnectSeconds = 30.0
    @Option(name: .customLong("postcopy-cpu-latency"), help: cpuLatencyHelp) var postcopyCPULatency = CPULatencySetting.off
}

extension MigrationOptions {
    /// The source options both `run --migrate-to` and `demo` set.
    init(destination: SocketEndpoint, migration m: SourceMigrationArguments, progress: Bool, faultPathCPU: FaultPathCPU,
         injection: SourceFaultInjection) {
        self.init(destination: destination)
        precopyRounds = m.precopyRounds
        precopySeconds = m.precopySeconds
        postcopy = m.postcopy
        maxDowntimeMilliseconds = m.maxDowntimeMs
        retries = m.retries
        reconnectSeconds = m.reconnectSeconds
        postcopyCPULatencyMicroseconds = m.postcopyCPULatency.microseconds
        self.progress = progress && StandardError.isTerminal ? ProgressBar.draw : nil
        self.faultPathCPU = faultPathCPU
        disconnectAfterPages = injection.disconnectAfter
        disconnectDuringPrecopyAfterPages = injection.precopyDisconnectAfter
        corruptOnePage = injection.corruptPage
        corruptOnePrecopyPage = injection.corruptPrecopyPage
        missOneDirtyPage = injection.missDirtyPage
        violateProtocolAfterCommit = injection.protocolViolation
        holdStreamUntilDemandPages = injection.holdStreamUntilDemandPages
    }
}

/// Exit codes of `run` and `demo` for a migration that did not complete.
enum MigrationExit {
    /// Every attempt failed before the switch-over; the guest kept running on the source.
    static let failedBeforeSwitchover: Int32 = 3
    /// Failed after the switch-over (unrecoverable; the cause is reported by both sides).
    static let failedAfterSwitchover: Int32 = 4
}

/// Runs the source side with retries and reports a failure as the contract says: before the
/// switch-over, the guest's pass counter is shown to advance afterwards.
func migrateSource(_ vm: MigratableVM, options: MigrationOptions, baseline: Bool, json: Bool,
                   runAfterFailure: Double, onFailure: () -> Void = {}) -> (MigrationSource, SourceReport)? {
    do {
        var (source, report) = try SourceMigration.run(vm, options: options)
        if baseline { try source.measureBaseline(&report) }
        return (source, report)
    } catch let failed as MigrationFailedBeforeSwitchover {
        let passesAtFailure = vm.counters.totalPasses
        // Keep it running at least `runAfterFailure`, and until it completes a pass (a pass of a
        // big guest on a busy machine can take longer than that), at most 60 s.
        Thread.sleep(forTimeInterval: runAfterFailure)
        let patience = Date().addingTimeInterval(60)
        while vm.counters.totalPasses <= passesAtFailure && vm.error == nil && Date() < patience {
            Thread.sleep(forTimeInterval: 0.05)
        }
        let passesAfter = vm.counters.totalPasses
        let running = vm.error == nil && passesAfter > passesAtFailure
        let err = vm.stop()
        onFailure()
        if json {
            printJSON(FailedBeforeSwitchoverReport(error: "\(failed)", attempts: failed.causes.count, guestRunning: running,
                                                   passesAtFailure: passesAtFailure, passesAfterFailure: passesAfter))
        } else {
            print("migration failed before the switch-over after \(failed.causes.count) attempt(s); the guest "
                  + (running ? "kept running (\(passesAfter - passesAtFailure) passes in the \(runAfterFailure) s after the failure)"
                     : "did NOT keep running\(err.map { ": \($0)" } ?? "")"))
            for (i, c) in failed.causes.enumerated() { print("  attempt \(i + 1): \(c)") }
        }
        fflush(stdout)
        exit(MigrationExit.failedBeforeSwitchover)
    } catch {
        onFailure()
        if json {
            printJSON(FailureReport(side: "source", outcome: "failed_after_switchover", error: "\(error)"))
        }
        fputs("faultline: error: \(describe(error))\n", stderr)
        fflush(stdout)
        exit(MigrationExit.failedAfterSwitchover)
    }
}

/// Parses sizes like 512M, 1G, 65536K or plain bytes.
func parseSize(_ text: String) -> UInt64? {
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
    var t = text.uppercased()
    if t.hasSuffix("IB") { t.removeLast(2) } else if t.hasSuffix("B") { t.removeLast() }
    guard let last = t.last, let unit = units[last] else { return UInt64(t) }
    guard let count = UInt64(t.dropLast()) else { return nil }
    let (bytes, overflow) = count.multipliedReportingOverflow(by: unit)
    return overflow ? nil : bytes
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Boot a guest that keeps running; optionally migrate it to a `faultline receive`.")

    @Option(help: "Number of vCPUs") var vcpus = 2
    @Option(help: "Guest RAM, e.g. 512M or 1G") var memory = "512M"
    @Option(name: .customLong("guest-mode"), help: guestModeHelp) var guestMode: GuestModeChoice = .auto
    @Option(help: "dirtier | selfcheck | readmostly") var workload: RunningWorkloadKind = .selfcheck
    @Option(name: .customLong("working-set"), help: "dirtier, readmostly: pages per vCPU rewritten each pass (default: all)") var workingSet: Int?
    @Option(help: "Busy-loop iterations between page writes (lower = faster dirtying)") var spin: UInt32 = 0
    @Option(help: "dirtier: sequential | scattered (its working set spread over the chunk by a fixed permutation; the chunk must be a power of two pages)")
    var order: AccessOrder = .sequential
    @Flag(help: "dirtier: fill guest RAM with non-zero bytes before the boot, as a guest that has used all its memory holds it")
    var prefill = false
    @Option(name: .customLong("migrate-to"), help: "HOST:PORT of `faultline receive`") var migrateTo: String?
    @Option(name: .customLong("migrate-after"), help: "Seconds to run before migrating") var migrateAfter = 1.0
    @OptionGroup var migration: SourceMigrationArguments
    @Option(name: .customLong("run-seconds"), help: "Without --migrate-to: run this long, then stop") var runSeconds = 2.0
    @Option(name: .customLong("snapshot-to"), help: "Write a snapshot of the running guest into this folder (then stop it)") var snapshotTo: String?
    @Option(name: .customLong("snapshot-after"), help: "Seconds to run before the snapshot") var snapshotAfter = 1.0
    @Option(name: .customLong("run-after-failure"), help: "After a failed migration, keep the guest running this long (it is shown to advance)")
    var runAfterFailure = 1.0
    @Flag(help: "After the migration, time a plain TCP copy of the same non-zero bytes on the same link") var baseline = false
    @Option(name: .customLong("fault-cpu"), help: faultCPUHelp) var faultCPU: FaultPathCPU = .automatic
    @Flag(name: .customLong("pre-fault"), help: preFaultHelp) var preFault = false
    @Flag(help: "One JSON line") var json = false
    @OptionGroup var injection: SourceFaultInjection

    @OptionGroup(title: "Logging") var logging: LoggingArguments

    func run() {
        logging.apply()
        do {
            try HeapPolicy.keepHeapForFaultPath()
            let (layout, wl) = try migrationGuest(vcpus: vcpus, memory: memory, mode: guestMode, workload: workload,
                                                  workingSet: workingSet, spin: spin, order: order)
            let size = layout.ramSize
            var target: SocketEndpoint?
            if let migrateTo {
                guard let e = SocketEndpoint(parsing: migrateTo) else { throw CLIError(description: "cannot read --migrate-to '\(migrateTo)' (HOST:PORT)") }
                target = e
            }
            let (backend, why) = BackendSelection.resolve(nil)
            guard backend == .kvm else { throw CLIError(description: "`run` needs KVM: \(why)") }
            if !json { print("backend: kvm; guest: \(vcpus) vCPU(s), \(size >> 20) MiB, \(layout.mode) mode, workload \(workload)") }
            let vm = try MigratableVM(layout: layout, backing: .anonymous)
            try vm.boot(workload: wl)
            if prefill {
                guard workload == .dirtier else { throw CLIError(description: "--prefill needs --workload dirtier (selfcheck starts from zeroed memory)") }
                for page in layout.lowPages..<layout.totalPages { SourcePattern.fill(page: page, at: vm.pagePointer(page)) }
            }
            try vm.start()
            if let snapshotTo {
                guard target == nil else { throw CLIError(description: "--snapshot-to and --migrate-to cannot be combined") }
                try snapshotGuest(vm, to: snapshotTo, after: snapshotAfter, workload: workload.rawValue, json: json)
                return
            }
            guard let target else {
                Thread.sleep(forTimeInterval: runSeconds)
                let err = vm.stop()
                let mismatches = vm.counters.mismatches.load(ordering: .relaxed)
                print("ran \(runSeconds) s: \(vm.counters.totalPasses) passes, \(mismatches) guest mismatches")
                if let err { throw CLIError(description: err) }
                if mismatches > 0 { Foundation.exit(1) }
                return
            }
            Thread.sleep(forTimeInterval: migrateAfter)
            let options = MigrationOptions(destination: target, migration: migration, progress: !json,
                                           faultPathCPU: faultCPU, injection: injection)
            guard let (_, report) = migrateSource(vm, options: options, baseline: baseline, json: json,
                                                  runAfterFailure: runAfterFailure) else { return }
            _ = vm.stop()
            let document = SourceMigrationReport(report, standalone: true)
            if json { printJSON(document) } else { print(document.text) }
        } catch {
            fail(error)
        }
    }
}

struct Receive: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Receive a migrating VM and run it.")

    @Option(help: "HOST:PORT to listen on (port 0 picks one; it is printed)") var listen = "0.0.0.0:7077"
    @Option(name: .customLong("fault-mode"), help: faultModeHelp) var faultMode: FaultModeChoice = .auto
    @Option(name: .customLong("vm-type"), help: vmTypeHelp) var vmType: VMTypeChoice = .default
    @Option(help: "single | per-vcpu (uffd modes)") var uffd: UffdTopology = .single
    @Option(help: "Reader threads per userfaultfd (uffd modes)") var readers = 1
    @Option(name: .customLong("run-after"), help: "Seconds the guest keeps running after the migration") var runAfter = 1.0
    @Option(name: .customLong("accept-seconds"), help: "How long to wait for the source") var acceptSeconds = 60.0
    @Option(name: .customLong("reconnect-seconds"), help: "How long to wait for a reconnect") var reconnectSeconds = 30.0
    @Option(help: "Populate this much memory before the source connects, e.g. 1G (as QEMU's -mem-prealloc)") var prealloc: String?
    @Option(name: .customLong("fault-cpu"), help: faultCPUHelp) var faultCPU: FaultPathCPU = .automatic
    @Flag(name: .customLong("pre-fault"), help: preFaultHelp) var preFault = false
    @Option(name: .customLong("fault-around"), help: faultAroundHelp) var faultAround = 16
    @Option(name: .customLong("postcopy-vcpu-nice"), help: postcopyNiceHelp) var postcopyVcpuNice = OSThread.Niceness.vcpuDuringPostcopy
    @Flag(name: .customLong("postcopy-vcpus-off-fault-cpu"), inversion: .prefixedNo, help: offFaultCPUHelp) var vcpusOffFaultCPU = true
    @Option(name: .customLong("postcopy-cpu-latency"), help: cpuLatencyHelp) var postcopyCPULatency = CPULatencySetting.off
    @Flag(help: "One JSON line") var json = false
    @Option(name: .customLong("inject-damage-installed-page"), help: .hidden) var damagePage: Int?
    @Flag(name: .customLong("inject-fault-thread-failure"), help: .hidden) var failFaultThread = false
    @Option(name: .customLong("inject-exit-during-precopy-after-pages"), help: .hidden) var exitDuringPrecopy: Int?

    @OptionGroup(title: "Logging") var logging: LoggingArguments

    func run() {
        logging.apply()
        do {
            try HeapPolicy.keepHeapForFaultPath()
            guard let endpoint = SocketEndpoint(parsing: listen) else { throw CLIError(description: "cannot read --listen '\(listen)'") }
            let (mode, modeReason) = try FaultModeSelection.resolve(requested: faultMode, option: "--fault-mode")
            var options = DestinationOptions(listen: endpoint)
            options.faultMode = mode
            options.guestMemfdVM = vmType == .swProtected
            options.uffd = uffd
            options.readers = readers
            options.faultPathCPU = faultCPU
            options.runAfterSeconds = runAfter
            options.acceptSeconds = acceptSeconds
            options.reconnectSeconds = reconnectSeconds
            options.damageInstalledPage = damagePage
            options.failFaultPathThread = failFaultThread
            options.exitDuringPrecopyAfterPages = exitDuringPrecopy
            options.preFault = preFault
            options.faultAround = faultAround
            options.vcpuNicenessDuringPostcopy = postcopyVcpuNice
            options.vcpusOffFaultCPU = vcpusOffFaultCPU
            options.postcopyCPULatencyMicroseconds = postcopyCPULatency.microseconds
            if let prealloc {
                guard let bytes = parseSize(prealloc) else { throw CLIError(description: "cannot read --prealloc '\(prealloc)'") }
                options.preallocBytes = bytes
            }
            let (backend, why) = BackendSelection.resolve(nil)
            guard backend == .kvm else { throw CLIError(description: "`receive` needs KVM: \(why)") }
            let destination = try MigrationDestination(options: options)
            let report: DestinationReport
            do {
                report = try destination.run { bound in
                    print("listening on \(bound)")
                    fflush(stdout)
                }
            } catch let error as MigrationError {
                if case .unrecoverable = error {
                    if json { printJSON(FailureReport(side: "destination", outcome: "failed_after_switchover", error: describe(error))) }
                    fputs("faultline: error: \(describe(error))\n", stderr)
                    fflush(stdout)
                    Foundation.exit(MigrationExit.failedAfterSwitchover)
                }
                throw error
            }
            let document = DestinationMigrationReport(report, faultModeReason: modeReason, standalone: true)
            if json { printJSON(document) } else { print(document.text) }
            if !report.digestMatch || report.guestMismatches > 0 {
                if !report.digestMatch { fputs("faultline: error: memory digest mismatch (computed from destination memory)\n", stderr) }
                Foundation.exit(1)
            }
        } catch {
            fail(error)
        }
    }
}

/// `run --snapshot-to`: lets the guest run, pauses it, writes the snapshot, stops the guest.
func snapshotGuest(_ vm: MigratableVM, to folder: String, after seconds: Double, workload: String, json: Bool) throws {
    Thread.sleep(forTimeInterval: seconds)
    let t0 = MonotonicClock.nanoseconds()
    vm.pause()
    let pausedMilliseconds = Double(MonotonicClock.nanoseconds() - t0) / 1e6
    let passes = vm.counters.totalPasses
    let report = try SnapshotWriter.write(vm, to: folder, workload: workload)
    let err = vm.stop()
    let mismatches = vm.counters.mismatches.load(ordering: .relaxed)
    if json {
        print(try jsonLine(Merged(report, SnapshotWrittenFields(passesBeforeSnapshot: passes, guestMismatches: UInt64(mismatches),
                                                                pauseMilliseconds: rounded(pausedMilliseconds, 6)))))
    } else {
        print("snapshot written to \(folder): \(report.pages) pages, \(report.dataPages) with data (\(report.bytesWritten >> 20) MiB), "
              + "in \(report.seconds) s; the guest had run \(passes) passes, \(mismatches) mismatches")
    }
    if let err { throw CLIError(description: err) }
    if mismatches > 0 { throw CLIError(description: "the guest reported \(mismatches) mismatches before the snapshot") }
}
