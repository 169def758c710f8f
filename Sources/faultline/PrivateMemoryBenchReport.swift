import FaultlineEngine

/// `private --json` and `bench conversions --json`: one run of shared/private conversions in a
/// SW-protected VM, what it cost and what it verified (docs/reports.md, "private").
struct PrivateMemoryBenchReport: Codable, Sendable, Equatable {
    var implementation = "faultline"
    /// The discard policy's name, or "baseline" (no conversions, the loop alone).
    var discard: String
    /// Lazy discard only: pages batched per discard.
    var batchPages: UInt64?
    var bufferPages: UInt64
    var regionPages: UInt64
    var sharedBacking: String
    var hypercall: String
    var conversions: Int
    var guestConversions: Int
    var seconds: Double
    var conversionsPerSecond: Double
    var exits: Int
    var hypercalls: Int
    var hypercallsPerSecond: Double
    var microsecondsPerExitKVMRun: Double
    var microsecondsPerExitUserspace: Double
    var microsecondsPerConversion: PerConversion
    var discardCalls: Int
    var discardCallsAtEnd: Int
    var microsecondsPerDiscardCall: Double
    var discardedPrivatePages: UInt64
    var discardedSharedPages: UInt64
    var cancelledDiscardPages: UInt64
    var refused: Int
    var implicitConversions: Int
    var checkedObservations: Int
    var kept: ByState
    var discardedSeen: ByState
    var readbackMismatches: Int
    var readbacks: Int
    var verified: Bool

    /// Microseconds per conversion, by where they went.
    struct PerConversion: Codable, Sendable, Equatable {
        var setAttributes: Double
        var discard: Double
        var kvmRun: Double
        var userspace: Double
        var total: Double

        enum CodingKeys: String, CodingKey {
            case setAttributes = "set_attributes", discard, kvmRun = "kvm_run", userspace, total
        }
    }

    /// Observations of shared and of private pages.
    struct ByState: Codable, Sendable, Equatable {
        var shared: Int
        var `private`: Int
    }

    enum CodingKeys: String, CodingKey {
        case implementation, discard, batchPages = "batch_pages", bufferPages = "buffer_pages", regionPages = "region_pages"
        case sharedBacking = "shared_backing", hypercall, conversions, guestConversions = "guest_conversions", seconds
        case conversionsPerSecond = "conversions_per_sec", exits, hypercalls, hypercallsPerSecond = "hypercalls_per_sec"
        case microsecondsPerExitKVMRun = "us_per_exit_kvm_run", microsecondsPerExitUserspace = "us_per_exit_userspace"
        case microsecondsPerConversion = "us_per_conversion", discardCalls = "discard_calls", discardCallsAtEnd = "discard_calls_at_end"
        case microsecondsPerDiscardCall = "us_per_discard_call", discardedPrivatePages = "discarded_private_pages"
        case discardedSharedPages = "discarded_shared_pages", cancelledDiscardPages = "cancelled_discard_pages", refused
        case implicitConversions = "implicit_conversions", checkedObservations = "checked_observations", kept
        case discardedSeen = "discarded_seen", readbackMismatches = "readback_mismatches", readbacks, verified
    }

    init(_ r: PrivateMemoryReport) {
        let c = r.config, g = r.config.guest, k = r.costs
        /// Microseconds per call, 0 with no calls.
        func perCall(_ ns: UInt64, _ n: Int) -> Double { rounded(n > 0 ? Double(ns) / Double(n) / 1000 : 0, 2) }
        discard = g.baseline ? "baseline" : c.policy.name
        if case .lazy(let b) = c.policy { batchPages = b }
        bufferPages = g.bufferPages
        regionPages = g.regionPages
        sharedBacking = "\(c.sharedBacking)"
        hypercall = r.hypercallInstruction.rawValue
        conversions = k.conversions
        guestConversions = r.guestConversions
        seconds = rounded(r.seconds, 6)
        conversionsPerSecond = rounded(r.conversionsPerSecond, 0)
        exits = r.exits
        hypercalls = r.hypercalls
        hypercallsPerSecond = rounded(r.hypercallsPerSecond, 0)
        microsecondsPerExitKVMRun = perCall(r.kvmRunNanoseconds, r.exits)
        microsecondsPerExitUserspace = perCall(r.userspaceNanoseconds, r.exits)
        microsecondsPerConversion = PerConversion(
            setAttributes: perCall(k.attributeNanoseconds, k.conversions), discard: perCall(k.discardNanoseconds, k.conversions),
            kvmRun: perCall(r.kvmRunNanoseconds, k.conversions), userspace: perCall(r.userspaceNanoseconds, k.conversions),
            total: rounded(r.conversionsPerSecond > 0 ? 1e6 / r.conversionsPerSecond : 0, 2))
        discardCalls = k.discardCalls
        discardCallsAtEnd = r.discardCallsAtEnd
        microsecondsPerDiscardCall = perCall(k.discardNanoseconds, k.discardCalls)
        discardedPrivatePages = k.discardedPrivatePages
        discardedSharedPages = k.discardedSharedPages
        cancelledDiscardPages = r.cancelledDiscardPages
        refused = k.refused
        implicitConversions = k.implicitConversions
        checkedObservations = r.checkedObservations
        kept = ByState(shared: r.survivedShared, private: r.survivedPrivate)
        discardedSeen = ByState(shared: r.zeroShared, private: r.zeroPrivate)
        readbackMismatches = r.readbacks.reduce(0) { $0 + $1.mismatchCount }
        readbacks = r.readbacks.count
        verified = r.verified
    }
}
