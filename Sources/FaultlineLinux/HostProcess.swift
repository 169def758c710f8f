#if canImport(Glibc)
import Glibc
#endif

/// This process as the kernel sees it: its credentials, its files, and ending it.
public enum HostProcess {
    /// The effective user id (0 = root).
    public static var effectiveUserID: UInt32 { geteuid() }

    /// Whether this process may open `path` for reading and writing (access(2)).
    public static func canReadAndWrite(_ path: String) -> Bool { access(path, R_OK | W_OK) == 0 }

    /// The first line of a small text file (a /proc or /sys setting), trimmed; nil when the
    /// file cannot be read.
    public static func firstLine(ofFile path: String) -> String? {
        guard let f = fopen(path, "re") else { return nil }
        defer { fclose(f) }
        var buf = [CChar](repeating: 0, count: 128)
        guard fgets(&buf, 128, f) != nil else { return nil }
        return String(cString: buf).trimmed(of: " \n")
    }

    /// Ends the process now with `status` (_exit: no atexit handlers, no buffered output
    /// flushed) - a crash as the peer sees it.
    public static func exitImmediately(status: Int32) -> Never { _exit(status) }
}
