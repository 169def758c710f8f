import FaultlineCore
import FaultlineLinux

/// Who may connect to a page server: the user ids allowed (SO_PEERCRED).
public struct PeerPolicy: Sendable {
    public var allowedUIDs: Set<UInt32>
    public init(allowedUIDs: Set<UInt32>) { self.allowedUIDs = allowedUIDs }
    /// This process's own user only.
    public static var ownUser: PeerPolicy { PeerPolicy(allowedUIDs: [HostProcess.effectiveUserID]) }
}

/// A peer that connected and sent its regions and userfaultfd, all checked: ready to serve.
public struct ServeSession {
    public let connection: UnixConnection
    public let peer: PeerCredentials
    public let uffd: Userfaultfd
    public let layout: SnapshotLayout
    /// The memory file, open (not mapped: the supervisor never touches guest memory).
    public let file: FileDescriptor
}

/// The server's side of Firecracker's classic handshake (docs/page-server.md): accept a peer,
/// check who it is, read its one message - a JSON array of regions with the userfaultfd
/// attached - and check all of it before anything is done with the userfaultfd.
public enum FirecrackerHandshake {
    public struct Timing: Sendable {
        /// How long the peer has, once connected, to send its message.
        public var firstMessageSeconds = 10.0
        /// Firecracker's own handlers retry a receive that brings no descriptor (or nothing)
        /// five times, 100 ms apart.
        public var attempts = 5
        public var retryMilliseconds: Int32 = 100
        /// How long to wait for the rest of a message that arrived in parts.
        public var continuationMilliseconds: Int32 = 200
        public var maxMessageBytes = 1 << 20
        public init() {}
    }

    /// Waits for a peer whose user `policy` allows; others are refused (their connection is
    /// closed, `log` says who and why) and the wait goes on. Nil after `timeoutSeconds`.
    public static func accept(on listener: UnixListener, policy: PeerPolicy, timeoutSeconds: Double?,
                              log: (String) -> Void) throws(PageServerError) -> (UnixConnection, PeerCredentials) {
        let deadline = timeoutSeconds.map { MonotonicClock.deadline(after: $0) }
        while true {
            let left = deadline.map { MonotonicClock.secondsLeft(until: $0) }
            if let left, left <= 0 { throw .noPeer(seconds: timeoutSeconds ?? 0, path: listener.path) }
            let connection: UnixConnection?
            do { connection = try listener.accept(timeoutSeconds: left) } catch { throw .system(error) }
            guard let connection else { continue }
            let peer: PeerCredentials
            do { peer = try connection.peerCredentials() } catch {
                log("refused a connection on \(listener.path): \(error)")
                continue
            }
            guard policy.allowedUIDs.contains(peer.uid) else {
                let allowed = policy.allowedUIDs.sorted().map(String.init).joined(separator: ", ")
                log("refused a connection on \(listener.path) from \(peer): uid \(peer.uid) is not allowed (allowed uids: \(allowed))")
                continue
            }
            return (connection, peer)
        }
    }

    /// Reads the peer's message and checks it against the memory `file`: the regions (page
    /// sizes, alignment, overlaps, inside the file) and the descriptor (a userfaultfd).
    public static func receive(from connection: UnixConnection, peer: PeerCredentials, file: FileDescriptor,
                               timing: Timing = Timing()) throws(PageServerError) -> ServeSession {
        let (bytes, descriptor) = try receiveMessage(from: connection, timing: timing)
        let fields = try FirecrackerMessage.decode(bytes)
        let fileSize: UInt64
        do { fileSize = try MappedFile.regularFileSize(file) } catch { throw .memoryFile(path: file.label, error) }
        let layout: SnapshotLayout
        do { layout = try SnapshotLayout.validate(fields, fileSize: fileSize) } catch { throw .badRegions(error) }
        let uffd: Userfaultfd
        do { uffd = try Userfaultfd.adoptReceived(descriptor, label: "uffd of pid \(peer.pid)") } catch { throw .badUserfaultfd(error) }
        return ServeSession(connection: connection, peer: peer, uffd: uffd, layout: layout, file: file)
    }

