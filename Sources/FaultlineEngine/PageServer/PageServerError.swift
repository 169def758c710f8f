import FaultlineCore
import FaultlineLinux

/// Why a page server could not start or keep serving. Every case reads as one line naming
/// what was wrong; a handshake error means nothing was installed in the peer's memory.
public enum PageServerError: Error, CustomStringConvertible {
    /// Nobody connected within the time allowed.
    case noPeer(seconds: Double, path: String)
    /// The peer closed the connection (or sent nothing) before its regions and userfaultfd.
    case peerClosedEarly(attempts: Int)
    /// The peer connected and sent nothing at all in the time allowed.
    case silentPeer(seconds: Double)
    /// Bytes arrived but no descriptor with them.
    case noDescriptor(bytes: Int, attempts: Int)
    /// More than one descriptor: `count` 3 is the secret-free (guest_memfd) protocol.
    case unexpectedDescriptors(count: Int)
    case badMessage(String, excerpt: String)
    case badRegions(SnapshotLayoutError)
    case badUserfaultfd(ReceivedUffdError)
    case memoryFile(path: String, SystemError)
    case worker(String)
    /// A page that can never be served (its source failed for good): the fault is poisoned.
    case pageUnavailable(String)
    case system(SystemError)

    public var description: String {
        switch self {
        case .noPeer(let s, let p): return "nobody connected to \(p) within \(s) s"
        case .peerClosedEarly(let n):
            return "the peer closed the connection without sending its regions and userfaultfd (\(n) attempts)"
        case .silentPeer(let s):
            return "the peer connected but sent nothing in \((s * 10).rounded() / 10) s (expected its regions and userfaultfd)"
        case .noDescriptor(let b, let n):
            return "the peer sent \(b) bytes but no userfaultfd with them (SCM_RIGHTS) in \(n) attempts"
        case .unexpectedDescriptors(let n) where n == 3:
            return "the peer sent 3 descriptors: that is Firecracker's secret-free (guest_memfd) protocol; uffd-serve speaks the classic one (one userfaultfd)"
        case .unexpectedDescriptors(let n): return "the peer sent \(n) descriptors; the protocol passes exactly one userfaultfd"
        case .badMessage(let what, let excerpt): return "bad regions message: \(what) (message: \(excerpt))"
        case .badRegions(let e): return "bad regions: \(e)"
        case .badUserfaultfd(let e): return "\(e)"
        case .memoryFile(let path, let e): return "memory file \(path): \(e)"
        case .worker(let what): return "page-server worker: \(what)"
        case .pageUnavailable(let why): return "a page cannot be served: \(why)"
        case .system(let e): return "\(e)"
        }
    }
}
