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

func guestMemfdOnlyProbeJSON(_ f: GuestMemfdOnlyFeatures) -> String {
    func keyed(_ name: String) -> String {
        String(name.lowercased().map { $0.isLetter || $0.isNumber ? $0 : "_" }).split(separator: "_").joined(separator: "_")
    }
    var fields = ["\"vm_flags\":\(f.vmFlags.map { "\($0)" } ?? "null")",
                  "\"vm_flags_names\":\"\(jsonEscape(f.vmFlags.map { GuestMemfdFlagNames.describe(capability: $0) } ?? ""))\""]
    fields += f.rows.map { "\"\(keyed($0.name))\":{\"works\":\($0.outcome.works),\"detail\":\"\(jsonEscape($0.outcome.detail))\"}" }
    let faults = GuestMemfdOnlyPlanner.faultPaths(f).map { "\"\(jsonEscape($0.name))\":\($0.missing == nil)" }
    let paths = GuestMemfdOnlyPlanner.migrationPaths(f).map { "\"\($0.path)\":\($0.missing == nil)" }
    fields.append("\"fault_paths\":{\(faults.joined(separator: ","))}")
    fields.append("\"paths\":{\(paths.joined(separator: ","))}")
    return "\"guest_memfd_only\":{\(fields.joined(separator: ","))}"
}