    /// The message bytes and the one descriptor that came with them. A receive that brings no
    /// descriptor, or nothing, is retried as Firecracker's handlers retry it; bytes that came
    /// without a descriptor are dropped, as there.
    static func receiveMessage(from connection: UnixConnection, timing: Timing) throws(PageServerError) -> ([UInt8], FileDescriptor) {
        var buffer = [UInt8](repeating: 0, count: timing.maxMessageBytes)
        var bytesWithoutDescriptor = 0, endOfStream = false
        var first: (bytes: [UInt8], fd: FileDescriptor)?
        for attempt in 1...max(timing.attempts, 1) {
            let wait = attempt == 1 ? Int32(timing.firstMessageSeconds * 1000) : timing.retryMilliseconds
            let part = try receivePart(connection, into: &buffer, waitMilliseconds: wait)
            guard let part else { continue }
            if part.descriptors.count > 1 { throw .unexpectedDescriptors(count: part.descriptors.count) }
            if part.bytes.isEmpty && part.descriptors.isEmpty {
                endOfStream = true
                continue
            }
            guard let fd = part.descriptors.first else {
                bytesWithoutDescriptor = part.bytes.count
                continue
            }
            first = (part.bytes, fd)
            break
        }
        guard let first else {
            if bytesWithoutDescriptor > 0 { throw .noDescriptor(bytes: bytesWithoutDescriptor, attempts: timing.attempts) }
            if endOfStream { throw .peerClosedEarly(attempts: timing.attempts) }
            throw .silentPeer(seconds: timing.firstMessageSeconds + Double(timing.attempts - 1) * Double(timing.retryMilliseconds) / 1000)
        }
        var bytes = first.bytes
        let fd = first.fd
        // The rest of a message that did not come in one piece.
        while !looksComplete(bytes) {
            guard let part = try receivePart(connection, into: &buffer, waitMilliseconds: timing.continuationMilliseconds),
                  !part.bytes.isEmpty else { break }
            if !part.descriptors.isEmpty { throw .unexpectedDescriptors(count: part.descriptors.count + 1) }
            bytes += part.bytes
            if bytes.count > timing.maxMessageBytes {
                throw .badMessage("longer than \(timing.maxMessageBytes) bytes", excerpt: FirecrackerMessage.excerpt(bytes))
            }
        }
        return (bytes, fd)
    }

    /// One receive within `waitMilliseconds`; nil when nothing came in time.
    static func receivePart(_ connection: UnixConnection, into buffer: inout [UInt8], waitMilliseconds: Int32)
        throws(PageServerError) -> (bytes: [UInt8], descriptors: [FileDescriptor], dropped: Bool)? {
        do {
            guard try connection.waitReadable(timeoutMilliseconds: waitMilliseconds) else { return nil }
            let got: Result<ReceivedMessage, SystemError> = buffer.withUnsafeMutableBytes { raw in
                Result { () throws(SystemError) in try connection.receive(into: raw, nonBlocking: true) }
            }
            let message = try got.get()
            if message.descriptorsDropped { throw PageServerError.unexpectedDescriptors(count: UnixConnection.maxPassedDescriptors + 1) }
            return (Array(buffer.prefix(message.count)), message.descriptors, message.descriptorsDropped)
        } catch let error as PageServerError {
            throw error
        } catch let error as SystemError {
            if error.code == .resourceTemporarilyUnavailable { return nil }
            throw .system(error)
        } catch {
            throw .worker("\(error)")
        }
    }

    /// A JSON array ends with `]` (whitespace aside); anything else is waited on a little.
    static func looksComplete(_ bytes: [UInt8]) -> Bool {
        bytes.last(where: { $0 != 0x20 && $0 != 0x0A && $0 != 0x0D && $0 != 0x09 }) == UInt8(ascii: "]")
    }
}
