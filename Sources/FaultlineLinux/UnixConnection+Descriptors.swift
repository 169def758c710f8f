import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// Who is at the other end of a Unix socket (SO_PEERCRED: as of its connect()).
public struct PeerCredentials: Sendable, Equatable, CustomStringConvertible {
    public let pid: Int32
    public let uid: UInt32
    public let gid: UInt32

    public init(pid: Int32, uid: UInt32, gid: UInt32) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
    }

    public var description: String { "pid \(pid) uid \(uid) gid \(gid)" }
}

/// What one receive brought: the bytes (in the caller's buffer) and the descriptors that
/// came with them, owned.
public struct ReceivedMessage {
    /// Bytes received; 0 means the peer closed the connection.
    public let count: Int
    public let descriptors: [FileDescriptor]
    /// The kernel dropped descriptors that did not fit (more than the receiver takes).
    public let descriptorsDropped: Bool
}

extension UnixConnection {
    /// The most descriptors one message may carry.
    public static let maxPassedDescriptors = Int(FL_MAX_PASSED_FDS)

    /// The credentials of the process at the other end.
    public func peerCredentials() throws(SystemError) -> PeerCredentials {
        var pid: Int32 = 0, uid: UInt32 = 0, gid: UInt32 = 0
        try systemCall("getsockopt SO_PEERCRED \(label)") { fl_peer_credentials(fd.rawValue, &pid, &uid, &gid) }
        return PeerCredentials(pid: pid, uid: uid, gid: gid)
    }

    /// Sends `bytes` with `descriptors` attached (SCM_RIGHTS, at most `maxPassedDescriptors`)
    /// in one sendmsg; on a stream socket a short send is finished without them.
    public func send(_ bytes: [UInt8], descriptors: [Int32] = []) throws(SystemError) {
        guard descriptors.count <= Self.maxPassedDescriptors else {
            throw SystemError("sendmsg \(label): \(descriptors.count) descriptors (at most \(Self.maxPassedDescriptors))", errno: EINVAL)
        }
        var done = 0
        var attached = descriptors
        while done < max(bytes.count, 1) {
            let n = bytes.withUnsafeBytes { raw in
                attached.withUnsafeBufferPointer { fds in
                    fl_send_with_fds(fd.rawValue, raw.baseAddress.map { $0 + done }, bytes.count - done,
                                     fds.baseAddress, Int32(fds.count))
                }
            }
            if n < 0 {
                let code = fl_errno()
                if code == EINTR { continue }
                throw SystemError("sendmsg \(label)", errno: code)
            }
            attached = []
            done += n
            if bytes.isEmpty { break }
        }
    }

    /// Receives up to `buffer.count` bytes and any descriptors sent with them (close-on-exec;
    /// at most `maxDescriptors` are kept, the rest closed and reported as dropped).
    public func receive(into buffer: UnsafeMutableRawBufferPointer, maxDescriptors: Int = UnixConnection.maxPassedDescriptors,
                        nonBlocking: Bool = false) throws(SystemError) -> ReceivedMessage {
        var fds = [Int32](repeating: -1, count: Self.maxPassedDescriptors)
        var count: Int32 = 0, truncated: Int32 = 0
        let keep = Int32(min(max(maxDescriptors, 0), Self.maxPassedDescriptors))
        while true {
            let n = fl_recv_with_fds(fd.rawValue, buffer.baseAddress, buffer.count, nonBlocking ? Int32(MSG_DONTWAIT) : 0,
                                     &fds, keep, &count, &truncated)
            if n >= 0 {
                let owned = fds.prefix(Int(count)).map { FileDescriptor(adopting: $0, label: "received from \(label)") }
                return ReceivedMessage(count: n, descriptors: owned, descriptorsDropped: truncated != 0)
            }
            let code = fl_errno()
            if code == EINTR { continue }
            throw SystemError("recvmsg \(label)", errno: code)
        }
    }

    /// One whole message (seqpacket) of at most `maxBytes`, with its descriptors.
    public func receiveMessage(maxBytes: Int, maxDescriptors: Int = UnixConnection.maxPassedDescriptors)
        throws(SystemError) -> (bytes: [UInt8], descriptors: [FileDescriptor]) {
        var bytes = [UInt8](repeating: 0, count: maxBytes)
        let got: Result<ReceivedMessage, SystemError> = bytes.withUnsafeMutableBytes { raw in
            Result { () throws(SystemError) in try receive(into: raw, maxDescriptors: maxDescriptors) }
        }
        let message = try got.get()
        return (Array(bytes.prefix(message.count)), message.descriptors)
    }
}
