import ArgumentParser
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation

/// The main job: a live migration between two processes on loopback, with defaults.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Migrate a running guest between two processes on loopback and print the report.")

    @Option(help: "Number of vCPUs") var vcpus = 2
    @Option(help: "Guest RAM") var memory = "512M"
    @Option(name: .customLong("guest-mode"), help: guestModeHelp) var guestMode: GuestModeChoice = .auto
    @Option(help: "dirtier | selfcheck | readmostly") var workload: RunningWorkloadKind = .selfcheck
    @Option(name: .customLong("working-set"), help: "dirtier, readmostly: pages per vCPU rewritten each pass (default: all)") var workingSet: Int?
    @Option(name: .customLong("fault-mode"), help: faultModeHelp) var faultMode: FaultModeChoice = .auto
    @Option(help: "single | per-vcpu (uffd modes)") var uffd: UffdTopology = .single
    @Option(name: .customLong("precopy-rounds"), help: "The most pre-copy rounds before the switch-over") var precopyRounds = 1
    @Option(name: .customLong("vm-type"), help: vmTypeHelp) var vmType: VMTypeChoice = .default
    @Option(name: .customLong("private-pages"), help: "sw-protected: make the first N RAM pages private (KVM_SET_MEMORY_ATTRIBUTES) before migrating")
    var privatePages = 0
    @Option(name: .customLong("precopy-seconds"), help: "Time bound for pre-copy") var precopySeconds = 10.0
    @Option(help: "never | auto | always (see `run --help`)") var postcopy: PostcopyPolicy = .auto
    @Option(name: .customLong("max-downtime-ms"), help: "Downtime target for stopping pre-copy") var maxDowntimeMs = 300.0
    @Option(help: "Attempts after the first when one fails before the switch-over") var retries = 0
    @Option(name: .customLong("inject-damage-installed-page"), help: .hidden) var damagePage: Int?
    @Flag(name: .customLong("inject-fault-thread-failure"), help: .hidden) var failFaultThread = false
    @Option(name: .customLong("migrate-after"), help: "Seconds the guest runs on the source first") var migrateAfter = 1.0
    @Option(name: .customLong("run-after"), help: "Seconds the guest runs on the destination afterwards") var runAfter = 1.0
    @Flag(help: "Also time a plain TCP copy of the same non-zero bytes") var baseline = false
    @Flag(help: "Let the destination populate its memory before the migration starts (QEMU's -mem-prealloc)") var prealloc = false
    @Flag(name: .customLong("pre-fault"), help: preFaultHelp) var preFault = false
    @Option(name: .customLong("fault-around"), help: faultAroundHelp) var faultAround = 16
    @Option(name: .customLong("postcopy-vcpu-nice"), help: postcopyNiceHelp) var postcopyVcpuNice = OSThread.Niceness.vcpuDuringPostcopy
    @Flag(name: .customLong("postcopy-vcpus-off-fault-cpu"), inversion: .prefixedNo, help: offFaultCPUHelp) var vcpusOffFaultCPU = true
    @Option(name: .customLong("postcopy-cpu-latency"), help: cpuLatencyHelp) var postcopyCPULatency = CPULatencySetting.off
    @Flag(help: "One JSON line with both sides' figures") var json = false
    @Option(name: .customLong("fault-cpu"), help: faultCPUHelp) var faultCPU: FaultPathCPU = .automatic
    @OptionGroup var injection: SourceFaultInjection
    @Option(name: .customLong("chaos-seed"), help: .hidden) var chaosSeed: UInt64?
    @Option(name: .customLong("chaos-events"), help: .hidden) var chaosEvents = 3
    @Option(name: .customLong("chaos-event"), help: .hidden) var chaosEventSpecs: [String] = []

    @OptionGroup(title: "Logging") var logging: LoggingArguments

    func run() {
        logging.apply()
        do {
            try HeapPolicy.keepHeapForFaultPath()
            let (backend, why) = BackendSelection.resolve(nil)
            guard backend == .kvm else { throw CLIError(description: "the migration demo needs KVM: \(why)") }
            let (mode, modeReason) = try FaultModeSelection.resolve(requested: faultMode, option: "--fault-mode")
            // The destination's post-copy knobs, checked as `receive` checks them, before it is spawned.
            var knobs = DestinationOptions(listen: SocketEndpoint(host: "127.0.0.1", port: 0))
            knobs.faultAround = faultAround
            knobs.vcpuNicenessDuringPostcopy = postcopyVcpuNice
            try knobs.validate()
            let (layout, wl) = try migrationGuest(vcpus: vcpus, memory: memory, mode: guestMode, workload: workload,
                                                  workingSet: workingSet)
            let size = layout.ramSize
            let gmem = vmType == .swProtected
            guard privatePages == 0 || gmem else { throw CLIError(description: "--private-pages needs --vm-type sw-protected") }

            // The source's VM first: a guest_memfd VM's migration is planned (or refused) from
            // its memory before anything else starts.
            let vm = try MigratableVM(layout: layout, backing: .anonymous, guestMemfdRAM: gmem)
            if privatePages > 0 { try vm.setPrivate(ramPages: 0..<privatePages) }
            let plan = gmem ? planGuestMemfdMigration(vm, precopyRounds: precopyRounds, postcopy: postcopy, faultMode: mode,
                                                      json: json) : nil

            // The destination: a second process.
            let child = Process()
            child.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
            var arguments = ["receive", "--listen", "127.0.0.1:0", "--json", "--fault-mode", gmem ? mode.rawValue : faultMode.argument,
                             "--vm-type", vmType.rawValue,
                             "--uffd", uffd.rawValue, "--run-after", String(runAfter), "--accept-seconds", "60",
                             "--fault-cpu", faultCPU.argument, "--fault-around", String(faultAround),
                             "--postcopy-vcpu-nice", String(postcopyVcpuNice), "--postcopy-cpu-latency", postcopyCPULatency.argument]
            if !vcpusOffFaultCPU { arguments.append("--no-postcopy-vcpus-off-fault-cpu") }
            if prealloc { arguments += ["--prealloc", String(size)] }
            if preFault { arguments.append("--pre-fault") }
            if let damagePage { arguments += ["--inject-damage-installed-page", String(damagePage)] }
            if failFaultThread { arguments.append("--inject-fault-thread-failure") }
            child.arguments = arguments
            let out = Pipe()
            child.standardOutput = out
            try child.run()
            let reader = out.fileHandleForReading
            var firstLine = ""
            while !firstLine.hasSuffix("\n") {
                let byte = reader.readData(ofLength: 1)
                if byte.isEmpty { throw CLIError(description: "the destination process exited before listening") }
                firstLine += String(decoding: byte, as: UTF8.self)
            }
            guard let endpoint = SocketEndpoint(parsing: firstLine.replacingOccurrences(of: "listening on ", with: "")
                .trimmingCharacters(in: .whitespacesAndNewlines)) else {
                throw CLIError(description: "unexpected destination output: \(firstLine)")
            }
            if !json {
                print("backend: kvm; demo: \(vcpus) vCPU(s), \(size >> 20) MiB, \(layout.mode) mode, workload \(workload), fault mode \(mode) "
                      + "(\(modeReason)), "
                      + "\(precopyRounds) pre-copy round(s); destination pid \(child.processIdentifier) on \(endpoint)")
                if let plan { print(plan.human) }
            }

            // Chaos (`bench chaos`): a proxy between the two sides carries out a seeded schedule.
            var chaos: ChaosProxy?
            var target = endpoint
            var retries = retries
            var needsAFault = false
            if chaosSeed != nil || !chaosEventSpecs.isEmpty {
                // Explicit events (`--chaos-event PHASE:ROLE:DIRECTION:FRAME:ACTION[:BIT]`) keep `--retries`.
                let explicit = try chaosEventSpecs.map { spec in
                    guard let e = ChaosEvent(spec: spec) else { throw CLIError(description: "cannot read --chaos-event '\(spec)'") }
                    return e
                }
                // A forced event on the fault connection after the commit rides on a page
                // request: there must be one, even when the stream would outrun every fault.
                needsAFault = explicit.contains { $0.role == .fault && ($0.phase == .postcopy || $0.phase == .completion) }
                let schedule = explicit.isEmpty
                    ? ChaosSchedule.generate(seed: chaosSeed ?? 0, vcpus: vcpus, maxEvents: chaosEvents)
                    : ChaosSchedule(seed: 0, events: explicit, retries: retries)
                let proxy = try ChaosProxy(upstream: endpoint, schedule: schedule)
                retries = schedule.retries
                target = proxy.endpoint
                chaos = proxy
                FaultlineLog.note("faultline demo: chaos schedule \(schedule)")
            }
            let printChaos = {
                guard let chaos else { return }
                chaos.stop()
                printJSON(ChaosProxyReport(chaos.summary))
            }

            // The source: this process.
            try vm.boot(workload: wl)
            try vm.start()
            Thread.sleep(forTimeInterval: migrateAfter)
            var migration = try SourceMigrationArguments.parse([])
            migration.precopyRounds = precopyRounds
            migration.precopySeconds = precopySeconds
            migration.postcopy = postcopy
            migration.maxDowntimeMs = maxDowntimeMs
            migration.retries = retries
            migration.postcopyCPULatency = postcopyCPULatency
            var options = MigrationOptions(destination: target, migration: migration, progress: !json,
                                           faultPathCPU: faultCPU, injection: injection)
            if let plan, plan.path == .stopAndCopy { options.immediateStopAndCopy = plan.reason }
            if needsAFault { options.holdStreamUntilDemandPages = max(options.holdStreamUntilDemandPages ?? 0, 1) }
            let terminateChild = {
                printChaos()
                if child.isRunning { child.terminate() }
            }
            guard let (_, report) = migrateSource(vm, options: options, baseline: baseline, json: json,
                                                  runAfterFailure: 1, onFailure: terminateChild) else { return }
            _ = vm.stop()
            let rest = String(decoding: reader.readDataToEndOfFile(), as: UTF8.self)
            child.waitUntilExit()
            printChaos()
            let destinationLine = rest.split(separator: "\n").last(where: { $0.hasPrefix("{") }).map(String.init)
            guard let destinationLine, var destination = try? decodeJSONLine(DestinationMigrationReport.self, from: destinationLine) else {
                throw CLIError(description: "the destination process failed (exit \(child.terminationStatus))")
            }
            let digestMatch = destination.digestMatch
            let guestCheck = destination.guestCheck && report.guestMismatchesBeforeMigration == 0
            destination.side = nil
            destination.guestCheck = guestCheck
            let demo = DemoReport(source: SourceMigrationReport(report, standalone: false), guestMemfdPlan: plan?.report(ran: report),
                                  destination: destination)
            if json {
                printJSON(demo)
            } else {
                print(demo.text(guestMemfdPlan: plan.map { $0.human(ran: report) }))
            }
            if child.terminationStatus != 0 || !digestMatch || !guestCheck { Foundation.exit(1) }
        } catch {
            fail(error)
        }
    }
}
