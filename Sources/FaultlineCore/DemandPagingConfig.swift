/// The demand-paging experiment's configuration and its validation - pure, so every
/// refusal (zero vCPUs, memory beyond the guest's reach, an impossible mode/backing pair)
/// is unit-tested without a kernel.

/// How guest page faults are delivered and resolved.
public enum FaultMode: String, CaseIterable, Sendable, CustomStringConvertible {
    /// Nothing registered: first touch is an ordinary host fault (contents: zero).
    case none
    /// Guest RAM already holds the source contents: the local-memory ceiling.
    case prefilled
    /// userfaultfd MISSING, handler threads resolve with UFFDIO_COPY.
    case uffdMissing = "uffd-missing"
    /// userfaultfd MINOR on a memfd: write the contents into the file, then UFFDIO_CONTINUE.
    case uffdMinor = "uffd-minor"
    /// userfaultfd MISSING with UFFD_FEATURE_SIGBUS: the faulting vCPU thread resolves its
    /// own fault (the KVM Userfault model) - no handler thread, no wait queue, no wake-up.
    case vcpuExit = "vcpu-exit"

    public var description: String { rawValue }
    public var usesUserfaultfd: Bool { self == .uffdMissing || self == .uffdMinor || self == .vcpuExit }
    public var hasReaders: Bool { self == .uffdMissing || self == .uffdMinor }
}

/// One userfaultfd for all guest memory, or one per vCPU chunk.
public enum UffdTopology: String, CaseIterable, Sendable, CustomStringConvertible {
    case single
    case perVcpu = "per-vcpu"
    public var description: String { rawValue }
}

/// Who executes the guest workload.
public enum ExecutionBackend: String, CaseIterable, Sendable, CustomStringConvertible {
    /// Real vCPUs under /dev/kvm.
    case kvm
    /// Host threads performing the same loads and stores ("software vCPUs").
    case soft
    public var description: String { rawValue }
}

/// Backing store of guest RAM (mirrors FaultlineLinux.MemoryBacking, kept pure here).
public enum BackingKind: String, CaseIterable, Sendable, CustomStringConvertible {
    case anonymous, memfd, hugetlb
    case guestMemfd = "guest-memfd"
    public var description: String { rawValue }
    public var pageSize: UInt64 { self == .hugetlb ? 2 << 20 : 4096 }
}

public struct DemandPagingConfig: Sendable, Equatable {
    public var mode: FaultMode = .vcpuExit
    public var uffd: UffdTopology = .single
    public var readers: Int = 1
    public var vcpus: Int = 1
    public var bytesPerVcpu: UInt64 = 64 << 20
    public var delayMicroseconds: Int = 0
    /// nil: the natural backing of the mode (memfd for uffd-minor, anonymous otherwise).
    public var backing: BackingKind?
    public var pattern: AccessPattern = .sequential
    public var backend: ExecutionBackend = .kvm

    public init() {}

    /// Guest physical address of the RAM under test (the C reference's layout).
    public static let ramBase: UInt64 = 0x1000_0000
    /// The guest runs in 32-bit mode with paging off: RAM must end below 3.75 GiB.
    public static let ramLimit: UInt64 = 0xF000_0000
    public static let maxVcpus = 1024

    public var effectiveBacking: BackingKind { backing ?? (mode == .uffdMinor ? .memfd : .anonymous) }
    public var totalBytes: UInt64 { bytesPerVcpu &* UInt64(max(vcpus, 0)) }
    public var pagesPerVcpu: Int { Int(bytesPerVcpu / 4096) }
    public var uffdCount: Int { mode.hasReaders ? (uffd == .perVcpu ? vcpus : 1) : (mode == .vcpuExit ? 1 : 0) }

    public struct Invalid: Error, CustomStringConvertible, Equatable {
        public let description: String
        public init(_ d: String) { description = d }
    }

    /// Checks everything that can be checked without a kernel.
    public func validate() throws(Invalid) {
        guard vcpus >= 1 else { throw Invalid("--vcpus must be at least 1 (got \(vcpus))") }
        guard vcpus <= Self.maxVcpus else { throw Invalid("--vcpus \(vcpus) exceeds the limit of \(Self.maxVcpus)") }
        guard readers >= 1, readers <= 256 else { throw Invalid("--readers must be between 1 and 256 (got \(readers))") }
        guard delayMicroseconds >= 0, delayMicroseconds <= 1_000_000 else {
            throw Invalid("--delay-us must be between 0 and 1000000 (got \(delayMicroseconds))")
        }
        let page = effectiveBacking.pageSize
        guard bytesPerVcpu >= page, bytesPerVcpu % page == 0 else {
            throw Invalid("--mem-per-vcpu must be a positive multiple of the \(effectiveBacking) page size (\(page) bytes)")
        }
        let (total, overflow) = bytesPerVcpu.multipliedReportingOverflow(by: UInt64(vcpus))
        guard !overflow, total <= Self.ramLimit - Self.ramBase else {
            throw Invalid("guest memory of \(vcpus) x \(bytesPerVcpu >> 20) MiB does not fit the guest's address range: "
                          + "RAM at 0x10000000 must end below 0xF0000000 (32-bit guest, paging off), at most "
                          + "\((Self.ramLimit - Self.ramBase) >> 20) MiB in all")
        }
        if case .stride(let s) = pattern, s < 1 { throw Invalid("stride must be at least 1 page") }
        switch (mode, effectiveBacking) {
        case (.uffdMinor, .anonymous):
            throw Invalid("uffd-minor needs a page cache: use --backing memfd (or hugetlb), not anonymous")
        case (.uffdMissing, .guestMemfd), (.uffdMinor, .guestMemfd):
            throw Invalid("userfaultfd cannot register a guest_memfd mapping on this kernel (UFFDIO_REGISTER: EINVAL); "
                          + "guest-memfd post-copy needs KVM Userfault, which is not upstream")
        case (.vcpuExit, .guestMemfd):
            throw Invalid("vcpu-exit installs pages through the userspace mapping, and guest_memfd has none here "
                          + "(no guest_memfd mmap in 6.12): use --backing anonymous")
        case (.vcpuExit, .memfd), (.vcpuExit, .hugetlb):
            throw Invalid("vcpu-exit installs pages with UFFDIO_COPY and needs --backing anonymous")
        default: break
        }
        if backend == .soft && effectiveBacking == .guestMemfd {
            throw Invalid("guest-memfd backing needs KVM; the soft backend cannot create a guest_memfd")
        }
        if mode == .uffdMissing && effectiveBacking == .hugetlb && bytesPerVcpu % (2 << 20) != 0 {
            throw Invalid("hugetlb chunks must be multiples of 2 MiB")
        }
    }
}

/// The contents of the "source" (the memory being migrated or restored): every 32-bit word
/// is derived from its page index, so any page can be checked on its own.
public enum SourcePattern {
    @inlinable public static func word(page: Int, word: Int) -> UInt32 {
        UInt32(truncatingIfNeeded: page &* 2_654_435_761) ^ UInt32(truncatingIfNeeded: word)
    }

    /// Fills one 4 KiB page with its pattern.
    @inlinable public static func fill(page: Int, at pointer: UnsafeMutableRawPointer) {
        let words = pointer.assumingMemoryBound(to: UInt32.self)
        let base = UInt32(truncatingIfNeeded: page &* 2_654_435_761)
        for w in 0..<1024 { words[w] = base ^ UInt32(truncatingIfNeeded: w) }
    }
}
