import CFaultlineShim
import FaultlineCore
import FaultlineLinux
#if canImport(Glibc)
import Glibc
#endif

public enum MigrationError: Error, CustomStringConvertible {
    case protocolViolation(String)
    case rejected(String)
    case peerError(String)
    case connectionClosed(String)
    case digestMismatch(source: UInt64, destination: UInt64)
    case timeout(String)

    public var description: String {
        switch self {
        case .protocolViolation(let s): return "protocol violation: \(s)"
        case .rejected(let s): return "the peer rejected the migration: \(s)"
        case .peerError(let s): return "the peer reported an error: \(s)"
        case .connectionClosed(let s): return "connection closed: \(s)"
        case .digestMismatch(let s, let d):
            return "memory digest mismatch: source 0x\(String(s, radix: 16)), destination 0x\(String(d, radix: 16))"
        case .timeout(let s): return "timed out: \(s)"
        }
    }
}

/// One framed connection: a socket, an incremental decoder and a send lock. Receiving is
/// for one thread; sending may come from many (fault requests from every vCPU).
public final class WireChannel: @unchecked Sendable {
    public let socket: StreamSocket
    public let role: ConnectionRole
    private var decoder = WireDecoder()
    private var sendLock = pthread_mutex_t()
    public private(set) var bytesSent: UInt64 = 0
    public private(set) var bytesReceived: UInt64 = 0

    public init(socket: StreamSocket, role: ConnectionRole) {
        self.socket = socket
        self.role = role
        pthread_mutex_init(&sendLock, nil)
    }

    /// The next message; throws at end of stream (a truncated frame is named as such).
    public func receive() throws -> WireMessage {
        while true {
            if let m = try decoder.nextMessage() { return m }
            var closed = false
            let n = try decoder.append(upTo: 1 << 20) { buffer in
                let got = try socket.receive(into: buffer)
                closed = got == 0
                return got
            }
            bytesReceived += UInt64(n)
            if closed {
                try decoder.finish()
                throw MigrationError.connectionClosed("\(role) connection from \(socket.peer)")
            }
        }
    }

    /// Encodes and sends one message (thread-safe).
    public func send(_ message: WireMessage) throws {
        let bytes = try WireEncoder.encode(message)
        try sendRaw(bytes)
    }

    /// Sends already-encoded frames (thread-safe).
    public func sendRaw(_ bytes: [UInt8]) throws {
        pthread_mutex_lock(&sendLock)
        defer { pthread_mutex_unlock(&sendLock) }
        try socket.sendAll(bytes)
        bytesSent += UInt64(bytes.count)
    }

    /// Sends the frames in `encoder` and empties it (keeping its capacity).
    public func flush(_ encoder: inout WireEncoder) throws {
        guard !encoder.bytes.isEmpty else { return }
        pthread_mutex_lock(&sendLock)
        defer { pthread_mutex_unlock(&sendLock) }
        try encoder.bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws in try socket.sendAll(raw) }
        bytesSent += UInt64(encoder.bytes.count)
        encoder.removeAll()
    }

    public func close() { socket.shutdown() }
}
