/// Which migration paths the kernel allows for a guest_memfd VM (a KVM_X86_SW_PROTECTED_VM
/// whose RAM memslot has KVM_MEM_GUEST_MEMFD), and which one runs - or why none can.
/// Pure: fed with probed kernel features and the VM's memory, unit-tested anywhere.
/// The kernel facts behind each rule are in docs/design.md, "Migrating a guest_memfd VM".

/// What the kernel offers a guest_memfd VM (probed by FaultlineEngine's GuestMemfdProbe).
public struct GuestMemfdKernelFeatures: Sendable, Equatable {
    /// KVM_CAP_VM_TYPES has bit KVM_X86_SW_PROTECTED_VM (needs TDP and CONFIG_KVM_SW_PROTECTED_VM).
    public var swProtectedVM = false
    /// KVM_CAP_MEMORY_ATTRIBUTES on such a VM includes KVM_MEMORY_ATTRIBUTE_PRIVATE.
    public var privateAttribute = false
    /// KVM_SET_USER_MEMORY_REGION2 accepts KVM_MEM_LOG_DIRTY_PAGES together with
    /// KVM_MEM_GUEST_MEMFD (6.12 refuses it: check_memory_region_flags).
    public var dirtyLogOnGuestMemfdSlot = false
    /// KVM_MEM_USERFAULT is accepted on a guest_memfd memslot (the KVM Userfault series;
    /// its capability number, KVM_CAP_USERFAULT, changed with every posting).
    public var kvmUserfault = false
    /// KVM_CREATE_GUEST_MEMFD accepts GUEST_MEMFD_FLAG_MMAP (6.12 accepts no flag at all).
    public var guestMemfdMmap = false
    /// UFFDIO_REGISTER accepts a mapping of such a VM's guest_memfd (guest_memfd's userfaultfd
    /// operations; they need INIT_SHARED, which x86 refuses on this VM type).
    public var userfaultfdOnGuestMemfd = false
    /// userfaultfd write-protect on anonymous memory including pages not yet touched
    /// (UFFD_FEATURE_WP_UNPOPULATED): a dirty log for the shared view without KVM's.
    public var userfaultfdWriteProtect = false

    public init() {}
}

/// The ways a guest_memfd VM's memory can move.
public enum GuestMemfdMigrationPath: String, Sendable, CaseIterable, CustomStringConvertible {
    /// Pre-copy rounds with KVM's dirty log on the guest_memfd memslot.
    case precopy
    /// Pre-copy rounds with userfaultfd write-protect on the shared view as the dirty log.
    case precopyWriteProtect = "precopy-userfaultfd-wp"
    /// Pause, send every page, resume on the destination (no dirty log, no fault path).
    case stopAndCopy = "stop-and-copy"
    /// Post-copy of the shared ranges through userfaultfd on the shared (userspace_addr) mapping.
    case postcopyUserfaultfd = "postcopy-userfaultfd"
    /// Post-copy of the shared ranges through KVM Userfault exits (KVM_MEM_USERFAULT).
    case postcopyKVMUserfault = "postcopy-kvm-userfault"

    public var description: String { rawValue }
}

/// What the user asked for.
public struct GuestMemfdMigrationRequest: Sendable, Equatable {
    public var precopyRounds: Int
    public var postcopy: PostcopyPolicy
    /// The destination's fault mode (after `auto` was resolved).
    public var faultMode: FaultMode

    public init(precopyRounds: Int, postcopy: PostcopyPolicy, faultMode: FaultMode) {
        self.precopyRounds = precopyRounds
        self.postcopy = postcopy
        self.faultMode = faultMode
    }
}

/// The VM's memory as the migration sees it.
public struct GuestMemfdMemoryState: Sendable, Equatable {
    public var ramPages: Int
    /// Pages whose attributes are KVM_MEMORY_ATTRIBUTE_PRIVATE (their contents live only in
    /// the guest_memfd).
    public var privatePages: Int

    public init(ramPages: Int, privatePages: Int) {
        self.ramPages = ramPages
        self.privatePages = privatePages
    }
}

