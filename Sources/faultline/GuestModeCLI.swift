import ArgumentParser
import FaultlineCore
import FaultlineEngine

/// `--guest-mode` of `demo` and `run`: the CPU mode of the migration guest. `auto` is
/// protected mode while RAM fits it (3584 MiB) and long mode above; `long` forces long mode
/// at any size (RAM at 4 GiB, so even a small guest uses 64-bit addresses). `receive` takes
/// the mode from the layout the source announces.
enum GuestModeChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, protected, long

    var mode: GuestMode? {
        switch self {
        case .auto: nil
        case .protected: .protected32
        case .long: .long64
        }
    }
}

let guestModeHelp = ArgumentHelp(
    "auto | protected | long: the guest's CPU mode (auto: 32-bit protected mode up to 3584 MiB, "
    + "64-bit long mode with RAM at 4 GiB above that, up to 60 GiB)")

/// The machine and its running workload for `demo` and `run`, from their options.
func migrationGuest(vcpus: Int, memory: String, mode: GuestModeChoice, workload: RunningWorkloadKind,
                    workingSet: Int?, spin: UInt32 = 0, order: AccessOrder = .sequential) throws -> (layout: MachineLayout, workload: RunningWorkload) {
    guard let size = parseSize(memory) else { throw CLIError(description: "cannot read --memory '\(memory)'") }
    let layout = try MachineLayout(vcpus: vcpus, ramSize: size, mode: mode.mode)
    let wl = try RunningWorkload(kind: workload, pagesPerVcpu: layout.pagesPerVcpu, workingSetPages: workingSet,
                                 spinIterations: spin, mode: layout.mode, order: order)
    return (layout, wl)
}

extension AccessOrder: ExpressibleByArgument {}
