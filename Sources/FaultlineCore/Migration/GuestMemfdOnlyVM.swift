/// What a guest_memfd-only VM (default VM type, all RAM one guest_memfd created with
/// GUEST_MEMFD_FLAG_MMAP | INIT_SHARED and mapped) can do on a kernel, from probed answers:
/// the flag names, the fault paths and the migration paths the kernel allows.
/// Pure: fed with what FaultlineEngine's GuestMemfdOnlyProbe saw, unit-tested anywhere.

/// The bits of KVM_CAP_GUEST_MEMFD_FLAGS and KVM_CREATE_GUEST_MEMFD's `flags`, by name.
public enum GuestMemfdFlagNames {
    /// GUEST_MEMFD_FLAG_MMAP (0x1), INIT_SHARED (0x2), WRITE (0x8: write()/pwrite() populate;
    /// Firecracker's value, so bit 2 is unused on kernels without direct-map removal).
    public static let known: [(bit: UInt64, name: String)] = [(1 << 0, "MMAP"), (1 << 1, "INIT_SHARED"), (1 << 3, "WRITE")]

    /// The names of the bits set in `value`, joined with `|`; a bit without a name shows as
    /// its hex value (so nothing the kernel reports is dropped); "none" for 0.
    public static func describe(_ value: UInt64) -> String {
        var names = known.filter { value & $0.bit != 0 }.map(\.name)
        var rest = known.reduce(value) { $0 & ~$1.bit }
        while rest != 0 {
            let low = rest & (~rest &+ 1)
            names.append("0x" + String(low, radix: 16))
            rest &= ~low
        }
        return names.isEmpty ? "none" : names.joined(separator: "|")
    }

    /// The same for a KVM_CHECK_EXTENSION answer (an Int32; negative answers mean nothing is offered).
    public static func describe(capability value: Int32) -> String { describe(value > 0 ? UInt64(value) : 0) }
}

/// One thing the probe tried: whether it worked, and what the kernel said either way
/// (for a failure: the operation and the errno; for a step not tried: which earlier one failed).
public enum ProbeOutcome: Sendable, Equatable {
    case works(String)
    case missing(String)

    public var works: Bool { if case .works = self { true } else { false } }

    public var detail: String {
        switch self {
        case .works(let d), .missing(let d): d
        }
    }

    /// "yes (detail)" or "no (detail)": one probe line's value.
    public var line: String { (works ? "yes" : "no") + (detail.isEmpty ? "" : " (\(detail))") }
}

/// What the kernel allows a guest_memfd-only VM, each tried on a throwaway default VM.
public struct GuestMemfdOnlyFeatures: Sendable, Equatable {
    /// KVM_CAP_GUEST_MEMFD_FLAGS on a default VM (nil without /dev/kvm).
    public var vmFlags: Int32?
    /// KVM_CREATE_GUEST_MEMFD with MMAP | INIT_SHARED, mmap MAP_SHARED, a store read back.
    public var mmap = ProbeOutcome.missing("not tried")
    /// UFFDIO_REGISTER MODE_MISSING on the mapping, and UFFDIO_COPY into it.
    public var uffdMissing = ProbeOutcome.missing("not tried")
    /// UFFDIO_REGISTER MODE_MINOR on the mapping, and UFFDIO_CONTINUE of a page in its page cache.
    public var uffdMinor = ProbeOutcome.missing("not tried")
    /// GUEST_MEMFD_FLAG_WRITE accepted, and pwrite() of a page read back through the mapping.
    public var write = ProbeOutcome.missing("not tried")
    /// KVM_MEM_USERFAULT on a guest_memfd memslot, set when the slot is created.
    public var kvmUserfault = ProbeOutcome.missing("not tried")
    /// KVM_MEM_LOG_DIRTY_PAGES on a guest_memfd memslot (a KVM dirty log for pre-copy).
    public var dirtyLog = ProbeOutcome.missing("not tried")
    /// UFFDIO_REGISTER MODE_WP on the mapping (userfaultfd write-protect as a dirty log).
    public var uffdWriteProtect = ProbeOutcome.missing("not tried")

