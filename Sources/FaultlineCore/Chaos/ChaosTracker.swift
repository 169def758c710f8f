/// The decision half of the chaos proxy, with no sockets: it follows the session's phase from
/// the frames it is shown and says what to do with each (forward, cut, or flip one bit).
public struct ChaosTracker: Sendable {
    public enum Decision: Equatable, Sendable {
        case forward
        /// Cut this connection (`both`: and the other connection of the session) before the frame.
        case cut(both: Bool)
        /// Flip `mask` in the frame's byte at `offset` (counted from the header's first byte).
        case flip(offset: Int, mask: UInt8)
    }

    /// One event that fired: where, on which attempt (1 = the first session).
    public struct Firing: Equatable, Sendable {
        public let event: ChaosEvent
        public let attempt: Int
        public let frameType: UInt16
    }

    public let schedule: ChaosSchedule
    public private(set) var phase = MigrationPhase.handshake
    public private(set) var sessionID: UInt64?
    /// Sessions seen so far (each new session id is a new attempt of the source).
    public private(set) var attempts = 0
    public private(set) var fired: [Firing] = []
    private var pending: [ChaosEvent]
    private var counts: [String: Int] = [:]

    public init(schedule: ChaosSchedule) {
        self.schedule = schedule
        pending = schedule.events
    }

    /// Attempts in which an event fired before the commit. Each such attempt must fail cleanly;
    /// the migration can complete only when they number at most `schedule.retries`.
    public var disturbedAttemptsBeforeCommit: Int {
        Set(fired.filter { $0.event.isBeforeCommit }.map(\.attempt)).count
    }

    /// The events that never found their frame (the migration was shorter than they needed).
    public var unfired: [ChaosEvent] { pending }

    /// Shown every whole frame (header and payload as received, unchanged) before it is forwarded.
    public mutating func decide(role: ConnectionRole, direction: ChaosDirection, frame: UnsafeRawBufferPointer) -> Decision {
        guard frame.count >= WireProtocol.headerSize else { return .forward }
        let type = UInt16(frame[4]) | UInt16(frame[5]) << 8
        let payload = UnsafeRawBufferPointer(rebasing: frame[WireProtocol.headerSize...])
        if role == .bulk && direction == .toDestination { advancePhase(type: type, payload: payload) }
        let key = "\(phase.rawValue)/\(role)/\(direction.rawValue)"
        let index = counts[key, default: 0]
        counts[key] = index + 1
        guard let at = pending.firstIndex(where: {
            $0.phase == phase && $0.role == role && $0.direction == direction && $0.frame <= index
        }) else { return .forward }
        let event = pending[at]
        let decision: Decision
        switch event.action {
        case .cut: decision = .cut(both: false)
        case .cutBoth: decision = .cut(both: true)
        case .flipHeaderBit: decision = Self.flip(bit: event.bit, in: 0..<WireProtocol.headerSize)
        case .flipPayloadBit:
            let ranges = ChaosFrameLayout.controlRanges(type: type, payload: payload)
            decision = ranges.isEmpty ? Self.flip(bit: event.bit, in: 0..<WireProtocol.headerSize)
                : Self.flip(bit: event.bit, in: ranges)
        case .flipPageDataBit:
            let ranges = ChaosFrameLayout.pageDataRanges(type: type, payload: payload)
            guard !ranges.isEmpty else { return .forward }  // waits for a frame that carries page data
            decision = Self.flip(bit: event.bit, in: ranges)
        }
        pending.remove(at: at)
        fired.append(Firing(event: event, attempt: attempts, frameType: type))
        return decision
    }

    mutating func advancePhase(type: UInt16, payload: UnsafeRawBufferPointer) {
        switch WireProtocol.MessageType(rawValue: type) {
        case .hello:
            guard payload.count >= 16 else { return }
            let session = payload.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
            if session != sessionID {
                sessionID = session
                attempts += 1
                phase = .handshake
            }
        case .pages where phase == .handshake: phase = .precopy
        case .vcpuState: phase = .switchover
        case .ack:
            // The commit: the source decided when it sent it, so its own frame counts as after.
            if payload.count == 8, payload.loadUnaligned(as: UInt64.self).littleEndian == SessionAck.commit { phase = .postcopy }
        case .digest: phase = .completion
        default: break
        }
    }

    /// Frame byte offsets are header-relative: payload ranges are shifted by the header size.
    public static func flip(bit: UInt64, in ranges: [Range<Int>]) -> Decision {
        let total = ranges.reduce(0) { $0 + $1.count * 8 }
        var pick = Int(bit % UInt64(total))
        for r in ranges {
            if pick < r.count * 8 {
                return .flip(offset: WireProtocol.headerSize + r.lowerBound + pick / 8, mask: UInt8(1) << (pick % 8))
            }
            pick -= r.count * 8
        }
        return .forward  // unreachable: pick < total
    }

    public static func flip(bit: UInt64, in header: Range<Int>) -> Decision {
        let pick = Int(bit % UInt64(header.count * 8))
        return .flip(offset: header.lowerBound + pick / 8, mask: UInt8(1) << (pick % 8))
    }
}

/// Where the control bytes and the page bytes of a frame's payload are (payload-relative).
public enum ChaosFrameLayout {
    /// Payload ranges that are not page data. For page batches: the request id, page size and
    /// the descriptors; for any other frame, the whole payload.
    public static func controlRanges(type: UInt16, payload: UnsafeRawBufferPointer) -> [Range<Int>] {
        guard let (start, entries) = batch(type: type, payload: payload) else {
            return payload.isEmpty ? [] : [0..<payload.count]
        }
        return [0..<start] + entries.map(\.descriptor)
    }

    /// Payload ranges holding page bytes (data pages of `pages`/`pageReply` only).
    public static func pageDataRanges(type: UInt16, payload: UnsafeRawBufferPointer) -> [Range<Int>] {
        batch(type: type, payload: payload)?.entries.compactMap(\.data) ?? []
    }

    /// The entries of a page batch, walked as the decoder walks them; nil for other frames or
    /// a batch that does not parse (the proxy then treats the frame as control bytes).
    static func batch(type: UInt16, payload: UnsafeRawBufferPointer)
        -> (start: Int, entries: [(descriptor: Range<Int>, data: Range<Int>?)])? {
        let prefix: Int
        switch WireProtocol.MessageType(rawValue: type) {
        case .pages: prefix = 0
        case .pageReply: prefix = 8
        default: return nil
        }
        guard payload.count >= prefix + 4 else { return nil }
        let pageSize = Int(payload.loadUnaligned(fromByteOffset: prefix, as: UInt32.self).littleEndian)
        guard WireProtocol.isValidPageSize(UInt32(pageSize)) else { return nil }
        var entries: [(descriptor: Range<Int>, data: Range<Int>?)] = []
        var at = prefix + 4
        while at + WireProtocol.pageDescriptorSize <= payload.count {
            let descriptor = at..<(at + WireProtocol.pageDescriptorSize)
            let isData = payload[at + 8] == 0
            at += WireProtocol.pageDescriptorSize
            if isData {
                guard at + pageSize <= payload.count else { return nil }
                let data: Range<Int> = at..<(at + pageSize)
                entries.append((descriptor: descriptor, data: data))
                at += pageSize
            } else {
                entries.append((descriptor: descriptor, data: nil))
            }
        }
        guard at == payload.count else { return nil }
        return (start: prefix + 4, entries: entries)
    }
}
