import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Starts `arguments` (an executable path, then its arguments) in a process group of its own,
/// with the file actions `setUp` adds (its standard streams); returns its pid. For the
/// benchmarks' children: a group can be signalled as a whole, with everything it started.
func spawnInOwnGroup(_ arguments: [String], setUp: (inout posix_spawn_file_actions_t) -> Void) throws -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    setUp(&actions)
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
    posix_spawnattr_setpgroup(&attributes, 0)
    var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
    defer { for p in argv { free(p) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, arguments[0], &actions, &attributes, &argv, environ)
    guard rc == 0 else { throw CLIError(description: "posix_spawn \(arguments[0]): \(String(cString: strerror(rc)))") }
    return pid
}
