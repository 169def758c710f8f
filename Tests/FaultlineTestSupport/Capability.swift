import Foundation

/// Something a test needs from the machine it runs on: a kernel feature, a privilege, a
/// device or a tool. Each is measured on the running machine once, on first use
/// (``Capability/measured``), and can be hidden with `FAULTLINE_TEST_HIDE` (comma-separated
/// raw values, or `all`) to see that the tests needing it skip. Tests gate through
/// ``TestGate`` entries, never on a capability directly.
public enum Capability: String, CaseIterable, Sendable {
    // KVM
    /// /dev/kvm opens read-write, answers API version 12 and has KVM_CAP_USER_MEMORY2 (every
    /// memslot Faultline declares goes through KVM_SET_USER_MEMORY_REGION2).
    case kvm
    /// A guest store to a page missing from a uffd SIGBUS range comes back from KVM_RUN as an
    /// exit naming the page (MMIO exit under shadow paging, or KVM Userfault): vcpu-exit works.
    case vcpuExit = "vcpu_exit"
    /// vcpu-exit goes through KVM Userfault (a KVM_MEM_USERFAULT memslot's marked page exits).
    case kvmUserfault = "kvm_userfault"
    /// KVM_PRE_FAULT_MEMORY (KVM_CAP_PRE_FAULT_MEMORY; TDP only).
    case preFault = "pre_fault"
    /// KVM_CREATE_GUEST_MEMFD works (on a default VM, else on a SW-protected one).
    case guestMemfd = "guest_memfd"
    /// A default VM's guest_memfd made with GUEST_MEMFD_FLAG_MMAP can be mapped.
    case guestMemfdMmap = "guest_memfd_mmap"
    /// A default VM's guest_memfd with MMAP | INIT_SHARED maps and takes a store.
    case guestMemfdInitShared = "guest_memfd_init_shared"
    /// UFFDIO_REGISTER MODE_MISSING on a default VM's MMAP|INIT_SHARED guest_memfd mapping,
    /// and UFFDIO_COPY into it (guest_memfd's userfaultfd operations; the 7.3 rig kernel).
    case guestMemfdUffdMissing = "guest_memfd_uffd_missing"
    /// UFFDIO_REGISTER MODE_MINOR on such a mapping, and UFFDIO_CONTINUE of a cached page.
    case guestMemfdUffdMinor = "guest_memfd_uffd_minor"
    /// GUEST_MEMFD_FLAG_WRITE: pwrite() populates such a guest_memfd.
    case guestMemfdWrite = "guest_memfd_write"
    /// KVM_X86_SW_PROTECTED_VM in KVM_CAP_VM_TYPES, and such a VM can be created.
    case swProtectedVM = "sw_protected_vm"
    /// KVM_CAP_MEMORY_ATTRIBUTES with KVM_MEMORY_ATTRIBUTE_PRIVATE.
    case memoryAttributes = "memory_attributes"

    // userfaultfd
    /// A userfaultfd with UFFD_USER_MODE_ONLY (any user since Linux 5.11).
    case uffdUser = "uffd_user"
    /// A userfaultfd that also catches kernel-mode faults, such as KVM's own accesses to guest
    /// memory (root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1).
    case uffdKernel = "uffd_kernel"
    /// /dev/userfaultfd opens and USERFAULTFD_IOC_NEW hands out a userfaultfd.
    case devUserfaultfd = "dev_userfaultfd"
    /// A MISSING registration of anonymous memory (with UFFD_FEATURE_THREAD_ID).
    case uffdMissing = "uffd_missing"
    /// A MINOR and MISSING registration of shmem (UFFD_FEATURE_MINOR_SHMEM, MISSING_SHMEM).
    case uffdMinor = "uffd_minor"
    /// UFFD_FEATURE_MISSING_HUGETLBFS and MINOR_HUGETLBFS.
    case uffdHugetlbfs = "uffd_hugetlbfs"
    /// A write-protect registration of anonymous memory (UFFD_FEATURE_PAGEFAULT_FLAG_WP), with
    /// WP_UNPOPULATED (what the write-protect dirty log needs).
    case uffdWP = "uffd_wp"
    /// UFFD_FEATURE_MOVE (UFFDIO_MOVE).
    case uffdMove = "uffd_move"
    /// UFFD_FEATURE_SIGBUS.
    case uffdSigbus = "uffd_sigbus"
    /// UFFD_FEATURE_EVENT_REMOVE (a balloon's MADV_DONTNEED reported to the handler).
    case uffdEventRemove = "uffd_event_remove"

