#if canImport(Glibc)
import Glibc
#endif

/// Memory of a process or of one of its mappings, as /proc/PID/smaps counts it, in KiB.
/// `pss` divides each page among the processes that map it (a page shared by 8 counts 1/8 in
/// each), so the sum over processes counts every page once; `rss` counts it in each.
/// `anonymous` is memory no file backs: in a private file mapping, the pages it has written.
public struct MemoryUsage: Sendable, Codable, Equatable {
    public var rss: UInt64 = 0
    public var pss: UInt64 = 0
    public var pssAnonymous: UInt64 = 0
    public var pssFile: UInt64 = 0
    public var sharedClean: UInt64 = 0
    public var privateDirty: UInt64 = 0
    public var anonymous: UInt64 = 0

    public init() {}

    enum CodingKeys: String, CodingKey {
        case rss = "rss_kib", pss = "pss_kib", pssAnonymous = "pss_anon_kib", pssFile = "pss_file_kib"
        case sharedClean = "shared_clean_kib", privateDirty = "private_dirty_kib", anonymous = "anonymous_kib"
    }

    /// Reads the `Name:   123 kB` lines it knows; the others are ignored.
    init(smapsLines lines: some Sequence<Substring>) {
        for line in lines {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            guard parts.count >= 2, parts[0].hasSuffix(":"), let value = UInt64(parts[1]) else { continue }
            switch parts[0] {
            case "Rss:": rss = value
            case "Pss:": pss = value
            case "Pss_Anon:": pssAnonymous = value
            case "Pss_File:": pssFile = value
            case "Shared_Clean:": sharedClean = value
            case "Private_Dirty:": privateDirty = value
            case "Anonymous:": anonymous = value
            default: break
            }
        }
    }

    public static func + (a: MemoryUsage, b: MemoryUsage) -> MemoryUsage {
        var s = MemoryUsage()
        s.rss = a.rss + b.rss
        s.pss = a.pss + b.pss
        s.pssAnonymous = a.pssAnonymous + b.pssAnonymous
        s.pssFile = a.pssFile + b.pssFile
        s.sharedClean = a.sharedClean + b.sharedClean
        s.privateDirty = a.privateDirty + b.privateDirty
        s.anonymous = a.anonymous + b.anonymous
        return s
    }
}

/// /proc/PID/smaps_rollup and /proc/PID/smaps.
public enum ProcessMemory {
    /// The whole process (`pid` nil: this one), from smaps_rollup.
    public static func total(pid: Int32? = nil) throws(SystemError) -> MemoryUsage {
        let text = try read("/proc/\(pid.map(String.init) ?? "self")/smaps_rollup")
        return MemoryUsage(smapsLines: text.split(separator: "\n"))
    }

    /// The mapping that starts at `address` (`pid` nil: this process), from smaps.
    public static func mapping(startingAt address: UInt, pid: Int32? = nil) throws(SystemError) -> MemoryUsage {
        let path = "/proc/\(pid.map(String.init) ?? "self")/smaps"
        let lines = try read(path).split(separator: "\n")
        let start = String(address, radix: 16)
        guard let header = lines.firstIndex(where: { line in
            line.split(separator: "-", maxSplits: 1).first.map { $0.drop { $0 == "0" } == start.drop { $0 == "0" } } ?? false
        }) else {
            throw SystemError("\(path): no mapping starts at 0x\(start)", errno: ENOENT)
        }
        // The mapping's fields (`Name: value`) run until the next mapping's header (`start-end perms ...`).
        let fields = lines[(header + 1)...].prefix { $0.split(separator: " ").first?.hasSuffix(":") == true }
        return MemoryUsage(smapsLines: fields)
    }

    private static func read(_ path: String) throws(SystemError) -> String {
        String(decoding: try FileSystem.read(path, limit: 64 << 20), as: UTF8.self)
    }
}
