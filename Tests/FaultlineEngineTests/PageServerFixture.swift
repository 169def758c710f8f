import Dispatch
import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A snapshot memory file whose every 8-byte word is a hash of its offset (so any misplaced
/// or stale page shows), removed when the fixture goes.
final class SnapshotFile {
    let path: String
    let fd: FileDescriptor
    let mapped: MappedFile
    let size: Int

    init(size: Int, seed: UInt64 = 0x5EED) throws {
        path = "/tmp/faultline-snapshot-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).mem"
        self.size = size
        var words = [UInt64](repeating: 0, count: size / 8)
        for i in words.indices { words[i] = SnapshotFile.word(at: UInt64(i * 8), seed: seed) }
        let raw = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        precondition(raw >= 0, "create \(path)")
        let written = words.withUnsafeBytes { write(raw, $0.baseAddress, $0.count) }
        close(raw)
        precondition(written == size, "write \(path)")
        fd = try MappedFile.open(path)
        mapped = try MappedFile(try MappedFile.open(path))
    }

    deinit { unlink(path) }

    static func word(at offset: UInt64, seed: UInt64) -> UInt64 {
        var z = offset &+ seed &* 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return (z ^ (z >> 31)) | 1  // never a zero word: a zero page is never mistaken for file bytes
    }
}

/// A unique socket path for one test.
func pageServerSocketPath() -> String {
    "/tmp/faultline-uffd-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
}

/// A supervisor running on its own thread; `finish` stops it and returns its report.
final class RunningPageServer: @unchecked Sendable {
    let supervisor: PageServerSupervisor
    let logLines = Locked<[String]>([])
    private let done = DispatchSemaphore(value: 0)
    private var result: Result<PageServerReport, Error>?
    private var thread: OSThread?

    init(file: SnapshotFile, socketPath: String = pageServerSocketPath(), launcher: WorkerLauncher = ThreadWorkerLauncher(),
         options: PageServerSupervisor.Options = PageServerSupervisor.Options()) throws {
        let lines = logLines
        supervisor = try PageServerSupervisor(socketPath: socketPath, memoryFile: file.fd, launcher: launcher, mode: "in-process",
                                              options: options, log: { line in lines.withLock { $0.append(line) } })
        let supervisor = self.supervisor
        thread = try OSThread(name: "supervisor") { [self] in
            do { result = .success(try supervisor.run()) } catch { result = .failure(error) }
            done.signal()
        }
    }

    var socketPath: String { supervisor.listener.path }

    /// Waits for `run` to end by itself (an error, or the peer leaving), within `seconds`.
    func outcome(within seconds: Int = 30) throws -> Result<PageServerReport, Error> {
        guard done.wait(timeout: .now() + .seconds(seconds)) == .success else {
            throw TimedOutWaiting(description: "the page server did not end within \(seconds) s")
        }
        thread?.join()
        return result!
    }

    /// Asks it to stop and returns its report.
    func finish(within seconds: Int = 30) throws -> PageServerReport {
        supervisor.requestStop()
        return try outcome(within: seconds).get()
    }
}

struct TimedOutWaiting: Error, CustomStringConvertible { let description: String }
