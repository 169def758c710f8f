import FaultlineCore
import FaultlineLinux

/// What this machine offers Faultline, found by asking the kernel (never assumed).
public struct SystemProbe: Sendable {
    public struct Row: Sendable {
        public let name: String
        public let value: String
        public let note: String
    }

    public var rows: [Row] = []
    public var kvmError: String?
    public var uffdError: String?
    public var uffdFeatures: UffdFeatures = []
    public var guestMemfdFlags: Int32 = 0
    /// What a guest_memfd-only VM can do here, each thing tried (GuestMemfdOnlyProbe).
    public var guestMemfdOnly = GuestMemfdOnlyFeatures()
    public var hugePages = 0
    /// Mode name -> nil when it can run here, else why not.
    public var modes: [(String, String?)] = []
    /// What a vCPU fault on missing RAM produces here (nil without /dev/kvm).
    public var vcpuFault: VcpuFaultProbe?
    /// What `--fault-mode auto` picks here and why (or why nothing can work).
    public var autoFaultMode: (mode: String, reason: String) = ("none", "")

    public static func collect() -> SystemProbe {
        var p = SystemProbe()
        func row(_ n: String, _ v: String, _ note: String = "") { p.rows.append(Row(name: n, value: v, note: note)) }

        let euid = HostProcess.effectiveUserID
        row("euid", "\(euid)", euid == 0 ? "root" : "unprivileged")
        var kvm: KVM?
        do {
            kvm = try KVM()
            row("/dev/kvm", "yes", "API 12, vcpu mmap \(kvm!.vcpuMmapSize) bytes")
        } catch {
            p.kvmError = "\(error)"
            row("/dev/kvm", "no", "\(error)")
        }
        if let kvm {
            for cap in KVMCapability.allCases {
                let v = kvm.check(cap)
                var note = ""
                switch cap {
                case .vmTypes:
                    note = VMType.allCases.filter { v & (1 << Int32($0.rawValue)) != 0 }.map { "\($0)" }.joined(separator: ",")
                case .guestMemfdFlags:
                    note = GuestMemfdFlagNames.describe(capability: v)
                    p.guestMemfdFlags = v
                case .memoryAttributes: note = v & 8 != 0 ? "PRIVATE" : "no private memory"
                case .preFaultMemory: note = v == 0 ? "KVM_PRE_FAULT_MEMORY unsupported (EOPNOTSUPP without TDP)" : ""
                default: break
                }
                row(cap.description, "\(v)", note)
            }
            // KVM Userfault: never merged; probe by trying the memslot flag.
            var userfault = "no"
            if let vm = try? kvm.createVM(), let mem = try? GuestMemoryRegion(backing: .anonymous, size: 4096) {
                do {
                    try vm.setMemoryRegion(slot: 0, flags: .userfault, guestPhysicalAddress: GuestPhysicalAddress(0), memory: mem)
                    userfault = "yes"
                } catch {
                    userfault = "no (\(error))"
                }
            }
            row("KVM_MEM_USERFAULT", userfault, "proposed in the KVM Userfault series")
            let fault = VcpuFaultProbe.current
            p.vcpuFault = fault
            row("vCPU fault on missing RAM", "\(fault.sigbusFault)",
                "userfaultfd SIGBUS; vcpu-exit needs an exit naming the page; probe took \(fmtMilliseconds(fault.milliseconds)) ms")
            if let u = fault.kvmUserfault { row("vCPU fault, KVM_MEM_USERFAULT", "\(u)", "the page marked in the userfault bitmap") }
            if let m = FaultModeSelection.vcpuExitMechanism(probe: fault) { row("vcpu-exit mechanism", m.rawValue) }
        }
        row("/dev/userfaultfd", HostProcess.canReadAndWrite("/dev/userfaultfd") ? "yes" : "no")
        do {
            p.uffdFeatures = try Userfaultfd.availableFeatures()
            row("userfaultfd features", "0x" + String(p.uffdFeatures.rawValue, radix: 16), p.uffdFeatures.description)
        } catch {
            p.uffdError = "\(error)"
            row("userfaultfd", "no", "\(error)")
        }
        if let v = HostProcess.firstLine(ofFile: "/proc/sys/vm/unprivileged_userfaultfd") {
            row("vm.unprivileged_userfaultfd", v)
        }
        p.hugePages = hugePagesFree()
        row("hugepages free (2 MiB)", "\(p.hugePages)", p.hugePages == 0 ? "hugetlb backing unavailable" : "")

        p.guestMemfdOnly = GuestMemfdOnlyProbe.collect()

        let kvmOK = p.kvmError == nil
        let uffdOK = p.uffdError == nil
        func need(_ ok: Bool, _ why: String) -> String? { ok ? nil : why }
        p.modes = [
            ("none (kvm)", need(kvmOK, "no /dev/kvm")),
            ("prefilled (kvm)", need(kvmOK, "no /dev/kvm")),
            ("uffd-missing (kvm)", need(kvmOK && uffdOK, "needs /dev/kvm and userfaultfd")),
            ("uffd-minor (kvm)", need(kvmOK && p.uffdFeatures.contains(.minorShmem), "needs /dev/kvm and UFFD_FEATURE_MINOR_SHMEM")),
            ("vcpu-exit (kvm)", kvmOK ? FaultModeSelection.obstacle(to: .vcpuExit, probe: VcpuFaultProbe.current) : "needs /dev/kvm"),
            ("uffd-* / vcpu-exit (soft)", need(uffdOK, "needs userfaultfd")),
            ("backing guest-memfd", need(p.guestMemfdOnly.mmap.works, "needs \(GuestMemfdOnlyPlanner.mmap): \(p.guestMemfdOnly.mmap.detail)")),
            ("backing hugetlb", need(p.hugePages > 0, "no free 2 MiB huge pages")),
            ("vcpu-exit via KVM Userfault (kvm)", kvmUserfaultObstacle(p)),
            ("private memory (faultline private)", kvm.map { PrivateMemoryVM.obstacle($0) } ?? "needs /dev/kvm"),
        ]
        do {
            let (mode, reason) = try FaultModeSelection.resolve(requested: .auto)
            p.autoFaultMode = (mode.rawValue, reason)
        } catch {
            p.autoFaultMode = ("none", "\(error)")
        }
        return p
    }
}