    // Memory, scheduling, devices
    /// Free reserved 2 MiB huge pages (HugePages_Free in /proc/meminfo is not 0).
    case hugetlbReserved = "hugetlb_reserved"
    /// /proc/sys/vm/nr_hugepages is writable (a test may reserve huge pages for itself).
    case hugetlbReservable = "hugetlb_reservable"
    /// SCHED_FIFO for a thread (CAP_SYS_NICE or RLIMIT_RTPRIO, and no cgroup refusing it).
    case schedFIFO = "sched_fifo"
    /// /dev/cpu_dma_latency is writable (PM QoS CPU latency requests).
    case cpuDMALatency = "cpu_dma_latency"
    /// The process may run on a CPU other than CPU 0.
    case twoCPUs = "two_cpus"

    // Not kernel features, but conditions tests gate on too
    /// The effective user is root.
    case root
    /// Two network namespaces joined by a veth pair can be made (and are removed again).
    case netNamespaces = "net_namespaces"
    /// /usr/bin/setpriv (to run the binary as another user).
    case setpriv

    /// Capabilities this one cannot be had without: hiding one of them hides this one too.
    public var prerequisites: [Capability] {
        switch self {
        case .vcpuExit, .kvmUserfault, .preFault, .guestMemfd, .swProtectedVM, .memoryAttributes: [.kvm]
        case .guestMemfdMmap: [.guestMemfd]
        case .guestMemfdInitShared: [.guestMemfdMmap]
        case .guestMemfdUffdMissing, .guestMemfdUffdMinor, .guestMemfdWrite: [.guestMemfdInitShared]
        case .netNamespaces: [.root]
        default: []
        }
    }
}

/// What the probe of one capability saw: present or not, and in words what told it so.
public struct Measurement: Sendable, Equatable {
    public var present: Bool
    public var saw: String

    public init(present: Bool, saw: String) {
        self.present = present
        self.saw = saw
    }

    public static func present(_ saw: String) -> Measurement { Measurement(present: true, saw: saw) }
    public static func absent(_ saw: String) -> Measurement { Measurement(present: false, saw: saw) }
}

/// The capabilities a test run may use: what the probes measured, minus what
/// `FAULTLINE_TEST_HIDE` hides.
public struct Machine: Sendable {
    public let hidden: Set<Capability>
    private let measure: @Sendable (Capability) -> Measurement

    public init(hidden: Set<Capability> = [], measure: @escaping @Sendable (Capability) -> Measurement) {
        self.hidden = hidden
        self.measure = measure
    }

    /// The machine the tests run on, with the hide list of the environment.
    public static let current = Machine(hidden: HideList.environment.hidden, measure: { $0.measured })

    public func measurement(of capability: Capability) -> Measurement { measure(capability) }

    /// nil when `capability` can be used, else the capability and why not, as a skip reason
    /// shows it: `guest_memfd (KVM_CREATE_GUEST_MEMFD size 2097152 flags 0x0: ENOTTY ...)`.
    public func missing(_ capability: Capability) -> String? {
        if hidden.contains(capability) { return "\(capability.rawValue) (hidden by FAULTLINE_TEST_HIDE)" }
        for prerequisite in capability.prerequisites {
            if let why = missing(prerequisite) { return "\(capability.rawValue) (needs \(why))" }
        }
        let m = measure(capability)
        return m.present ? nil : "\(capability.rawValue) (\(m.saw))"
    }

    public func has(_ capability: Capability) -> Bool { missing(capability) == nil }

    /// Whether the machine really lacks `capability`. Hiding does not make it so: a test of
    /// what happens without a feature must not run where the feature is only hidden.
    public func reallyLacks(_ capability: Capability) -> Bool { !measure(capability).present }
}

/// The value of `FAULTLINE_TEST_HIDE`: capability names (raw values) separated by commas, or
/// `all`. A name that is no capability stops the run (a typo would hide nothing).
public struct HideList: Sendable, Equatable {
    public var hidden: Set<Capability>
    public var unknown: [String]

    public static let variable = "FAULTLINE_TEST_HIDE"

    public init(parsing text: String?) {
        hidden = []
        unknown = []
        for item in (text ?? "").split(separator: ",") {
            let name = item.trimmingCharacters(in: .whitespaces)
            if name.isEmpty { continue }
            if name == "all" {
                hidden.formUnion(Capability.allCases)
            } else if let capability = Capability(rawValue: name) {
                hidden.insert(capability)
            } else {
                unknown.append(name)
            }
        }
    }

    public static let environment: HideList = {
        let list = HideList(parsing: ProcessInfo.processInfo.environment[variable])
        if !list.unknown.isEmpty {
            fatalError("\(variable) names no capability: \(list.unknown.joined(separator: ", ")) "
                       + "(known: all, \(Capability.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        return list
    }()
}
