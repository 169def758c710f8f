import FaultlineEngine

/// `probe --json`: what this machine's kernel offers and which modes can run
/// (docs/reports.md, "probe"). Each capability is a key of its own, beside the fixed keys.
struct ProbeReport: Codable, Sendable, Equatable {
    /// Capability name and what the kernel answered, in the order they were probed.
    var capabilities: [Capability]
    /// Each Faultline mode: whether it can run here.
    var modes: [String: Bool]
    var faultModeAuto: String
    var faultModeAutoReason: String
    var guestMemfdMigration: GuestMemfdProbeReport
    var guestMemfdOnly: GuestMemfdOnlyProbeReport

    struct Capability: Sendable, Equatable {
        var name: String
        var value: String
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case modes, faultModeAuto = "fault_mode_auto", faultModeAutoReason = "fault_mode_auto_reason"
        case guestMemfdMigration = "guest_memfd_migration", guestMemfdOnly = "guest_memfd_only"
    }

    init(_ p: SystemProbe, guestMemfd: GuestMemfdProbe.Result) {
        capabilities = p.rows.map { Capability(name: $0.name, value: $0.value) }
        modes = Dictionary(p.modes.map { ($0.0, $0.1 == nil) }, uniquingKeysWith: { first, _ in first })
        faultModeAuto = p.autoFaultMode.mode
        faultModeAutoReason = p.autoFaultMode.reason
        guestMemfdMigration = guestMemfdProbeReport(guestMemfd)
        guestMemfdOnly = GuestMemfdOnlyProbeReport(p.guestMemfdOnly)
    }

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        modes = try c.decode([String: Bool].self, forKey: .modes)
        faultModeAuto = try c.decode(String.self, forKey: .faultModeAuto)
        faultModeAutoReason = try c.decode(String.self, forKey: .faultModeAutoReason)
        guestMemfdMigration = try c.decode(GuestMemfdProbeReport.self, forKey: .guestMemfdMigration)
        guestMemfdOnly = try c.decode(GuestMemfdOnlyProbeReport.self, forKey: .guestMemfdOnly)
        let fixed = Set(CodingKeys.allCases.map(\.stringValue))
        let all = try decoder.container(keyedBy: NamedKey.self)
        capabilities = try all.allKeys.filter { !fixed.contains($0.stringValue) }.sorted { $0.stringValue < $1.stringValue }
            .map { Capability(name: $0.stringValue, value: try all.decode(String.self, forKey: $0)) }
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(modes, forKey: .modes)
        try c.encode(faultModeAuto, forKey: .faultModeAuto)
        try c.encode(faultModeAutoReason, forKey: .faultModeAutoReason)
        try c.encode(guestMemfdMigration, forKey: .guestMemfdMigration)
        try c.encode(guestMemfdOnly, forKey: .guestMemfdOnly)
        var all = encoder.container(keyedBy: NamedKey.self)
        for cap in capabilities where CodingKeys(rawValue: cap.name) == nil { try all.encode(cap.value, forKey: NamedKey(cap.name)) }
    }
}