/// Why vcpu-exit cannot run on KVM Userfault here, or nil when it can (the memslot flag is
/// accepted and a store to a marked page came back as a userfault exit).
func kvmUserfaultObstacle(_ p: SystemProbe) -> String? {
    guard p.rows.contains(where: { $0.name == "KVM_MEM_USERFAULT" && $0.value == "yes" }) else {
        return "KVM_MEM_USERFAULT is not in this kernel (the memslot flag is refused)"
    }
    guard let fault = p.vcpuFault else { return "needs /dev/kvm" }
    if fault.hasKVMUserfault { return nil }
    if fault.sigbusFault.namesFaultingPage {
        return "not needed: vcpu-exit gets exits naming the page without it (\(fault.sigbusFault))"
    }
    return "KVM_MEM_USERFAULT is accepted, but a store to a marked page gave \(fault.kvmUserfault.map { "\($0)" } ?? "nothing")"
}

func fmtMilliseconds(_ v: Double) -> String { FixedPoint.format(v, digits: 1) }

/// Picks the execution backend: the one asked for, or KVM when /dev/kvm works, else the
/// software vCPUs - and always says which and why.
public enum BackendSelection {
    public static func resolve(_ requested: ExecutionBackend?) -> (ExecutionBackend, String) {
        if let requested { return (requested, "requested") }
        do {
            _ = try KVM()
            return (.kvm, "/dev/kvm is usable")
        } catch {
            return (.soft, "no usable /dev/kvm (\(error)); software vCPUs run the workload")
        }
    }
}
