import FaultlineCore
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The one message of Firecracker's classic page-fault handler protocol: a JSON array with an
/// object per guest memory region (docs/page-server.md). Firecracker sends both page-size
/// fields with the page size in bytes; older releases sent only `page_size_kib` (also bytes).
public struct FirecrackerRegion: Codable, Equatable, Sendable {
    public var base_host_virt_addr: UInt64?
    public var size: UInt64?
    public var offset: UInt64?
    public var page_size: UInt64?
    public var page_size_kib: UInt64?

    public init(base: UInt64, size: UInt64, offset: UInt64, pageSize: UInt64?, pageSizeKib: UInt64? = nil) {
        base_host_virt_addr = base
        self.size = size
        self.offset = offset
        page_size = pageSize
        page_size_kib = pageSizeKib
    }

    enum CodingKeys: String, CodingKey { case base_host_virt_addr, size, offset, page_size, page_size_kib }

    /// Each field an unsigned 64-bit integer; a negative, fractional or oversized number is
    /// named as such (the decoder alone reports those as "not valid JSON").
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        func unsigned(_ key: CodingKeys) throws -> UInt64? {
            try c.decodeIfPresent(UnsignedNumber.self, forKey: key)?.value
        }
        base_host_virt_addr = try unsigned(.base_host_virt_addr)
        size = try unsigned(.size)
        offset = try unsigned(.offset)
        page_size = try unsigned(.page_size)
        page_size_kib = try unsigned(.page_size_kib)
    }

    struct UnsignedNumber: Decodable {
        let value: UInt64
        init(from decoder: Decoder) throws {
            let c = try decoder.singleValueContainer()
            if let v = try? c.decode(UInt64.self) { value = v; return }
            if let v = try? c.decode(Int64.self) { throw DecodingError.dataCorruptedError(in: c, debugDescription: "\(v) is negative") }
            if let v = try? c.decode(Double.self) {
                throw DecodingError.dataCorruptedError(in: c, debugDescription: v >= 0x1p64 ? "\(v) does not fit 64 bits" : "\(v) is not an integer")
            }
            throw DecodingError.typeMismatch(UInt64.self, .init(codingPath: c.codingPath, debugDescription: "not a number"))
        }
    }

    public var fields: SnapshotRegionFields {
        SnapshotRegionFields(base: base_host_virt_addr, size: size, offset: offset, pageSize: page_size, pageSizeKib: page_size_kib)
    }
}

public enum FirecrackerMessage {
    /// The message for `regions`, as Firecracker writes it.
    public static func encode(_ regions: [FirecrackerRegion]) -> [UInt8] {
        // Encoding plain integers and optionals cannot fail.
        Array((try? JSONEncoder().encode(regions)) ?? Data())
    }

    /// The regions in `bytes`; a message that is not a JSON array of region objects (with
    /// unsigned integer fields) is an error naming what is wrong and where.
    public static func decode(_ bytes: [UInt8]) throws(PageServerError) -> [SnapshotRegionFields] {
        do {
            return try JSONDecoder().decode([FirecrackerRegion].self, from: Data(bytes)).map(\.fields)
        } catch let error as DecodingError {
            throw .badMessage(describe(error), excerpt: excerpt(bytes))
        } catch {
            throw .badMessage("\(error)", excerpt: excerpt(bytes))
        }
    }

    static func describe(_ error: DecodingError) -> String {
        func path(_ keys: [CodingKey]) -> String {
            keys.isEmpty ? "the message" : keys.map { $0.intValue.map { "region \($0)" } ?? "\"\($0.stringValue)\"" }.joined(separator: " ")
        }
        switch error {
        case .dataCorrupted(let c) where c.codingPath.isEmpty: return "not valid JSON"
        case .dataCorrupted(let c): return "\(path(c.codingPath)): \(c.debugDescription)"
        case .typeMismatch(_, let c):
            let wanted = c.codingPath.isEmpty ? "an array of regions" : c.codingPath.count == 1 ? "an object" : "an unsigned integer"
            return "\(path(c.codingPath)) is not \(wanted)"
        case .valueNotFound(_, let c): return "\(path(c.codingPath)) is null"
        case .keyNotFound(let k, let c): return "\(path(c.codingPath)) has no \"\(k.stringValue)\""
        @unknown default: return "\(error)"
        }
    }

    static func excerpt(_ bytes: [UInt8]) -> String {
        let text = String(decoding: bytes.prefix(120), as: UTF8.self)
        return bytes.count > 120 ? text + "..." : text
    }
}
