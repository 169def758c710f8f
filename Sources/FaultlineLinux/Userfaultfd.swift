import CFaultlineShim
import FaultlineCore
#if canImport(Glibc)
import Glibc
#endif

/// userfaultfd features (UFFDIO_API), by bit.
public struct UffdFeatures: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let pagefaultFlagWP = UffdFeatures(rawValue: 1 << 0)
    public static let eventFork = UffdFeatures(rawValue: 1 << 1)
    public static let eventRemap = UffdFeatures(rawValue: 1 << 2)
    public static let eventRemove = UffdFeatures(rawValue: 1 << 3)
    public static let missingHugetlbfs = UffdFeatures(rawValue: 1 << 4)
    public static let missingShmem = UffdFeatures(rawValue: 1 << 5)
    public static let eventUnmap = UffdFeatures(rawValue: 1 << 6)
    public static let sigbus = UffdFeatures(rawValue: 1 << 7)
    public static let threadID = UffdFeatures(rawValue: 1 << 8)
    public static let minorHugetlbfs = UffdFeatures(rawValue: 1 << 9)
    public static let minorShmem = UffdFeatures(rawValue: 1 << 10)
    public static let exactAddress = UffdFeatures(rawValue: 1 << 11)
    public static let wpHugetlbfsShmem = UffdFeatures(rawValue: 1 << 12)
    public static let wpUnpopulated = UffdFeatures(rawValue: 1 << 13)
    public static let poison = UffdFeatures(rawValue: 1 << 14)
    public static let wpAsync = UffdFeatures(rawValue: 1 << 15)
    public static let move = UffdFeatures(rawValue: 1 << 16)

    static let names: [(UffdFeatures, String)] = [
        (.pagefaultFlagWP, "PAGEFAULT_FLAG_WP"), (.eventFork, "EVENT_FORK"), (.eventRemap, "EVENT_REMAP"),
        (.eventRemove, "EVENT_REMOVE"), (.missingHugetlbfs, "MISSING_HUGETLBFS"), (.missingShmem, "MISSING_SHMEM"),
        (.eventUnmap, "EVENT_UNMAP"), (.sigbus, "SIGBUS"), (.threadID, "THREAD_ID"),
        (.minorHugetlbfs, "MINOR_HUGETLBFS"), (.minorShmem, "MINOR_SHMEM"), (.exactAddress, "EXACT_ADDRESS"),
        (.wpHugetlbfsShmem, "WP_HUGETLBFS_SHMEM"), (.wpUnpopulated, "WP_UNPOPULATED"), (.poison, "POISON"),
        (.wpAsync, "WP_ASYNC"), (.move, "MOVE"),
    ]

    /// The UFFD_FEATURE_ names of the set bits.
    public var names: [String] { Self.names.filter { contains($0.0) }.map(\.1) }
    public var description: String { names.isEmpty ? "none" : names.joined(separator: "|") }
}

/// UFFDIO_REGISTER modes.
public struct UffdRegisterMode: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let missing = UffdRegisterMode(rawValue: 1)
    public static let writeProtect = UffdRegisterMode(rawValue: 2)
    public static let minor = UffdRegisterMode(rawValue: 4)
}

/// Flags on a pagefault event.
public struct UffdPagefaultFlags: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let write = UffdPagefaultFlags(rawValue: 1)
    public static let writeProtect = UffdPagefaultFlags(rawValue: 2)
    public static let minor = UffdPagefaultFlags(rawValue: 4)
}

/// An event read from a userfaultfd.
public enum UffdEvent: Equatable, Sendable {
    case pagefault(address: HostAddress, flags: UffdPagefaultFlags, threadID: UInt32)
    case fork(fd: Int32)
    case remap(from: HostAddress, to: HostAddress, length: UInt64)
    case remove(start: HostAddress, end: HostAddress)
    case unmap(start: HostAddress, end: HostAddress)
    case unknown(UInt8)

    @inlinable
    public init(_ m: fl_uffd_msg) {
        switch m.event {
        case 0x12:
            self = .pagefault(address: HostAddress(rawValue: m.arg.pagefault.address),
                              flags: UffdPagefaultFlags(rawValue: m.arg.pagefault.flags), threadID: m.arg.pagefault.ptid)
        case 0x13: self = .fork(fd: Int32(bitPattern: m.arg.fork.ufd))
        case 0x14: self = .remap(from: HostAddress(rawValue: m.arg.remap.from), to: HostAddress(rawValue: m.arg.remap.to), length: m.arg.remap.len)
        case 0x15: self = .remove(start: HostAddress(rawValue: m.arg.remove.start), end: HostAddress(rawValue: m.arg.remove.end))
        case 0x16: self = .unmap(start: HostAddress(rawValue: m.arg.remove.start), end: HostAddress(rawValue: m.arg.remove.end))
        default: self = .unknown(m.event)
        }
    }
}

