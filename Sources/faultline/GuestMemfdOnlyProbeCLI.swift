import FaultlineCore
import FaultlineEngine

/// `faultline probe`: what a guest_memfd-only VM (default VM type, all RAM one mapped
/// guest_memfd) can do on this kernel, each thing tried (GuestMemfdOnlyProbe), and the fault
/// and migration paths that follow (docs/design.md, "The kernel rig").
func guestMemfdOnlyProbeText(_ f: GuestMemfdOnlyFeatures) -> String {
    var lines = ["guest_memfd-only VM (default VM type, all RAM one mapped guest_memfd): each tried on a throwaway VM; "
                 + "the paths are what the kernel allows"]
    var rows = [("KVM_CAP_GUEST_MEMFD_FLAGS (VM)", f.vmFlags.map { "\($0) (\(GuestMemfdFlagNames.describe(capability: $0)))" } ?? "no VM")]
    rows += f.rows.map { ($0.name, $0.outcome.line) }
    rows += GuestMemfdOnlyPlanner.faultPaths(f).map { ("fault path \($0.name)", $0.missing.map { "no: needs \($0)" } ?? "yes (\($0.how))") }
    rows += GuestMemfdOnlyPlanner.migrationPaths(f).map { ("path \($0.path.rawValue)", $0.missing.map { "no: needs \($0)" } ?? "yes") }
    let width = rows.map(\.0.count).max() ?? 10
    for (name, value) in rows { lines.append("  \(name.padding(toLength: width, withPad: " ", startingAt: 0))  \(value)") }
    return lines.joined(separator: "\n")
}

/// `probe --json`'s `guest_memfd_only`: the VM's flags, each operation tried (keyed by its
/// row's name in snake case) and what it showed, and the fault and migration paths allowed.
struct GuestMemfdOnlyProbeReport: Codable, Sendable, Equatable {
    struct Outcome: Codable, Sendable, Equatable {
        var works: Bool
        var detail: String
    }
    var vmFlags: Int32?
    var vmFlagsNames: String
    var tried: [String: Outcome]
    var faultPaths: [String: Bool]
    var paths: [String: Bool]

    enum CodingKeys: String, CodingKey {
        case vmFlags = "vm_flags", vmFlagsNames = "vm_flags_names", tried, faultPaths = "fault_paths", paths
    }

    init(_ f: GuestMemfdOnlyFeatures) {
        func keyed(_ name: String) -> String {
            String(name.lowercased().map { $0.isLetter || $0.isNumber ? $0 : "_" }).split(separator: "_").joined(separator: "_")
        }
        vmFlags = f.vmFlags
        vmFlagsNames = f.vmFlags.map { GuestMemfdFlagNames.describe(capability: $0) } ?? ""
        tried = Dictionary(f.rows.map { (keyed($0.name), Outcome(works: $0.outcome.works, detail: $0.outcome.detail)) },
                           uniquingKeysWith: { first, _ in first })
        faultPaths = Dictionary(GuestMemfdOnlyPlanner.faultPaths(f).map { ($0.name, $0.missing == nil) }, uniquingKeysWith: { a, _ in a })
        paths = Dictionary(GuestMemfdOnlyPlanner.migrationPaths(f).map { ("\($0.path)", $0.missing == nil) }, uniquingKeysWith: { a, _ in a })
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(vmFlags, forKey: .vmFlags)  // null when no VM could be made
        try c.encode(vmFlagsNames, forKey: .vmFlagsNames)
        try c.encode(tried, forKey: .tried)
        try c.encode(faultPaths, forKey: .faultPaths)
        try c.encode(paths, forKey: .paths)
    }
}