/// The chosen path and why, plus what the kernel allows in general (for the report).
public struct GuestMemfdMigrationPlan: Sendable, Equatable {
    public var path: GuestMemfdMigrationPath
    public var reason: String
    /// Every path, with nil where the kernel allows it or the missing feature where not.
    public var paths: [(path: GuestMemfdMigrationPath, missing: String?)]

    public static func == (a: Self, b: Self) -> Bool {
        a.path == b.path && a.reason == b.reason && a.paths.map(\.path) == b.paths.map(\.path)
            && a.paths.map(\.missing) == b.paths.map(\.missing)
    }
}

/// Why a guest_memfd VM cannot migrate as asked: refused before anything starts.
public struct GuestMemfdMigrationRefusal: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kernel feature that is missing, named exactly (or what Faultline lacks).
    public var missing: String
    public var description: String

    public init(missing: String, description: String) {
        self.missing = missing
        self.description = description
    }
}

public enum GuestMemfdMigrationPlanner {
    public static let swProtectedVM = "KVM_X86_SW_PROTECTED_VM"
    public static let dirtyLog = "KVM_MEM_LOG_DIRTY_PAGES on a KVM_MEM_GUEST_MEMFD memslot"
    public static let kvmUserfault = "KVM_CAP_USERFAULT (KVM_MEM_USERFAULT)"
    public static let guestMemfdMmap = "guest_memfd mmap (GUEST_MEMFD_FLAG_MMAP)"
    public static let userfaultfdOnGuestMemfd = "userfaultfd on guest_memfd"
    public static let writeProtect = "userfaultfd write-protect (UFFD_FEATURE_WP_UNPOPULATED)"

    /// What each path needs from `kernel`, nil when it has it.
    public static func missing(_ path: GuestMemfdMigrationPath, kernel: GuestMemfdKernelFeatures) -> String? {
        switch path {
        case .precopy: kernel.dirtyLogOnGuestMemfdSlot ? nil : dirtyLog
        case .precopyWriteProtect: kernel.userfaultfdWriteProtect ? nil : writeProtect
        case .stopAndCopy, .postcopyUserfaultfd: nil
        case .postcopyKVMUserfault: kernel.kvmUserfault ? nil : kvmUserfault
        }
    }