/// What an install (COPY, ZEROPAGE, CONTINUE, MOVE, POISON) came to. EEXIST and EAGAIN are
/// part of the protocol, not failures: the policy for them lives here and only here.
public enum UffdInstallOutcome: Equatable, Sendable {
    /// This call mapped the page(s).
    case installed
    /// The page was already there: another resolver won the race. If DONTWAKE was asked,
    /// the caller may still need to wake waiters.
    case alreadyPresent
}

/// An owned userfaultfd.
public final class Userfaultfd: @unchecked Sendable {
    public let fd: FileDescriptor
    public let features: UffdFeatures
    public let ioctls: UInt64
    public let label: String

    public struct OpenFlags: OptionSet, Sendable {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }
        public static let nonBlocking = OpenFlags(rawValue: O_NONBLOCK)
        /// UFFD_USER_MODE_ONLY: catch user-mode faults only (works without privilege).
        public static let userModeOnly = OpenFlags(rawValue: 1)
    }

    /// How the fd was obtained, for `probe`.
    public enum Origin: String, Sendable {
        case devUserfaultfd = "/dev/userfaultfd", syscall = "userfaultfd(2)"
        /// Created and initialized by another process, which passed it over a socket.
        case received = "received (SCM_RIGHTS)"
    }
    public let origin: Origin

    /// Wraps a userfaultfd another process created and initialized (see
    /// `Userfaultfd.adoptReceived`, which checks it first).
    init(received fd: FileDescriptor, features: UffdFeatures, label: String) {
        self.fd = fd
        self.features = features
        self.ioctls = 0
        self.label = label
        self.origin = .received
    }

    /// Creates a userfaultfd (through /dev/userfaultfd, else the syscall) and negotiates
    /// `required` features. Throws naming the features the kernel lacks.
    public init(required: UffdFeatures, flags: OpenFlags = [.nonBlocking], label: String = "uffd") throws(SystemError) {
        let (raw, origin) = try Userfaultfd.open(flags: flags)
        let fd = FileDescriptor(adopting: raw, label: label)
        var api = fl_uffdio_api(api: 0xAA, features: required.rawValue, ioctls: 0)
        if fd.ioctl(FL_UFFDIO_API, &api) < 0 {
            let code = fl_errno()
            // EINVAL with features set: find which ones are missing on a fresh fd.
            if code == EINVAL, !required.isEmpty, let available = try? Userfaultfd.availableFeatures() {
                let missing = required.subtracting(available)
                if !missing.isEmpty {
                    throw SystemError("UFFDIO_API: the kernel lacks UFFD_FEATURE_\(missing.names.joined(separator: ", UFFD_FEATURE_"))", errno: code)
                }
            }
            throw SystemError("UFFDIO_API features \(required)", errno: code)
        }
        self.fd = fd
        self.features = UffdFeatures(rawValue: api.features)
        self.ioctls = api.ioctls
        self.label = label
        self.origin = origin
    }

    static func open(flags: OpenFlags) throws(SystemError) -> (Int32, Origin) {
        let all = flags.rawValue | O_CLOEXEC
        let dev = Glibc.open("/dev/userfaultfd", O_RDWR | O_CLOEXEC)
        if dev >= 0 {
            defer { close(dev) }
            let fd = fl_ioctl_val(dev, FL_USERFAULTFD_IOC_NEW, UInt(all))
            if fd >= 0 { return (fd, .devUserfaultfd) }
        }
        let hint = flags.contains(.userModeOnly) ? ""
            : " (catching KVM's faults needs root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)"
        let fd = try systemCall("userfaultfd(flags 0x\(String(all, radix: 16)))\(hint)") { fl_userfaultfd_syscall(all) }
        return (fd, .syscall)
    }

    /// Features this kernel offers (a throwaway fd with UFFDIO_API features = 0).
    public static func availableFeatures(flags: OpenFlags = [.nonBlocking]) throws(SystemError) -> UffdFeatures {
        let (raw, _) = try open(flags: flags)
        defer { close(raw) }
        var api = fl_uffdio_api(api: 0xAA, features: 0, ioctls: 0)
        try systemCall("UFFDIO_API") { fl_ioctl_ptr(raw, FL_UFFDIO_API, &api) }
        return UffdFeatures(rawValue: api.features)
    }

    /// Whether this kernel offers `feature` (false also where no userfaultfd can be opened).
    public static func kernelOffers(_ feature: UffdFeatures) -> Bool {
        (try? availableFeatures().contains(feature)) == true
    }

    /// UFFDIO_REGISTER; returns the ioctl mask the range supports.
    @discardableResult
    public func register(start: HostAddress, length: UInt64, mode: UffdRegisterMode) throws(SystemError) -> UInt64 {
        var r = fl_uffdio_register(range: fl_uffdio_range(start: start.rawValue, len: length), mode: mode.rawValue, ioctls: 0)
        try systemCall("UFFDIO_REGISTER \(start)+\(length) mode \(mode.rawValue)") { fd.ioctl(FL_UFFDIO_REGISTER, &r) }
        return r.ioctls
    }

    public func unregister(start: HostAddress, length: UInt64) throws(SystemError) {
        var r = fl_uffdio_range(start: start.rawValue, len: length)
        try systemCall("UFFDIO_UNREGISTER \(start)+\(length)") { fd.ioctl(FL_UFFDIO_UNREGISTER, &r) }
    }

    public func wake(start: HostAddress, length: UInt64) throws(SystemError) {
        var r = fl_uffdio_range(start: start.rawValue, len: length)
        try systemCall("UFFDIO_WAKE \(start)+\(length)") { fd.ioctl(FL_UFFDIO_WAKE, &r) }
    }

    /// Runs one install ioctl with the race policy: EEXIST -> `.alreadyPresent` (waking the
    /// range when DONTWAKE was asked, so no faulting thread is left asleep); EAGAIN -> the
    /// mapping is changing (a REMOVE or UNMAP event is pending) or a partial copy: retry on
    /// what is left.
    ///
    /// With `skippingPresent` (the page size), a page another installer mapped first is
    /// stepped over and the rest of the range still goes in: the kernel stops a range at the
    /// first mapped page, reporting the bytes done before it, so an EEXIST with no progress
    /// names the first page left. For installers that map identical bytes (a page that has
    /// one verified content), this keeps a run in one or two ioctls instead of page by page.
    /// The outcome is then `.installed`: every page of the range is mapped.
    @inlinable
    func install(
        _ name: StaticString, start: HostAddress, length: UInt64, dontWake: Bool, skippingPresent pageSize: UInt64? = nil,
        attempt: (_ offset: UInt64) -> (rc: Int32, progress: Int64)
    ) throws(SystemError) -> UffdInstallOutcome {
        var offset: UInt64 = 0
        while true {
            let (rc, progress) = attempt(offset)
            if rc == 0 { return .installed }
            let code = fl_errno()
            switch code {
            case EEXIST:
                if let pageSize {
                    if progress > 0 { offset += UInt64(progress) }
                    offset += pageSize  // the first page left is the one that was there
                    if offset >= length { return .installed }
                    continue
                }
                if dontWake { try wake(start: start, length: length) }
                return .alreadyPresent
            case EAGAIN, EINTR:
                if progress > 0 { offset += UInt64(progress) }
                if offset >= length { return .installed }
                continue
            default:
                throw SystemError("\(name) \(start)+\(length)", errno: code)
            }
        }
    }

    /// UFFDIO_COPY: atomically fills missing page(s) at `destination` from `source`.
    @inlinable
    public func copy(to destination: HostAddress, from source: UnsafeRawPointer, length: UInt64, dontWake: Bool = false,
                     writeProtect: Bool = false, skippingPresent pageSize: UInt64? = nil) throws(SystemError) -> UffdInstallOutcome {
        let mode: UInt64 = (dontWake ? 1 : 0) | (writeProtect ? 2 : 0)
        let src = UInt64(UInt(bitPattern: source))
        return try install("UFFDIO_COPY", start: destination, length: length, dontWake: dontWake, skippingPresent: pageSize) { offset in
            var c = fl_uffdio_copy(dst: destination.rawValue + offset, src: src + offset, len: length - offset, mode: mode, copy: 0)
            let rc = fd.ioctl(FL_UFFDIO_COPY, &c)
            return (rc, c.copy)
        }
    }

    /// UFFDIO_ZEROPAGE.
    public func zeroPage(at start: HostAddress, length: UInt64, dontWake: Bool = false,
                         skippingPresent pageSize: UInt64? = nil) throws(SystemError) -> UffdInstallOutcome {
        try install("UFFDIO_ZEROPAGE", start: start, length: length, dontWake: dontWake, skippingPresent: pageSize) { offset in
            var z = fl_uffdio_zeropage(range: fl_uffdio_range(start: start.rawValue + offset, len: length - offset),
                                       mode: dontWake ? 1 : 0, zeropage: 0)
            let rc = fd.ioctl(FL_UFFDIO_ZEROPAGE, &z)
            return (rc, z.zeropage)
        }
    }

    /// UFFDIO_CONTINUE: maps page-cache pages that already hold the data (MINOR faults).
    @inlinable
    public func `continue`(at start: HostAddress, length: UInt64, dontWake: Bool = false) throws(SystemError) -> UffdInstallOutcome {
        try install("UFFDIO_CONTINUE", start: start, length: length, dontWake: dontWake) { offset in
            var c = fl_uffdio_continue(range: fl_uffdio_range(start: start.rawValue + offset, len: length - offset),
                                       mode: dontWake ? 1 : 0, mapped: 0)
            let rc = fd.ioctl(FL_UFFDIO_CONTINUE, &c)
            return (rc, c.mapped)
        }
    }

    /// UFFDIO_POISON: later accesses get SIGBUS (a page that can never be fetched).
    public func poison(at start: HostAddress, length: UInt64, dontWake: Bool = false) throws(SystemError) -> UffdInstallOutcome {
        try install("UFFDIO_POISON", start: start, length: length, dontWake: dontWake) { offset in
            var p = fl_uffdio_poison(range: fl_uffdio_range(start: start.rawValue + offset, len: length - offset),
                                     mode: dontWake ? 1 : 0, updated: 0)
            let rc = fd.ioctl(FL_UFFDIO_POISON, &p)
            return (rc, p.updated)
        }
    }

    /// UFFDIO_MOVE: moves whole pages from `source` (anonymous, private) to `destination`.
    public func move(to destination: HostAddress, from source: HostAddress, length: UInt64, dontWake: Bool = false,
                     allowSourceHoles: Bool = false, skippingPresent pageSize: UInt64? = nil) throws(SystemError) -> UffdInstallOutcome {
        let mode: UInt64 = (dontWake ? 1 : 0) | (allowSourceHoles ? 2 : 0)
        return try install("UFFDIO_MOVE", start: destination, length: length, dontWake: dontWake, skippingPresent: pageSize) { offset in
            var m = fl_uffdio_move(dst: destination.rawValue + offset, src: source.rawValue + offset, len: length - offset,
                                   mode: mode, move: 0)
            let rc = fd.ioctl(FL_UFFDIO_MOVE, &m)
            return (rc, m.move)
        }
    }

    /// UFFDIO_WRITEPROTECT: sets (`protect`) or clears write protection on a range.
    public func writeProtect(start: HostAddress, length: UInt64, protect: Bool, dontWake: Bool = false) throws(SystemError) {
        var w = fl_uffdio_writeprotect(range: fl_uffdio_range(start: start.rawValue, len: length),
                                       mode: (protect ? 1 : 0) | (dontWake ? 2 : 0))
        try systemCall("UFFDIO_WRITEPROTECT \(start)+\(length)") { fd.ioctl(FL_UFFDIO_WRITEPROTECT, &w) }
    }

    /// Reads up to `buffer.count` events in one read(2). Returns 0 when none is pending
    /// (non-blocking fd) - another reader may have taken them.
    @inlinable
    public func readEvents(into buffer: UnsafeMutableBufferPointer<fl_uffd_msg>) throws(SystemError) -> Int {
        let size = MemoryLayout<fl_uffd_msg>.stride
        while true {
            let n = read(fd.rawValue, buffer.baseAddress, buffer.count * size)
            if n >= 0 { return n / size }
            let code = fl_errno()
            if code == EAGAIN { return 0 }
            if code == EINTR { continue }
            throw SystemError("read \(label)", errno: code)
        }
    }

    /// Waits until events are readable or `wakeFD` (an eventfd used to stop readers) is.
    /// Returns false when woken by `wakeFD`.
    @inlinable
    public func waitReadable(orStop wakeFD: Int32, timeoutMs: Int32 = -1) throws(SystemError) -> Bool {
        var fds: (pollfd, pollfd) = (pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0),
                                     pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0))
        let count: nfds_t = wakeFD >= 0 ? 2 : 1
        let rc = withUnsafeMutableBytes(of: &fds) { raw in
            poll(raw.baseAddress!.assumingMemoryBound(to: pollfd.self), count, timeoutMs)
        }
        if rc < 0 {
            let code = fl_errno()
            if code == EINTR { return true }
            throw SystemError("poll \(label)", errno: code)
        }
        if wakeFD >= 0 && fds.1.revents != 0 { return false }
        return true
    }
}

/// An owned buffer of userfaultfd messages for `readEvents`: callers never name the ABI struct.
public final class UffdEventBuffer: @unchecked Sendable {
    @usableFromInline let messages: UnsafeMutableBufferPointer<fl_uffd_msg>

    public init(capacity: Int) { messages = .allocate(capacity: max(capacity, 1)) }
    deinit { messages.deallocate() }

    /// The event at `index` (valid for the indices the last `readEvents` returned).
    public subscript(index: Int) -> UffdEvent { UffdEvent(messages[index]) }
}

extension Userfaultfd {
    /// Reads up to the buffer's capacity of events; 0 when none is pending.
    @inlinable
    public func readEvents(into buffer: inout UffdEventBuffer) throws(SystemError) -> Int {
        try readEvents(into: buffer.messages)
    }
}
