/// What happens when pre-copy alone cannot finish the migration within the downtime target.
public enum PostcopyPolicy: String, Sendable, CaseIterable {
    /// Pure pre-copy: iterate until what is left fits the downtime target, then stop and copy
    /// it while the vCPUs are paused. A migration that does not converge fails (the guest
    /// keeps running on the source).
    case never
    /// Pre-copy while it converges; stop and copy when what is left fits the target, switch
    /// to post-copy when it cannot get there (QEMU's pre-copy with postcopy as the switch).
    case auto
    /// Run the pre-copy rounds asked for (bounded by time only), then always finish in post-copy.
    case always
}

/// One finished pre-copy round, as the source measured it.
public struct PrecopyRound: Sendable, Equatable {
    public var pagesSent: Int
    public var bytesSent: UInt64
    public var seconds: Double
    /// Pages the guest dirtied while the round ran (to send next).
    public var dirtyAfter: Int

    public init(pagesSent: Int, bytesSent: UInt64, seconds: Double, dirtyAfter: Int) {
        self.pagesSent = pagesSent
        self.bytesSent = bytesSent
        self.seconds = seconds
        self.dirtyAfter = dirtyAfter
    }

    /// Bytes per second this round achieved (nil when too short to tell).
    public var bandwidth: Double? { seconds > 0 && bytesSent > 0 ? Double(bytesSent) / seconds : nil }
}

/// Why pre-copy stopped iterating.
public enum PrecopyStop: Sendable, Equatable, CustomStringConvertible {
    /// What is left fits the downtime target at the measured bandwidth.
    case fitsDowntime(estimatedMilliseconds: Double)
    case roundLimit(Int)
    case timeLimit(Double)
    /// The dirty set did not shrink from one round to the next.
    case notShrinking(previous: Int, now: Int)
    /// No pre-copy round was possible (the reason, e.g. no dirty log on a guest_memfd memslot).
    case noPrecopy(String)

    public var description: String {
        switch self {
        case .noPrecopy(let why): "no pre-copy: \(why)"
        case .fitsDowntime(let ms): "the rest fits the downtime target (estimated \(formatted(ms)) ms)"
        case .roundLimit(let n): "round limit (\(n)) reached"
        case .timeLimit(let s): "time limit (\(formatted(s)) s) reached"
        case .notShrinking(let p, let n): "the dirty set stopped shrinking (\(p) -> \(n) pages)"
        }
    }

    /// A short machine-readable name (reports, JSON).
    public var name: String {
        switch self {
        case .fitsDowntime: "fits_downtime"
        case .roundLimit: "round_limit"
        case .timeLimit: "time_limit"
        case .notShrinking: "not_shrinking"
        case .noPrecopy: "no_precopy"
        }
    }

    private func formatted(_ v: Double) -> String { String(Double(Int(v * 100)) / 100) }
}

/// The policy's verdict after each round (and once before the first).
public enum PrecopyDecision: Sendable, Equatable {
    case nextRound
    /// Pause and send what is left while paused; no post-copy.
    case stopAndCopy(PrecopyStop)
    /// Pause, switch over, finish in post-copy.
    case postcopy(PrecopyStop)
    /// `--postcopy never` and pre-copy cannot converge: fail the attempt; the guest keeps running.
    case fail(PrecopyStop)
}

/// QEMU-style convergence: iterate while the dirty set shrinks; estimate the time to send what
/// remains from the bandwidth measured so far and compare it with the downtime target.
/// Pure: fed with measured rounds, unit-tested without a guest.
public struct ConvergencePolicy: Sendable, Equatable {
    public var postcopy: PostcopyPolicy
    /// The most pre-copy rounds to run.
    public var maxRounds: Int
    public var maxSeconds: Double
    public var maxDowntimeMilliseconds: Double

    public init(postcopy: PostcopyPolicy = .auto, maxRounds: Int, maxSeconds: Double = 10, maxDowntimeMilliseconds: Double = 300) {
        self.postcopy = postcopy
        self.maxRounds = maxRounds
        self.maxSeconds = maxSeconds
        self.maxDowntimeMilliseconds = maxDowntimeMilliseconds
    }

    /// The best bandwidth estimate: the total of every round (short rounds are noisy).
    public static func bandwidth(_ rounds: [PrecopyRound]) -> Double? {
        let bytes = rounds.reduce(UInt64(0)) { $0 + $1.bytesSent }
        let seconds = rounds.reduce(0.0) { $0 + $1.seconds }
        return seconds > 0 && bytes > 0 ? Double(bytes) / seconds : nil
    }

    /// Estimated milliseconds to send `pages` pages at the measured bandwidth (nil: unknown).
    public static func estimatedMilliseconds(pages: Int, pageSize: Int = 4096, rounds: [PrecopyRound]) -> Double? {
        if pages == 0 { return 0 }
        guard let bw = bandwidth(rounds) else { return nil }
        return Double(pages * pageSize) / bw * 1000
    }

    /// Whether a round still sending at `elapsed` seconds stops there: at the time limit, when
    /// post-copy can take what the round has not sent (as QEMU's switch to post-copy does not
    /// wait for an iteration to end). With `never` the rest would be copied while the guest is
    /// paused, so the round runs to its end.
    public func cutsRoundShort(elapsed: Double) -> Bool { postcopy != .never && elapsed >= maxSeconds }

    /// Decides after `rounds` (empty: before the first round), `elapsed` seconds into pre-copy.
    public func decide(rounds: [PrecopyRound], elapsed: Double) -> PrecopyDecision {
        if let last = rounds.last, postcopy != .always,
           let ms = Self.estimatedMilliseconds(pages: last.dirtyAfter, rounds: rounds), ms <= maxDowntimeMilliseconds {
            return .stopAndCopy(.fitsDowntime(estimatedMilliseconds: ms))
        }
        var stop: PrecopyStop?
        if rounds.count >= maxRounds { stop = .roundLimit(maxRounds) }
        else if elapsed >= maxSeconds { stop = .timeLimit(maxSeconds) }
        else if rounds.count >= 2, postcopy == .auto, rounds[rounds.count - 1].dirtyAfter >= rounds[rounds.count - 2].dirtyAfter {
            // `never` has no other way out, so it keeps trying until a limit; `always` runs the
            // rounds it was asked for; `auto` switches to post-copy.
            stop = .notShrinking(previous: rounds[rounds.count - 2].dirtyAfter, now: rounds[rounds.count - 1].dirtyAfter)
        }
        guard let stop else { return .nextRound }
        return postcopy == .never ? .fail(stop) : .postcopy(stop)
    }
}
