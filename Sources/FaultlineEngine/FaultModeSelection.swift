import FaultlineCore
import FaultlineLinux

/// `--fault-mode` as given: `auto`, or one of the migration destination's fault modes.
public enum FaultModeChoice: Equatable, Sendable, CustomStringConvertible {
    /// The best mode that works on this kernel (``FaultModeSelection``).
    case auto
    case explicit(FaultMode)

    /// The modes a migration destination can use.
    public static let migrationModes: [FaultMode] = [.vcpuExit, .uffdMissing, .uffdMinor]
    /// Every spelling `--fault-mode` accepts.
    public static let spellings = ["auto"] + migrationModes.map(\.rawValue)

    /// Parses `auto`, `vcpu-exit`, `uffd-missing` or `uffd-minor`.
    public init?(argument: String) {
        if argument == "auto" {
            self = .auto
        } else if let mode = FaultMode(rawValue: argument), Self.migrationModes.contains(mode) {
            self = .explicit(mode)
        } else {
            return nil
        }
    }

    /// The spelling `--fault-mode` accepts back.
    public var argument: String {
        switch self {
        case .auto: "auto"
        case .explicit(let mode): mode.rawValue
        }
    }

    public var description: String { argument }
}

/// How a vcpu-exit fault reaches userspace on this kernel (docs/design.md, "Fault mode on TDP
/// hosts").
public enum VcpuExitMechanism: String, Sendable, Equatable {
    /// Guest RAM under userfaultfd with UFFD_FEATURE_SIGBUS: on shadow paging KVM turns the
    /// failed access into an MMIO exit at the page, which the vCPU thread completes itself.
    case sigbusExit = "uffd-sigbus"
    /// KVM Userfault: the RAM memslot has KVM_MEM_USERFAULT and a userfault bitmap (a set bit:
    /// the page is missing); a vCPU touching a marked page exits with KVM_EXIT_MEMORY_FAULT
    /// and KVM_MEMORY_EXIT_FLAG_USERFAULT. The vCPU thread installs the page, clears the bit
    /// and re-enters. userfaultfd (MISSING, no SIGBUS) stays behind it for accesses that do
    /// not come from a vCPU.
    case kvmUserfault = "kvm-userfault"
}

/// Turns a requested fault mode into one that works on this kernel, before anything starts:
/// `auto` picks the best that works, an explicit mode that cannot work is refused with the
/// reason. A migration that starts in a mode whose faults cannot be resolved fails only in
/// post-copy, when the guest's memory is split between the two hosts.
public enum FaultModeSelection {
    /// A requested mode that cannot work here (or no mode at all).
    public struct Refusal: Error, Equatable, CustomStringConvertible {
        public let description: String
        public init(_ description: String) { self.description = description }
    }

    /// Resolves `requested` against `probe` (this process's by default). `option` names the
    /// flag in messages; `offerAuto` says whether the refusal may suggest `auto`.
    ///
    /// `probe`: what the kernel offers (nil: this process's ``VcpuFaultProbe/current``). Without
    /// one, an explicit userfaultfd mode is checked by its registration alone, which is all it
    /// needs: the probe's one-page VM is only run when it has something to decide.
    public static func resolve(requested: FaultModeChoice, option: String = "fault mode", offerAuto: Bool = true,
                               probe given: VcpuFaultProbe? = nil) throws(Refusal) -> (mode: FaultMode, reason: String) {
        if given == nil, case .explicit(let mode) = requested, mode == .uffdMissing || mode == .uffdMinor,
           VcpuFaultProbe.registrationObstacle(minor: mode == .uffdMinor) == nil {
            return (mode, "requested")
        }
        let probe = given ?? .current
        switch requested {
        case .auto:
            if obstacle(to: .vcpuExit, probe: probe) == nil {
                return (.vcpuExit, "auto: \(whyVcpuExitWorks(probe)), so each vCPU thread resolves its own faults")
            }
            let vcpuExit = obstacle(to: .vcpuExit, probe: probe) ?? ""
            for mode in [FaultMode.uffdMissing, .uffdMinor] where obstacle(to: mode, probe: probe) == nil {
                return (mode, "auto: vcpu-exit cannot work here (\(vcpuExit)); \(mode) handler threads resolve the faults")
            }
            let all = FaultModeChoice.migrationModes.map { "\($0): \(obstacle(to: $0, probe: probe) ?? "")" }
            throw Refusal("no fault mode can work on this kernel - " + all.joined(separator: "; "))
        case .explicit(let mode):
            guard let why = obstacle(to: mode, probe: probe) else {
                return (mode, mode == .vcpuExit ? "requested; \(whyVcpuExitWorks(probe))" : "requested")
            }
            let working = FaultModeChoice.migrationModes.filter { $0 != mode && obstacle(to: $0, probe: probe) == nil }
            var alternatives = working.first.map { ["\($0)"] } ?? []
            if offerAuto && !working.isEmpty { alternatives.append("auto") }
            let hint = alternatives.isEmpty ? "" : "; use " + alternatives.joined(separator: " or ")
            throw Refusal("\(option) \(mode) cannot work on this kernel: \(why)\(hint)")
        }
    }

    /// Why `mode` cannot work according to `probe`, or nil when it can. Modes without a
    /// fault path (none, prefilled) have no obstacle here.
    public static func obstacle(to mode: FaultMode, probe: VcpuFaultProbe) -> String? {
        switch mode {
        case .vcpuExit:
            if probe.hasKVMUserfault { return nil }  // vcpu-exit through KVM Userfault
            switch probe.sigbusFault {
            case .mmioExit, .memoryFault:
                return nil
            case .bareEFAULT:
                if let userfault = probe.kvmUserfault {
                    return "a vCPU fault on missing RAM returns a bare EFAULT from KVM_RUN (TDP), and this kernel's "
                        + "KVM_MEM_USERFAULT memslot gave no userfault exit either (\(userfault))"
                }
                return "a vCPU fault on missing RAM returns a bare EFAULT from KVM_RUN (TDP without KVM Userfault)"
            case .other(let s):
                return "a vCPU fault on missing RAM does not come back as an exit naming the page (\(s))"
            case .failed(let s):
                return "the vCPU fault probe could not run (\(s))"
            }
        case .uffdMissing:
            return probe.uffdMissingObstacle.map { "a userfaultfd MISSING registration fails (\($0))" }
        case .uffdMinor:
            return probe.uffdMinorObstacle.map { "a userfaultfd MINOR registration on shmem fails (\($0))" }
        case .none, .prefilled:
            return nil
        }
    }

    /// How vcpu-exit works on a kernel that `probe` describes, or nil when it cannot.
    public static func vcpuExitMechanism(probe: VcpuFaultProbe) -> VcpuExitMechanism? {
        if probe.sigbusFault.namesFaultingPage { return .sigbusExit }
        if probe.hasKVMUserfault { return .kvmUserfault }
        return nil
    }

    static func whyVcpuExitWorks(_ probe: VcpuFaultProbe) -> String {
        if !probe.sigbusFault.namesFaultingPage && probe.hasKVMUserfault {
            return "KVM Userfault: a vCPU touching a page marked in the memslot's userfault bitmap (KVM_MEM_USERFAULT) "
                + "exits with KVM_EXIT_MEMORY_FAULT naming the page"
        }
        if case .memoryFault = probe.sigbusFault {
            return "a vCPU fault on missing RAM comes back from KVM_RUN as a memory-fault exit naming the page"
        }
        return "a vCPU fault on missing RAM comes back from KVM_RUN as an MMIO exit naming the page (shadow paging)"
    }
}
