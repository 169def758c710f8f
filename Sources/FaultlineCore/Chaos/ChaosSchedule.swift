/// A seeded chaos schedule for a migration: which frames of which connection, in which phase,
/// get a bit flipped or the connection cut. Pure and deterministic: the same seed gives the
/// same schedule everywhere, so a failing schedule is reproduced by its seed alone.

/// SplitMix64: a small, well-mixed generator whose whole state is one seed.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// The way a frame travels through the proxy.
public enum ChaosDirection: String, Sendable, CaseIterable {
    case toDestination = "to_destination"
    case toSource = "to_source"
}

/// What happens to the frame an event fires on.
public enum ChaosAction: String, Sendable, CaseIterable {
    /// The connection is cut before the frame is forwarded (both ends see it close).
    case cut
    /// Both connections of the session are cut before the frame is forwarded.
    case cutBoth = "cut_both"
    /// One bit of the 20-byte frame header is flipped.
    case flipHeaderBit = "flip_header_bit"
    /// One bit of the payload outside page data is flipped (descriptors, control fields).
    case flipPayloadBit = "flip_payload_bit"
    /// One bit of one data page's bytes is flipped (the frame must carry a data page; the
    /// event waits for the next frame of its kind that does).
    case flipPageDataBit = "flip_page_data_bit"
}

/// One event: on the `frame`-th frame (counted from 0) that crosses `role` in `direction`
/// while the migration is in `phase`, do `action`. `bit` picks the bit to flip, taken modulo
/// the bits that are eligible in that frame.
public struct ChaosEvent: Equatable, Sendable, CustomStringConvertible {
    public var phase: MigrationPhase
    public var role: ConnectionRole
    public var direction: ChaosDirection
    public var frame: Int
    public var action: ChaosAction
    public var bit: UInt64

    public init(phase: MigrationPhase, role: ConnectionRole, direction: ChaosDirection, frame: Int,
                action: ChaosAction, bit: UInt64 = 0) {
        self.phase = phase
        self.role = role
        self.direction = direction
        self.frame = frame
        self.action = action
        self.bit = bit
    }

    /// True when the event hits the session before the source committed: an attempt it
    /// disturbs must fail cleanly, leaving the source guest running.
    public var isBeforeCommit: Bool { phase.isBeforeCommit }

    public var description: String {
        "\(action.rawValue) on \(role) \(direction.rawValue) frame \(frame) of \(phase.rawValue)"
    }

    /// The spelling `--chaos-event` takes: `PHASE:ROLE:DIRECTION:FRAME:ACTION[:BIT]`,
    /// e.g. `completion:bulk:to_source:0:cut`.
    public var spec: String { "\(phase.rawValue):\(role):\(direction.rawValue):\(frame):\(action.rawValue):\(bit)" }

    public init?(spec: String) {
        let parts = spec.split(separator: ":").map(String.init)
        guard parts.count == 5 || parts.count == 6,
              let phase = MigrationPhase(rawValue: parts[0]),
              let role = ConnectionRole.allCases.first(where: { "\($0)" == parts[1] }),
              let direction = ChaosDirection(rawValue: parts[2]),
              let frame = Int(parts[3]), frame >= 0,
              let action = ChaosAction(rawValue: parts[4]) else { return nil }
        let bit = parts.count == 6 ? UInt64(parts[5]) : 0
        guard let bit else { return nil }
        self.init(phase: phase, role: role, direction: direction, frame: frame, action: action, bit: bit)
    }
}

public struct ChaosSchedule: Equatable, Sendable, CustomStringConvertible {
    public let seed: UInt64
    public let events: [ChaosEvent]
    /// Attempts the source may add after a failed one (`--retries`).
    public let retries: Int

    public init(seed: UInt64, events: [ChaosEvent], retries: Int) {
        self.seed = seed
        self.events = events
        self.retries = retries
    }

    /// Where frames flow in each phase, and how many of them a small guest is sure to send
    /// there (events are placed below these counts so that they fire). The commit frame is the
    /// last frame of the switch-over towards the destination; the source has committed once it
    /// sends it, so events from it on count as after the commit (see `ChaosPhaseTracker`).
    static func lanes(vcpus: Int) -> [(MigrationPhase, ConnectionRole, ChaosDirection, Int)] {
        [
            (.precopy, .bulk, .toDestination, 16),
            (.precopy, .bulk, .toSource, 1),  // the first round's `roundStored` ack
            (.switchover, .bulk, .toDestination, vcpus + 2),  // vCPU states, low memory, summary
            (.switchover, .bulk, .toSource, 1),  // ready
            (.postcopy, .bulk, .toDestination, 24),  // the commit, then the background stream
            (.postcopy, .fault, .toSource, 4),  // page requests (the guest faults at once)
            (.postcopy, .fault, .toDestination, 4),  // page replies
            (.completion, .bulk, .toDestination, 3),  // digest, complete, verdict received
            (.completion, .bulk, .toSource, 1),  // the verdict
        ]
    }

    /// A schedule of 1 to `maxEvents` events in the lanes above (a phase drawn uniformly, then
    /// one of its lanes), and 0 to 2 retries. `precopy: false` (a restore, which has no
    /// pre-copy) leaves that phase out.
    public static func generate(seed: UInt64, vcpus: Int, maxEvents: Int = 3, precopy: Bool = true) -> ChaosSchedule {
        var rng = SplitMix64(seed: seed)
        let lanes = lanes(vcpus: vcpus)
        let count = 1 + Int(rng.next() % UInt64(max(1, maxEvents)))
        var events: [ChaosEvent] = []
        let phases: [MigrationPhase] = precopy ? [.precopy, .switchover, .postcopy, .completion] : [.switchover, .postcopy, .completion]
        for _ in 0..<count {
            // A phase first (each as likely as the others), then one of its lanes.
            let chosen = phases[Int(rng.next() % UInt64(phases.count))]
            let inPhase = lanes.filter { $0.0 == chosen }
            let (phase, role, direction, frames) = inPhase[Int(rng.next() % UInt64(inPhase.count))]
            let carriesPages = direction == .toDestination && phase != .completion
            let actions: [ChaosAction] = carriesPages
                ? [.cut, .cutBoth, .flipHeaderBit, .flipPayloadBit, .flipPageDataBit]
                : [.cut, .cutBoth, .flipHeaderBit, .flipPayloadBit]
            let action = actions[Int(rng.next() % UInt64(actions.count))]
            let frame = Int(rng.next() % UInt64(frames))
            let event = ChaosEvent(phase: phase, role: role, direction: direction, frame: frame, action: action,
                                   bit: rng.next())
            // One event per frame: a second one there would never be seen.
            if !events.contains(where: { $0.phase == phase && $0.role == role && $0.direction == direction && $0.frame == frame }) {
                events.append(event)
            }
        }
        let retries = Int(rng.next() % 3)
        return ChaosSchedule(seed: seed, events: events, retries: retries)
    }

    public var description: String {
        "seed \(seed), retries \(retries): " + events.map(\.description).joined(separator: "; ")
    }
}