    public init() {}

    /// The probe's lines, in order: what was tried and what came of it.
    public var rows: [(name: String, outcome: ProbeOutcome)] {
        [("guest_memfd mmap", mmap),
         ("userfaultfd MISSING", uffdMissing),
         ("userfaultfd MINOR", uffdMinor),
         ("write() populates (WRITE)", write),
         ("KVM_MEM_USERFAULT memslot", kvmUserfault),
         ("KVM_MEM_LOG_DIRTY_PAGES memslot", dirtyLog),
         ("userfaultfd write-protect", uffdWriteProtect)]
    }
}

/// The names of what each fault path and migration path needs, for the probe and refusals.
public enum GuestMemfdOnlyPlanner {
    public static let mmap = "guest_memfd mmap (GUEST_MEMFD_FLAG_MMAP|INIT_SHARED on a default VM)"
    public static let uffdMissing = "userfaultfd MISSING on a guest_memfd mapping"
    public static let uffdMinor = "userfaultfd MINOR on a guest_memfd mapping"
    public static let kvmUserfault = "KVM_MEM_USERFAULT on a guest_memfd memslot"
    public static let dirtyLog = "KVM_MEM_LOG_DIRTY_PAGES on a guest_memfd memslot"
    public static let uffdWriteProtect = "userfaultfd write-protect on a guest_memfd mapping"

    /// The fault paths of a guest_memfd-only VM's memory: how each resolves a fault, and nil
    /// where the kernel allows it, else the requirement it lacks (its row says what failed).
    public static func faultPaths(_ f: GuestMemfdOnlyFeatures) -> [(name: String, how: String, missing: String?)] {
        let populate = f.write.works ? "write()" : "a store through a second mapping"
        return [
            ("uffd-missing", "UFFDIO_COPY", lacking([(mmap, f.mmap), (uffdMissing, f.uffdMissing)])),
            ("uffd-minor", "populate by \(populate), then UFFDIO_CONTINUE", lacking([(mmap, f.mmap), (uffdMinor, f.uffdMinor)])),
            ("vcpu-exit", "KVM Userfault exits, populate by \(populate)", lacking([(mmap, f.mmap), (kvmUserfault, f.kvmUserfault)])),
        ]
    }

    /// The migration paths of a guest_memfd-only VM the kernel allows (nil), or what each lacks.
    public static func migrationPaths(_ f: GuestMemfdOnlyFeatures) -> [(path: GuestMemfdMigrationPath, missing: String?)] {
        GuestMemfdMigrationPath.allCases.map { path in
            let needs: [(String, ProbeOutcome)]
            switch path {
            case .precopy: needs = [(mmap, f.mmap), (dirtyLog, f.dirtyLog)]
            case .precopyWriteProtect: needs = [(mmap, f.mmap), (uffdWriteProtect, f.uffdWriteProtect)]
            case .stopAndCopy: needs = [(mmap, f.mmap)]
            case .postcopyUserfaultfd:
                // Either registration mode serves post-copy: MISSING with UFFDIO_COPY, or MINOR after populating.
                let either = f.uffdMissing.works || f.uffdMinor.works
                needs = [(mmap, f.mmap), ("\(uffdMissing) or MINOR", either ? .works("") : .missing(""))]
            case .postcopyKVMUserfault: needs = [(mmap, f.mmap), (kvmUserfault, f.kvmUserfault)]
            }
            return (path, lacking(needs))
        }
    }

    /// The first requirement that did not work, by name; nil when all did.
    static func lacking(_ needs: [(name: String, outcome: ProbeOutcome)]) -> String? {
        needs.first(where: { !$0.outcome.works })?.name
    }
}
