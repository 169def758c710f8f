import Atomics
import FaultlineCore
import FaultlineLinux

/// One framed connection: a socket, an incremental decoder and a send lock. Receiving is
/// for one thread; sending may come from many (fault requests from every vCPU).
public final class WireChannel: @unchecked Sendable {
    public let socket: StreamSocket
    public internal(set) var role: ConnectionRole
    private var decoder = WireDecoder(initialCapacity: WireChannel.receiveBufferBytes)
    private let sendLock = Locked(())
    private let sent = ManagedAtomic<UInt64>(0)
    public private(set) var bytesReceived: UInt64 = 0
    public private(set) var messagesReceived = 0

    /// Bytes read from the socket per call: short enough that a fault-path thread woken on
    /// the CPU of a bulk receive does not wait long for it (this kernel does not preempt
    /// system calls; see DestinationAttempt.bulkRunPages).
    static let readBytes = 256 << 10
    /// The receive buffer, allocated with the channel: a read, plus the unread part of a frame
    /// of the largest page batch, fit without growing it: growing it in the middle of
    /// post-copy (an allocation, a copy, a free) would stall faults (see HeapPolicy).
    static let receiveBufferBytes = WireDecoder.steadyCapacity(readBytes: readBytes)

    public init(socket: StreamSocket, role: ConnectionRole) {
        self.socket = socket
        self.role = role
    }

    public var bytesSent: UInt64 { sent.load(ordering: .relaxed) }

    /// The next message; throws at end of stream (a truncated frame is named as such).
    /// Damage that loses the framing, or hits a control message, after the first frame is
    /// `MigrationError.corruptTransport`; damaged pages stay `WireError.checksumMismatch` or
    /// `payloadChecksumMismatch(.pages/.pageReply)` (the batch was skipped, the stream is in sync).
    public func receive() throws -> WireMessage {
        do {
            while true {
                if let m = try decoder.nextMessage() {
                    messagesReceived += 1
                    return m
                }
                var closed = false
                let n = try decoder.append(upTo: Self.readBytes) { buffer in
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
        } catch let error as WireError {
            switch error {
            case .checksumMismatch, .payloadChecksumMismatch(.pages), .payloadChecksumMismatch(.pageReply):
                throw error
            case .notAFaultlinePeer where messagesReceived == 0:
                throw error  // a stranger on the socket
            case .headerChecksumMismatch, .payloadTooLarge, .payloadChecksumMismatch, .notAFaultlinePeer:
                throw MigrationError.corruptTransport("\(role) connection from \(socket.peer): \(error)")
            default:
                throw error
            }
        }
    }

    /// Encodes and sends one message (thread-safe).
    public func send(_ message: WireMessage) throws {
        let bytes = try WireEncoder.encode(message)
        try sendLock.withLock { _ in
            try socket.sendAll(bytes)
            sent.wrappingIncrement(by: UInt64(bytes.count), ordering: .relaxed)
        }
    }

    /// Sends already-encoded frames (thread-safe).
    public func sendRaw(_ bytes: [UInt8]) throws {
        try sendLock.withLock { _ in
            try socket.sendAll(bytes)
            sent.wrappingIncrement(by: UInt64(bytes.count), ordering: .relaxed)
        }
    }

    /// Sends the frames in `encoder` and empties it (keeping its capacity).
    public func flush(_ encoder: inout WireEncoder) throws {
        guard !encoder.bytes.isEmpty else { return }
        try sendLock.withLock { _ in
            try encoder.bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws in try socket.sendAll(raw) }
            sent.wrappingIncrement(by: UInt64(encoder.bytes.count), ordering: .relaxed)
        }
        encoder.removeAll()
    }

    public func close() { socket.shutdown() }
}