    /// The plan for `request`, or the refusal (before anything starts).
    public static func plan(kernel: GuestMemfdKernelFeatures, memory: GuestMemfdMemoryState,
                            request: GuestMemfdMigrationRequest) throws(GuestMemfdMigrationRefusal) -> GuestMemfdMigrationPlan {
        guard kernel.swProtectedVM else {
            throw GuestMemfdMigrationRefusal(
                missing: swProtectedVM,
                description: "a guest_memfd VM needs \(swProtectedVM) (KVM_CAP_VM_TYPES bit 1: TDP and CONFIG_KVM_SW_PROTECTED_VM); "
                    + "this kernel does not offer it")
        }
        if memory.privatePages > 0 {
            // Private contents live only in the guest_memfd: the source must read them and the
            // destination must fill them, and on 6.12 userspace can do neither.
            var lacking: [String] = []
            if !kernel.guestMemfdMmap { lacking.append(guestMemfdMmap) }
            if !kernel.userfaultfdOnGuestMemfd && !kernel.kvmUserfault {
                lacking.append("\(userfaultfdOnGuestMemfd) or \(kvmUserfault)")
            }
            let head = "\(memory.privatePages) of \(memory.ramPages) RAM pages are private (KVM_MEMORY_ATTRIBUTE_PRIVATE): "
                + "their contents exist only in the guest_memfd, which userspace cannot read or fill"
            guard lacking.isEmpty else {
                throw GuestMemfdMigrationRefusal(
                    missing: lacking.joined(separator: "; "),
                    description: head + " on this kernel: it lacks " + lacking.joined(separator: " and ")
                        + " (migration refused before it started; convert the pages to shared first)")
            }
            throw GuestMemfdMigrationRefusal(
                missing: "private-page transfer in Faultline",
                description: head + " without mapping them, and Faultline does not yet move private pages through "
                    + "\(guestMemfdMmap) (migration refused before it started)")
        }
        let paths = GuestMemfdMigrationPath.allCases.map { ($0, missing($0, kernel: kernel)) }
        // Pre-copy: Faultline tracks writes to the shared view with userfaultfd write-protect
        // (the same would serve where KVM could log a guest_memfd slot).
        var precopy: String?
        if request.precopyRounds > 0 {
            if !kernel.userfaultfdWriteProtect && kernel.dirtyLogOnGuestMemfdSlot {
                throw GuestMemfdMigrationRefusal(
                    missing: writeProtect,
                    description: "pre-copy of a guest_memfd VM: this kernel would log the guest_memfd memslot, but Faultline "
                        + "tracks this VM type's writes with \(writeProtect), which it lacks")
            }
            guard kernel.userfaultfdWriteProtect else {
                throw GuestMemfdMigrationRefusal(
                    missing: "\(dirtyLog) or \(writeProtect)",
                    description: "pre-copy (--precopy-rounds \(request.precopyRounds)) needs a dirty log of the guest_memfd VM's "
                        + "shared memory: this kernel refuses \(dirtyLog) (KVM_SET_USER_MEMORY_REGION2: EINVAL, "
                        + "check_memory_region_flags: dirty logging private memory is not supported) and lacks \(writeProtect); "
                        + "use --precopy-rounds 0 with --postcopy never (stop-and-copy) or post-copy")
            }
            precopy = "up to \(request.precopyRounds) pre-copy round(s) with userfaultfd write-protect on the shared "
                + "userspace_addr mapping as the dirty log (KVM refuses \(dirtyLog))"
        }
        if request.postcopy == .never {
            if let precopy {
                return GuestMemfdMigrationPlan(path: .precopyWriteProtect, reason: precopy + ", then stop-and-copy (--postcopy never)",
                                               paths: paths)
            }
            return GuestMemfdMigrationPlan(
                path: .stopAndCopy,
                reason: "--postcopy never without pre-copy: every page is sent while the guest is paused", paths: paths)
        }
        let then = precopy.map { $0 + "; then " } ?? ""
        switch request.faultMode {
        case .vcpuExit:
            guard kernel.kvmUserfault else {
                throw GuestMemfdMigrationRefusal(
                    missing: kvmUserfault,
                    description: "post-copy with fault mode vcpu-exit on a guest_memfd VM needs \(kvmUserfault) on the "
                        + "guest_memfd memslot; this kernel does not have it (use --fault-mode uffd-missing, or "
                        + "--postcopy never for stop-and-copy)")
            }
            return GuestMemfdMigrationPlan(
                path: .postcopyKVMUserfault,
                reason: then + "post-copy of the shared ranges: vCPU faults exit with KVM_MEMORY_EXIT_FLAG_USERFAULT (KVM_MEM_USERFAULT "
                    + "set when the guest_memfd memslot is created)", paths: paths)
        case .uffdMinor:
            throw GuestMemfdMigrationRefusal(
                missing: "write tracking for uffd-minor in Faultline",
                description: "post-copy of a guest_memfd VM tracks the destination guest's writes with userfaultfd "
                    + "write-protect on an anonymous shared mapping (no dirty log on a guest_memfd memslot), which "
                    + "Faultline does for uffd-missing only: use --fault-mode uffd-missing")
        case .uffdMissing:
            return GuestMemfdMigrationPlan(
                path: .postcopyUserfaultfd,
                reason: then + "post-copy of the shared ranges: userfaultfd (\(request.faultMode)) on the shared userspace_addr mapping, "
                    + "which KVM reads for every shared gfn", paths: paths)
        case .none, .prefilled:
            throw GuestMemfdMigrationRefusal(missing: "a fault mode",
                                             description: "post-copy needs a fault mode: vcpu-exit, uffd-missing or uffd-minor")
        }
    }
}
