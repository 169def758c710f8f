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
            printJSON(RefusedBeforeStartReport(missing: error.missing, error: error.description, privatePages: vm.privatePageCount))
        }
        fputs("faultline: error: migration refused before it started: \(describe(error))\n", stderr)
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

    /// The keys `demo` adds to its report for a guest_memfd VM.
    func report(ran report: SourceReport) -> GuestMemfdPlanReport {
        let (ranPath, how) = ran(report)
        return GuestMemfdPlanReport(
            migrationPath: ranPath.rawValue, migrationPathReason: "ran: \(how); planned: \(reason)", migrationPlan: path.rawValue,
            paths: Dictionary(uniqueKeysWithValues: paths.map { ($0.path.rawValue, $0.missing.map { "needs \($0)" } ?? "allowed") }))
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

/// `probe --json`'s `guest_memfd_migration`: which paths this kernel allows, and its answers.
func guestMemfdProbeReport(_ r: GuestMemfdProbe.Result) -> GuestMemfdProbeReport {
    GuestMemfdProbeReport(
        paths: Dictionary(uniqueKeysWithValues: GuestMemfdMigrationPath.allCases.map { path in
            (path.rawValue, r.features.swProtectedVM && GuestMemfdMigrationPlanner.missing(path, kernel: r.features) == nil)
        }),
        kernel: Dictionary(r.notes.map { ($0.name, $0.answer) }, uniquingKeysWith: { first, _ in first }))
}

/// `demo --vm-type sw-protected`: the migration path that ran, the plan, and what each path needs.
struct GuestMemfdPlanReport: Codable, Sendable, Equatable {
    var vmType = "sw-protected"
    var migrationPath: String
    var migrationPathReason: String
    var migrationPlan: String
    /// Each path: "allowed", or "needs FEATURE".
    var paths: [String: String]

    enum CodingKeys: String, CodingKey {
        case vmType = "vm_type", migrationPath = "migration_path", migrationPathReason = "migration_path_reason"
        case migrationPlan = "migration_plan", paths = "guest_memfd_paths"
    }
}

/// `probe --json`: guest_memfd migration on this kernel.
struct GuestMemfdProbeReport: Codable, Sendable, Equatable {
    /// Each migration path: whether this kernel allows it.
    var paths: [String: Bool]
    /// What the kernel answered, by question.
    var kernel: [String: String]
}
