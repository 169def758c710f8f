import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// Why a descriptor received from another process cannot be served as its userfaultfd.
public enum ReceivedUffdError: Error, Equatable, CustomStringConvertible {
    /// The descriptor is something else (what /proc/self/fd names it).
    case notAUserfaultfd(String)
    /// It is a userfaultfd, but without O_NONBLOCK: its poll would always report an error.
    case blocking
    /// It is a userfaultfd whose creator never negotiated the API (UFFDIO_API).
    case notInitialized
    /// Its features include events this server does not handle.
    case unsupportedFeatures(UffdFeatures)
    case system(SystemError)

    public var description: String {
        switch self {
        case .notAUserfaultfd(let what):
            return "the descriptor received is not a userfaultfd (it is \(what))"
        case .blocking:
            return "the userfaultfd received is blocking: it must be opened O_NONBLOCK (Firecracker's is)"
        case .notInitialized:
            return "the userfaultfd received was never initialized (no UFFDIO_API by its creator)"
        case .unsupportedFeatures(let f):
            return "the userfaultfd received asks for events this server does not handle: UFFD_FEATURE_\(f.names.joined(separator: ", UFFD_FEATURE_"))"
        case .system(let e):
            return "checking the descriptor received: \(e)"
        }
    }
}

extension Userfaultfd {
    /// What the kernel calls a userfaultfd in /proc/self/fd.
    static let procLinkName = "anon_inode:[userfaultfd]"

    /// Takes a descriptor another process sent (SCM_RIGHTS) as its userfaultfd, after
    /// checking, without any ioctl on it, that it is one: /proc/self/fd names it
    /// `anon_inode:[userfaultfd]`, it is non-blocking, its API was negotiated (a poll does not
    /// report an error), and its features (from /proc/self/fdinfo) ask for no event outside
    /// `handled` (fork, remap and unmap events need handling this server does not have).
    public static func adoptReceived(
        _ fd: FileDescriptor, label: String,
        unhandled: UffdFeatures = [.eventFork, .eventRemap, .eventUnmap]
    ) throws(ReceivedUffdError) -> Userfaultfd {
        let link = descriptorLink(fd.rawValue) ?? "unknown"
        guard link == procLinkName else { throw .notAUserfaultfd(link) }
        let flags = fcntl(fd.rawValue, F_GETFL)
        guard flags >= 0 else { throw .system(SystemError("fcntl F_GETFL \(label)", errno: fl_errno())) }
        guard flags & O_NONBLOCK != 0 else { throw .blocking }
        var p = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
        _ = poll(&p, 1, 0)
        guard p.revents & Int16(POLLERR) == 0 else { throw .notInitialized }
        guard let features = negotiatedFeatures(fd.rawValue) else {
            throw .system(SystemError("read /proc/self/fdinfo/\(fd.rawValue): no API line", errno: EINVAL))
        }
        let bad = features.intersection(unhandled)
        guard bad.isEmpty else { throw .unsupportedFeatures(bad) }
        return Userfaultfd(received: fd, features: features, label: label)
    }

    /// readlink /proc/self/fd/N: what a descriptor refers to.
    static func descriptorLink(_ fd: Int32) -> String? {
        var buffer = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/self/fd/\(fd)", &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The features a userfaultfd negotiated, from its fdinfo line `API:\t<api>:<features>:<ioctls>`
    /// (hex fields).
    static func negotiatedFeatures(_ fd: Int32) -> UffdFeatures? {
        guard let f = fopen("/proc/self/fdinfo/\(fd)", "re") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), f) != nil {
            let text = String(cString: line)
            guard text.hasPrefix("API:") else { continue }
            let fields = text.dropFirst(4).trimmed(of: " \t\n").split(separator: ":")
            guard fields.count == 3, let raw = UInt64(fields[1], radix: 16) else { return nil }
            // Bits the kernel keeps for itself (UFFD_FEATURE_INITIALIZED, bit 31) are not features.
            return UffdFeatures(rawValue: raw & ~(UInt64(1) << 31))
        }
        return nil
    }
}
