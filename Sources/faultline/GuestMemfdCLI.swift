import ArgumentParser
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation

/// `--vm-type`: a plain VM, or a guest_memfd VM (KVM_X86_SW_PROTECTED_VM whose RAM memslot is
/// a KVM_MEM_GUEST_MEMFD slot; its RAM starts shared).
enum VMTypeChoice: String, ExpressibleByArgument, CaseIterable {
    case `default`
    case swProtected = "sw-protected"
}

let vmTypeHelp: ArgumentHelp = "default | sw-protected (a guest_memfd VM: KVM_X86_SW_PROTECTED_VM, RAM in a KVM_MEM_GUEST_MEMFD memslot)"

/// Exit status of a migration refused before it started (nothing was sent, the guest runs on).
let refusedBeforeStartExit: Int32 = 5

/// Decides how a guest_memfd VM migrates, from the kernel's answers and the VM's memory, or
/// refuses before anything starts (printing the reason, with `json` as one JSON line).
func planGuestMemfdMigration(_ vm: MigratableVM, precopyRounds: Int, postcopy: PostcopyPolicy, faultMode: FaultMode,
                             json: Bool) -> GuestMemfdMigrationPlan {
    let probe = GuestMemfdProbe.collect()
    let request = GuestMemfdMigrationRequest(precopyRounds: precopyRounds, postcopy: postcopy, faultMode: faultMode)
    do {
        return try GuestMemfdMigrationPlanner.plan(kernel: probe.features, memory: vm.guestMemfdMemoryState, request: request)
    } catch {
        _ = vm.stop()
        if json {
            print("{\"side\":\"source\",\"outcome\":\"refused_before_start\",\"vm_type\":\"sw-protected\","
                  + "\"missing\":\"\(jsonEscape(error.missing))\",\"error\":\"\(jsonEscape(error.description))\","
                  + "\"private_pages\":\(vm.privatePageCount)}")
        }
        fputs("faultline: error: migration refused before it started: \(error)\n", stderr)
        fflush(stdout)
        exit(refusedBeforeStartExit)
    }
}

extension GuestMemfdMigrationPlan {
    /// The path that ran, from what the source did: pre-copy rounds and how it finished.
    func ran(_ report: SourceReport) -> (path: GuestMemfdMigrationPath, how: String) {
        let rounds = report.precopyRounds.count
        if report.mode == "postcopy" {
            let post: GuestMemfdMigrationPath = path == .postcopyKVMUserfault ? .postcopyKVMUserfault : .postcopyUserfaultfd
            return (post, rounds == 0 ? "post-copy from the start"
                    : "post-copy after \(rounds) pre-copy round(s) with userfaultfd write-protect (\(report.precopyStop))")
        }
        if rounds == 0 { return (.stopAndCopy, "every page sent while paused (\(report.stopAndCopyPages) pages)") }
        return (.precopyWriteProtect, "\(rounds) pre-copy round(s) with userfaultfd write-protect, then stop-and-copy of "
                + "\(report.stopAndCopyPages) pages (\(report.precopyStop))")
    }

    func jsonFields(ran report: SourceReport) -> [String] {
        let (ranPath, how) = ran(report)
        let paths = self.paths.map { "\"\($0.path)\":\"\(jsonEscape($0.missing.map { "needs \($0)" } ?? "allowed"))\"" }
        return ["\"vm_type\":\"sw-protected\"", "\"migration_path\":\"\(ranPath)\"",
                "\"migration_path_reason\":\"\(jsonEscape("ran: \(how); planned: \(reason)"))\"",
                "\"migration_plan\":\"\(path)\"", "\"guest_memfd_paths\":{\(paths.joined(separator: ","))}"]
    }

    /// Before the migration: the plan and what each path needs.
    var human: String {
        "guest_memfd VM: planned path \(path) (\(reason))\n"
            + paths.map { "  \($0.path.rawValue.padding(toLength: 24, withPad: " ", startingAt: 0)) "
                + ($0.missing.map { "not on this kernel: needs \($0)" } ?? "allowed") }.joined(separator: "\n")
    }

    /// After the migration: the path that ran and why.
    func human(ran report: SourceReport) -> String {
        let (ranPath, how) = ran(report)
        return "guest_memfd VM: migration path \(ranPath): \(how) (planned: \(reason))"
    }
}

/// `faultline probe`: what the kernel allows a guest_memfd VM's memory, and the migration
/// paths that follow (docs/design.md, "Migrating a guest_memfd VM").
func guestMemfdProbeText(_ r: GuestMemfdProbe.Result) -> String {
    var lines = ["guest_memfd VM migration (tried on a throwaway KVM_X86_SW_PROTECTED_VM)"]
    let width = r.notes.map(\.name.count).max() ?? 10
    for n in r.notes { lines.append("  \(n.name.padding(toLength: width, withPad: " ", startingAt: 0))  \(n.answer)") }
    guard r.features.swProtectedVM else {
        lines.append("  no migration path: needs \(GuestMemfdMigrationPlanner.swProtectedVM)")
        return lines.joined(separator: "\n")
    }
    for path in GuestMemfdMigrationPath.allCases {
        let missing = GuestMemfdMigrationPlanner.missing(path, kernel: r.features)
        lines.append("  path \(path.rawValue.padding(toLength: width - 5, withPad: " ", startingAt: 0))  "
                     + (missing.map { "no: needs \($0)" } ?? "yes (shared memory only)"))
    }
    // What the planner answers for a VM with one private page, from the probed features.
    let request = GuestMemfdMigrationRequest(precopyRounds: 0, postcopy: .never, faultMode: .uffdMissing)
    let privatePages: String
    do {
        _ = try GuestMemfdMigrationPlanner.plan(kernel: r.features, memory: GuestMemfdMemoryState(ramPages: 1, privatePages: 1),
                                                request: request)
        privatePages = "migrate"
    } catch {
        privatePages = "refused (needs \(error.missing))"
    }
    lines.append("  private pages: \(privatePages)")
    return lines.joined(separator: "\n")
}

func guestMemfdProbeJSON(_ r: GuestMemfdProbe.Result) -> String {
    let paths = GuestMemfdMigrationPath.allCases.map { path in
        "\"\(path)\":" + (r.features.swProtectedVM && GuestMemfdMigrationPlanner.missing(path, kernel: r.features) == nil ? "true" : "false")
    }
    let notes = r.notes.map { "\"\(jsonEscape($0.name))\":\"\(jsonEscape($0.answer))\"" }
    return "\"guest_memfd_migration\":{\"paths\":{\(paths.joined(separator: ","))},\"kernel\":{\(notes.joined(separator: ","))}}"
}
