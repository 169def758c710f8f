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
    var jsonFields: [String] {
        let paths = self.paths.map { "\"\($0.path)\":\"\(jsonEscape($0.missing.map { "needs \($0)" } ?? "allowed"))\"" }
        return ["\"vm_type\":\"sw-protected\"", "\"migration_path\":\"\(path)\"",
                "\"migration_path_reason\":\"\(jsonEscape(reason))\"", "\"guest_memfd_paths\":{\(paths.joined(separator: ","))}"]
    }

    var human: String {
        "guest_memfd VM: migration path \(path) (\(reason))\n"
            + paths.map { "  \($0.path.rawValue.padding(toLength: 24, withPad: " ", startingAt: 0)) "
                + ($0.missing.map { "not on this kernel: needs \($0)" } ?? "allowed") }.joined(separator: "\n")
    }
}
