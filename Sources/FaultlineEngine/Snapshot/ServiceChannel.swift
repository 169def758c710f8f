import FaultlineCore
import FaultlineLinux
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// One end of a snapshot service control connection: JSON messages in ``ServiceFrame``s
/// (docs/protocol.md, "The snapshot service"). Blocking, for one thread at a time per
/// direction.
final class ServiceChannel: @unchecked Sendable {
    let socket: StreamSocket

    init(socket: StreamSocket) { self.socket = socket }

    func send<T: Encodable>(_ message: T) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        try socket.sendAll(ServiceFrame.encode(Array(try encoder.encode(message))))
    }

    /// The next message's JSON payload, checked against its CRC; `seconds` bounds the wait
    /// (0: none). nil at a clean end of stream before a frame.
    func receivePayload(seconds: Double) throws -> [UInt8]? {
        socket.setReceiveTimeout(seconds: seconds)
        do {
            guard let header = try read(ServiceFrame.headerSize, endOfStreamAllowed: true) else { return nil }
            let (length, crc) = try ServiceFrame.header(header)
            let payload = try read(length, endOfStreamAllowed: false) ?? []
            try ServiceFrame.check(payload: payload, crc: crc)
            return payload
        } catch let error as SystemError where error.code == .resourceTemporarilyUnavailable {
            throw MigrationError.timeout("no message from \(socket.peer) within \(seconds) s")
        }
    }

    /// Decodes `payload` as `T`; a payload that is not one is `what` (the error names the field).
    static func decode<T: Decodable>(_ type: T.Type, _ payload: [UInt8], what: String) throws -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(payload))
        } catch {
            throw ServiceRequestError.invalid("\(what) (\(Snapshot.describe(error)))")
        }
    }

    func close() { socket.shutdown() }

    /// Exactly `count` bytes; nil when the stream ends before the first byte and that is allowed.
    private func read(_ count: Int, endOfStreamAllowed: Bool) throws -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = try out.withUnsafeMutableBytes { raw in
                try socket.receive(into: UnsafeMutableRawBufferPointer(rebasing: raw[done...]))
            }
            if n == 0 {
                if done == 0 && endOfStreamAllowed { return nil }
                throw ServiceFrameError.truncated
            }
            done += n
        }
        return out
    }
}
