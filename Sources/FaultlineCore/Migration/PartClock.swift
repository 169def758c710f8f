/// Splits one interval (a downtime, a switch-over) into named consecutive parts: each
/// `close` ends the part that began at the previous mark. Times are nanoseconds of one
/// monotonic clock.
public struct PartClock: Sendable {
    public private(set) var mark: UInt64 = 0
    public private(set) var parts: [(name: String, milliseconds: Double)] = []

    public init() {}

    /// Starts the first part (forgets any earlier parts).
    public mutating func start(at now: UInt64) {
        mark = now
        parts = []
    }

    /// Ends the current part under `name`; the next part begins now. Parts of the same name
    /// add up.
    public mutating func close(_ name: String, at now: UInt64) {
        let ms = Double(now &- mark) / 1e6
        if let i = parts.firstIndex(where: { $0.name == name }) { parts[i].milliseconds += ms } else { parts.append((name, ms)) }
        mark = now
    }
}
