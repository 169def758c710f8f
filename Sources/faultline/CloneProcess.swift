import FaultlineLinux
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// One `faultline restore DIR --clone ... --hold --json` child of `bench clones`: its own
/// process group, a pipe to its standard input (a line there ends its hold), its standard
/// output read line by line, its standard error into a file. Pipes are close-on-exec from
/// the moment they exist (children are spawned from one thread), so no clone keeps another's
/// pipe open past its exec.
final class CloneProcess {
    let pid: Int32
    private let process: ChildProcessGroup
    private var input: Int32
    private(set) var output: Int32
    private var buffer: [UInt8] = []
    private(set) var lines: [String] = []
    let stderrPath: String

    init(arguments: [String], stderrPath: String) throws {
        self.stderrPath = stderrPath
        var inPipe: [Int32] = [-1, -1], outPipe: [Int32] = [-1, -1]
        for i in 0..<2 {
            var fds: [Int32] = [-1, -1]
            guard pipe(&fds) == 0 else { throw CLIError(description: "pipe: \(String(cString: strerror(errno)))") }
            for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
            if i == 0 { inPipe = fds } else { outPipe = fds }
        }
        let child: pid_t
        do {
            child = try spawnInOwnGroup(arguments) { actions in
                posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
                posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
                posix_spawn_file_actions_addopen(&actions, 2, stderrPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            }
        } catch {
            for fd in inPipe + outPipe { close(fd) }
            throw error
        }
        close(inPipe[0])  // the child's ends
        close(outPipe[1])
        pid = child
        process = ChildProcessGroup(pid: child)
        input = inPipe[1]
        output = outPipe[0]
    }

    deinit {
        kill()
        if input >= 0 { close(input) }
        if output >= 0 { close(output) }
    }

    /// Reads what is there (after poll said so); at end of file closes the pipe (`output` -1).
    func readAvailable() {
        var chunk = [UInt8](repeating: 0, count: 65536)
        let n = read(output, &chunk, chunk.count)
        if n <= 0 {
            if n == 0 || (errno != EINTR && errno != EAGAIN) {
                close(output)
                output = -1
            }
            return
        }
        buffer += chunk[0..<n]
        while let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
            lines.append(String(decoding: buffer[..<newline], as: UTF8.self))
            buffer.removeSubrange(...newline)
        }
    }

    /// The last line that is a JSON object whose `outcome` is `outcome` (nil: any JSON line).
    func json(outcome: String? = nil) -> [String: Any]? {
        for line in lines.reversed() {
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { continue }
            if outcome == nil || object["outcome"] as? String == outcome { return object }
        }
        return nil
    }

    /// Ends the hold: one line on its standard input, then end of input.
    func release() {
        guard input >= 0 else { return }
        _ = write(input, "\n", 1)
        close(input)
        input = -1
    }

    /// Waits for it to exit and reaps it; its exit status.
    @discardableResult
    func reap() -> Int32 { process.reap() }

    /// Kills its process group (it and anything it started) and reaps it.
    func kill() {
        process.signalGroup(SIGKILL)  // nothing once reaped
        process.reap()
    }

    var standardError: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    /// Reads the output of `clones` until `done` holds for all of them or `deadline` passes
    /// (false). Waits in poll(2): no clone is asked twice for nothing.
    static func pump(_ clones: [CloneProcess], until done: (CloneProcess) -> Bool, deadline: UInt64) -> Bool {
        while true {
            if clones.allSatisfy(done) { return true }
            let open = clones.filter { !done($0) && $0.output >= 0 }
            let left = MonotonicClock.secondsLeft(until: deadline)
            if open.isEmpty || left == 0 { return false }
            var fds = open.map { pollfd(fd: $0.output, events: Int16(POLLIN), revents: 0) }
            let ready = poll(&fds, nfds_t(fds.count), Int32(min(left, 1) * 1000) + 1)
            guard ready > 0 else { continue }
            for (i, clone) in open.enumerated() where fds[i].revents != 0 { clone.readAvailable() }
        }
    }
}
