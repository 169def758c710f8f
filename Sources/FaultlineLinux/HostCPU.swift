#if canImport(Glibc)
import Glibc
#endif

/// Facts about the host CPU that guest programs depend on.
public enum HostCPU {
    /// vendor_id from /proc/cpuinfo ("AuthenticAMD", "GenuineIntel", ...), or nil.
    public static let vendor: String? = {
        guard let f = fopen("/proc/cpuinfo", "re") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, 256, f) != nil {
            let s = String(cString: line)
            if s.hasPrefix("vendor_id"), let colon = s.firstIndex(of: ":") {
                return String(s[s.index(after: colon)...]).trimmed(of: " \t\n")
            }
        }
        return nil
    }()

    /// True where KVM runs on AMD SVM, whose hypercall instruction is VMMCALL (VMCALL on
    /// Intel). KVM patches the other one on first use, but a guest that uses the native one
    /// needs no patching.
    public static var isAMD: Bool { vendor == "AuthenticAMD" || vendor == "HygonGenuine" }
}
