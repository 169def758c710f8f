import FaultlineLinux

/// What became of the CPU wake-up latency request a side makes for post-copy
/// (``PostcopyCPULatency``): reported, never fatal.
public struct CPULatencyOutcome: Sendable, Equatable {
    public init(requestedMicroseconds: Int32, held: Bool, error: String?) {
        self.requestedMicroseconds = requestedMicroseconds
        self.held = held
        self.error = error
    }

    /// The latency asked for, in microseconds.
    public var requestedMicroseconds: Int32
    /// The request was in place while post-copy ran.
    public var held: Bool
    /// Why it was not (the operation and errno).
    public var error: String?
}

/// While post-copy runs, every fault is a guest stall that waits for two or three thread
/// wake-ups (the source's fault server, the destination's receiver, the vCPU). A CPU that went
/// idle halts (or, on bare metal, enters a deep C-state), and waking it costs: on a virtualized
/// host a halted CPU is descheduled below. With `--postcopy-cpu-latency US` each side asks the
/// kernel, through PM QoS, to keep idle CPUs within `US` of waking for as long as post-copy
/// runs - with 0 they poll instead of halting - as latency-bound programs such as cyclictest
/// do. Off by default: on a host that is itself a guest, a polling CPU takes time from the
/// busy CPU below, and post-copy got slower with no shorter tail (docs/benchmarks.md,
/// "Demand-fault latency"). Without the privilege, or without PM QoS, the request is
/// reported as not held and post-copy runs as before, never a failed migration.
final class PostcopyCPULatency: @unchecked Sendable {
    private var request: CPULatencyRequest?
    private(set) var outcome: CPULatencyOutcome?

    /// Makes the request (nil `microseconds`: none, the option is off).
    func hold(microseconds: Int32?, path: String = CPULatencyRequest.defaultPath) {
        guard let microseconds, request == nil else { return }
        do {
            request = try CPULatencyRequest(microseconds: microseconds, path: path)
            outcome = CPULatencyOutcome(requestedMicroseconds: microseconds, held: true, error: nil)
        } catch {
            outcome = CPULatencyOutcome(requestedMicroseconds: microseconds, held: false, error: "\(error)")
            FaultlineLog.note("faultline: post-copy runs without a CPU latency request (\(error)); idle CPUs may halt, "
                              + "and waking them lengthens the fault tail")
        }
    }

    /// Withdraws the request (idempotent); the outcome stays for the report.
    func release() { request = nil }

    var isHeld: Bool { request != nil }
}
