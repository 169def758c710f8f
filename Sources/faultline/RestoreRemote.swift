import ArgumentParser
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation

/// `restore`'s options for a snapshot a `serve-snapshot` server serves, and for chaos on a
/// restore's connections (`bench chaos --path restore`).
struct RemoteRestoreArguments: ParsableArguments {
    @Option(help: "HOST:PORT of a `faultline serve-snapshot`: the snapshot it serves, fetched while the guest runs (instead of a local one)")
    var from: String?
    @Option(help: "With --from: the name of a snapshot folder inside the server's folder (default: the server's folder itself)")
    var snapshot: String?
    @Option(help: "Sessions the snapshot side may start after one fails before the restored guest started")
    var retries = 0
    @Option(name: .customLong("reconnect-seconds"), help: "How long to wait for the snapshot side to reconnect after a cut, once the guest runs")
    var reconnectSeconds = 30.0
    @Option(name: .customLong("chaos-seed"), help: .hidden) var chaosSeed: UInt64?
    @Option(name: .customLong("chaos-events"), help: .hidden) var chaosEvents = 3
    @Option(name: .customLong("chaos-event"), help: .hidden) var chaosEventSpecs: [String] = []

    /// Restores from the folder or from the server, with chaos between the snapshot side and
    /// the new guest when asked for (its summary is printed as one JSON line, whatever the end).
    /// `opened`: the folder's snapshot, if the caller has opened it already.
    func restore(folder: String?, opened: Snapshot? = nil, options: SnapshotRestore.Options, started: UInt64) throws -> RestoreReport {
        try withChaos(options) { options in
            if let from {
                guard folder == nil else { throw CLIError(description: "give a snapshot folder or --from HOST:PORT, not both") }
                return try SnapshotRestore.run(from: try server(from), snapshot: snapshot, options: options, started: started)
            }
            return try restoreLocal(folder: folder, opened: opened, options: options, started: started)
        }
    }

    /// The server `--from` names.
    func server(_ text: String) throws -> SocketEndpoint {
        guard let server = SocketEndpoint(parsing: text), server.port != 0 else {
            throw CLIError(description: "cannot read --from '\(text)' (HOST:PORT)")
        }
        return server
    }

    /// Runs `body` with `options` set for `--retries` and, when asked for, chaos between the
    /// snapshot side and this one (its summary is printed as one JSON line, whatever the end).
    func withChaos<T>(_ options: SnapshotRestore.Options, _ body: (SnapshotRestore.Options) throws -> T) throws -> T {
        var options = options
        options.retries = retries
        guard reconnectSeconds > 0 else { throw CLIError(description: "--reconnect-seconds must be positive") }
        options.destination.reconnectSeconds = reconnectSeconds
        let chaos = try chaosSchedule(vcpus: nil)
        let proxy = Locked<ChaosProxy?>(nil)
        if let chaos {
            options.retries = chaos.retries
            options.dialThrough = { guest in
                let p = try ChaosProxy(upstream: guest, schedule: chaos, host: guest.host)
                proxy.withLock { $0 = p }
                FaultlineLog.note("faultline: chaos schedule \(chaos)")
                return p.endpoint
            }
        }
        defer {
            if let p = proxy.withLock({ $0 }) {
                p.stop()
                printJSON(ChaosProxyReport(p.summary))
                fflush(stdout)
            }
        }
        return try body(options)
    }

    func restoreLocal(folder: String?, opened: Snapshot?, options: SnapshotRestore.Options, started: UInt64) throws -> RestoreReport {
        guard let folder else { throw CLIError(description: "restore needs a snapshot folder or --from HOST:PORT") }
        guard snapshot == nil else { throw CLIError(description: "--snapshot names a snapshot on a server: it needs --from") }
        return try SnapshotRestore.run(opened ?? Snapshot(folder: folder), options: options, started: started)
    }

    /// The chaos schedule asked for: explicit events (`--chaos-event`, with `--retries`) or a
    /// seeded one without pre-copy events (a restore has no pre-copy).
    func chaosSchedule(vcpus: Int?) throws -> ChaosSchedule? {
        guard chaosSeed != nil || !chaosEventSpecs.isEmpty else { return nil }
        let explicit = try chaosEventSpecs.map { spec in
            guard let e = ChaosEvent(spec: spec) else { throw CLIError(description: "cannot read --chaos-event '\(spec)'") }
            return e
        }
        return explicit.isEmpty
            ? ChaosSchedule.generate(seed: chaosSeed ?? 0, vcpus: vcpus ?? 2, maxEvents: chaosEvents, precopy: false)
            : ChaosSchedule(seed: 0, events: explicit, retries: retries)
    }
}

/// Exit codes of `restore` for a restore that did not complete.
enum RestoreExit {
    /// The restored guest never ran (the snapshot side failed or was cut before the commit).
    static let failedBeforeStart: Int32 = 3
    /// The restored guest had started and was stopped (the cause is reported).
    static let failedAfterStart: Int32 = 4
}

/// Reports a failed restore - one JSON line with `--json`, the error on stderr - and exits:
/// 3 when the restored guest never ran, 4 when it had started, 2 for a refusal or bad input.
func restoreFailed(_ error: Error, json: Bool) -> Never {
    let (outcome, code): (String, Int32) = switch error {
    case let failed as RestoreFailed:
        failed.guestStarted ? ("failed_after_start", RestoreExit.failedAfterStart) : ("failed_before_start", RestoreExit.failedBeforeStart)
    case is RestoreRefused: ("refused", 2)
    default: ("failed", 2)
    }
    if json {
        printJSON(FailureReport(side: "restore", outcome: outcome, error: "\(error)"))
        fflush(stdout)
    }
    fputs("faultline: error: \(describe(error))\n", stderr)
    exit(code)
}
