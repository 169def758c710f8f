#if canImport(Glibc)
import Glibc
#endif

/// A PM QoS CPU latency request, held while this object lives: the kernel's cpuidle governor
/// picks no idle state whose wake-up takes longer than `microseconds` on any CPU. With 0 an
/// idle CPU polls instead of halting, so a thread woken there runs at once. The request is
/// the open file: closing it (deinit) withdraws it, as the kernel's interface defines.
/// Writing needs root (the device is 0600).
public final class CPULatencyRequest: @unchecked Sendable {
    public static let defaultPath = "/dev/cpu_dma_latency"
    public let microseconds: Int32
    private let file: FileDescriptor

    public init(microseconds: Int32, path: String = CPULatencyRequest.defaultPath) throws(SystemError) {
        guard microseconds >= 0 else { throw SystemError("PM QoS request of \(microseconds) us", errno: EINVAL) }
        let file = try FileDescriptor.open(path, flags: O_RDWR)
        var value = microseconds
        let written = try systemCall("write \(path) (\(microseconds) us)") { write(file.rawValue, &value, 4) }
        guard written == 4 else { throw SystemError("write \(path): \(written) of 4 bytes", errno: EIO) }
        self.file = file
        self.microseconds = microseconds
    }

    /// The latency every CPU is held to now: the smallest of all requests on the system (the
    /// kernel's default, no constraint, reads as 2 000 000 000).
    public static func current(path: String = CPULatencyRequest.defaultPath) throws(SystemError) -> Int32 {
        let file = try FileDescriptor.open(path, flags: O_RDONLY)
        var value: Int32 = 0
        let got = try systemCall("read \(path)") { read(file.rawValue, &value, 4) }
        guard got == 4 else { throw SystemError("read \(path): \(got) of 4 bytes", errno: EIO) }
        return value
    }
}
