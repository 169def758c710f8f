import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("Unix sockets: descriptors, credentials, received userfaultfds")
struct UnixSocketTests {
    func path() -> String { "/tmp/faultline-unix-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock" }

    @Test("a listener's socket is mode 0600; the peer's credentials are this process's")
    func listenAndCredentials() throws {
        let p = path()
        let listener = try UnixListener(path: p)
        var info = stat()
        #expect(stat(p, &info) == 0)
        #expect(info.st_mode & 0o777 == 0o600)
        let client = try UnixConnection.connect(to: p)
        let server = try #require(try listener.accept(timeoutSeconds: 5))
        let peer = try server.peerCredentials()
        #expect(peer.pid == getpid())
        #expect(peer.uid == geteuid())
        _ = client
    }

    @Test("a descriptor sent with bytes arrives as a new descriptor of the same file")
    func passesDescriptors() throws {
        let (a, b) = try UnixConnection.pair(label: "test")
        var fds: [Int32] = [-1, -1]
        #expect(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        try a.send(Array("hello".utf8), descriptors: [fds[1]])
        let (bytes, received) = try b.receiveMessage(maxBytes: 64)
        #expect(bytes == Array("hello".utf8))
        try #require(received.count == 1)
        #expect(received[0].rawValue != fds[1])
        var byte: UInt8 = 42
        #expect(write(received[0].rawValue, &byte, 1) == 1)
        var got: UInt8 = 0
        #expect(read(fds[0], &got, 1) == 1)
        #expect(got == 42)
        #expect(fcntl(received[0].rawValue, F_GETFD) & FD_CLOEXEC != 0)
    }

    @Test("a stale socket file is replaced; a live one is refused")
    func staleAndLive() throws {
        let p = path()
        // A socket file nobody listens on: bound, then closed without unlinking.
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in raw.copyBytes(from: Array(p.utf8) + [0]) }
        let raw = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        close(raw)
        #expect(bound == 0)
        let first = try UnixListener(path: p)
        #expect(throws: SystemError.self) { try UnixListener(path: p) }
        _ = first
    }

    @Test("a descriptor that is not a userfaultfd is named, not adopted")
    func notAUserfaultfd() throws {
        var fds: [Int32] = [-1, -1]
        #expect(pipe(&fds) == 0)
        close(fds[1])
        let fd = FileDescriptor(adopting: fds[0], label: "pipe")
        #expect(throws: ReceivedUffdError.self) { try Userfaultfd.adoptReceived(fd, label: "pipe") }
        do { _ = try Userfaultfd.adoptReceived(fd, label: "pipe") } catch {
            #expect("\(error)".contains("pipe:["), "\(error)")
        }
    }

    @Test("a received userfaultfd reports the features its creator negotiated",
          .gate(.receivedUserfaultfd))
    func adoptsUserfaultfd() throws {
        let created = try Userfaultfd(required: [.eventRemove], flags: [.nonBlocking])
        let (a, b) = try UnixConnection.pair(label: "test")
        try a.send([1], descriptors: [created.fd.rawValue])
        let (_, received) = try b.receiveMessage(maxBytes: 8)
        let adopted = try Userfaultfd.adoptReceived(received[0], label: "received")
        #expect(adopted.features == [.eventRemove])
        #expect(adopted.origin == .received)
    }
}
