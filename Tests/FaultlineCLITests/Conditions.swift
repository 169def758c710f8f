import FaultlineLinux
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

// What the machine offers, for the `.enabled(if:)` conditions of the CLI suites: a test that
// cannot run here is reported as skipped with the reason.

/// /dev/kvm opens read-write (the permission bits alone say nothing for root).
let kvmUsable: Bool = {
    let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
    if fd >= 0 { close(fd) }
    return fd >= 0
}()

let isRoot = getuid() == 0

/// Whether the kernel has UFFDIO_MOVE (destinations then keep dropped stale pages for reuse).
let uffdMoveAvailable = Userfaultfd.kernelOffers(.move)

/// HugePages_Free from /proc/meminfo; nil where it cannot be read.
let freeHugePages: Int? = {
    guard let meminfo = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
          let line = meminfo.split(separator: "\n").first(where: { $0.hasPrefix("HugePages_Free:") }) else { return nil }
    return Int(line.dropFirst("HugePages_Free:".count).trimmingCharacters(in: .whitespaces))
}()

/// Whether this machine lets us make two network namespaces joined by a veth pair (tried
/// once, then removed again).
let networkNamespacesUsable: Bool = {
    guard isRoot, FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") else { return false }
    let a = "flprobeA\(getpid())", b = "flprobeB\(getpid())", link = "flp\(getpid() % 100_000)"
    let probe = "ip netns add \(a) && ip netns add \(b) && ip link add \(link)a netns \(a) type veth peer name \(link)b netns \(b)"
    defer { _ = try? run(executable: "/bin/sh", arguments: ["-c", "ip netns del \(a); ip netns del \(b)"], timeout: 30) }
    return (try? run(executable: "/bin/sh", arguments: ["-c", probe], timeout: 30))?.status == 0
}()

/// Whether `faultline probe` says the software vCPUs can page on demand here (a user-mode
/// userfaultfd; no privilege needed since Linux 5.11).
let softBackendUsable: Bool = {
    guard let probe = try? run(["probe"], timeout: 60), probe.status == 0 else { return false }
    return probe.stdout.split(separator: "\n").contains { $0.contains("uffd-* / vcpu-exit (soft)") && $0.hasSuffix(" yes") }
}()
