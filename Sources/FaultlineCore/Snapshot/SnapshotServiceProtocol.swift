/// The snapshot service's control connection (`serve-snapshot`, `restore --from`;
/// docs/protocol.md, "The snapshot service"). A restorer connects, sends one
/// ``RestoreRequest``; the server answers with one ``RestoreAnswer`` and, when it accepted,
/// serves the restore as a migration source that dials back to the restorer, then sends one
/// ``RestoreEnd``. Each message is a small JSON object (Codable; the engine encodes it) in a
/// frame of its own: magic "FLS1", payload length u32 LE, CRC32C of the payload u32 LE, the
/// payload. Pure: framing and checks, no sockets.
public enum ServiceFrame {
    public static let magic: UInt32 = 0x3153_4C46  // "FLS1" little-endian
    public static let headerSize = 12
    /// Control messages are a few hundred bytes; anything larger is not one.
    public static let maxPayload = 64 << 10

    /// The whole frame for `payload`.
    public static func encode(_ payload: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(headerSize + payload.count)
        append(magic, to: &out)
        append(UInt32(payload.count), to: &out)
        append(payload.withUnsafeBytes { CRC32C.checksum($0) }, to: &out)
        out += payload
        return out
    }

    /// The payload length and CRC a header announces; throws on a foreign or oversized frame
    /// before anything else is read.
    public static func header(_ bytes: [UInt8]) throws(ServiceFrameError) -> (length: Int, crc: UInt32) {
        guard bytes.count == headerSize else { throw .truncated }
        let m = load(bytes, 0)
        guard m == magic else { throw .notASnapshotService(magic: m) }
        let length = Int(load(bytes, 4))
        guard length <= maxPayload else { throw .tooLarge(length) }
        return (length, load(bytes, 8))
    }

    public static func check(payload: [UInt8], crc: UInt32) throws(ServiceFrameError) {
        guard payload.withUnsafeBytes({ CRC32C.checksum($0) }) == crc else { throw .checksumMismatch }
    }

    static func append(_ v: UInt32, to out: inout [UInt8]) {
        for shift in stride(from: 0, to: 32, by: 8) { out.append(UInt8(truncatingIfNeeded: v >> UInt32(shift))) }
    }

    static func load(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
    }
}

public enum ServiceFrameError: Error, Equatable, CustomStringConvertible {
    case notASnapshotService(magic: UInt32)
    case tooLarge(Int)
    case checksumMismatch
    case truncated

    public var description: String {
        switch self {
        case .notASnapshotService(let m):
            "the peer does not speak the snapshot service protocol (magic 0x\(String(m, radix: 16)), expected \"FLS1\")"
        case .tooLarge(let n): "a control message of \(n) bytes (at most \(ServiceFrame.maxPayload))"
        case .checksumMismatch: "a control message failed its CRC32C"
        case .truncated: "the connection ended inside a control message"
        }
    }
}

/// restorer -> server: serve one restore, dialing back to `dialBackPort` on the address this
/// request came from (the server never dials a host named by a request).
public struct RestoreRequest: Codable, Sendable, Equatable {
    public static let typeName = "restore"
    public static let currentVersion = 1
    /// The most retries a request may ask for (each is a new session after a failure before the commit).
    public static let maxRetries = 5

    public var type: String
    public var version: Int
    public var dialBackPort: Int
    /// A snapshot folder inside the server's folder; nil: the server's folder itself.
    public var snapshot: String?
    /// "lazy" (post-copy: the guest starts at once) or "eager" (stop-and-copy: every page first).
    public var mode: String
    /// Sessions the server may start after one that failed before the commit.
    public var retries: Int

    public init(dialBackPort: Int, snapshot: String?, lazy: Bool, retries: Int) {
        type = Self.typeName
        version = Self.currentVersion
        self.dialBackPort = dialBackPort
        self.snapshot = snapshot
        mode = lazy ? "lazy" : "eager"
        self.retries = retries
    }

    public var lazy: Bool { mode == "lazy" }

    enum CodingKeys: String, CodingKey {
        case type, version, dialBackPort = "dial_back_port", snapshot, mode, retries
    }

    /// Everything a server checks before it looks at a snapshot; the error says what is wrong.
    public func validate() throws(ServiceRequestError) {
        try ServiceEnvelope(type: type, version: version).check()
        guard (1...65535).contains(dialBackPort) else { throw .invalid("dial-back port \(dialBackPort) (1...65535)") }
        guard mode == "lazy" || mode == "eager" else { throw .invalid("unknown mode '\(mode)' (lazy or eager)") }
        guard (0...Self.maxRetries).contains(retries) else { throw .invalid("retries \(retries) (0...\(Self.maxRetries))") }
        if let snapshot { try Self.checkName(snapshot) }
    }

    /// A snapshot name is one folder name: letters, digits, '.', '_', '-', not starting with
    /// '.' (so never '..' or a path), at most 255 bytes.
    public static func checkName(_ name: String) throws(ServiceRequestError) {
        let allowed = name.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2E || c == 0x5F || c == 0x2D
        }
        guard !name.isEmpty, name.utf8.count <= 255, allowed, !name.hasPrefix(".") else {
            throw .invalid("snapshot name '\(name)' is not a folder name (letters, digits, '.', '_', '-'; not starting with '.')")
        }
    }
}

/// The fields every request has, read before the rest, so that a request of another type or
/// version is refused as such rather than for a field it lacks.
public struct ServiceEnvelope: Codable, Sendable, Equatable {
    public var type: String?
    public var version: Int?

    public init(type: String?, version: Int?) {
        self.type = type
        self.version = version
    }

    public func check() throws(ServiceRequestError) {
        guard let type else { throw .invalid("a request without a 'type'") }
        guard type == RestoreRequest.typeName else {
            throw .invalid("unknown request type '\(type)' (this server takes '\(RestoreRequest.typeName)')")
        }
        guard let version else { throw .invalid("a request without a 'version'") }
        guard version == RestoreRequest.currentVersion else {
            throw .invalid("request version \(version) is not supported (this server speaks version \(RestoreRequest.currentVersion))")
        }
    }
}

public enum ServiceRequestError: Error, Equatable, CustomStringConvertible {
    case invalid(String)
    public var description: String {
        switch self {
        case .invalid(let why): "invalid restore request: \(why)"
        }
    }
}

/// What the restorer learns about the snapshot it will receive, before any page.
public struct ServedSnapshot: Codable, Sendable, Equatable {
    public var name: String
    public var vcpus: Int
    public var ramBytes: UInt64
    public var guestMode: String
    public var totalPages: Int
    public var dataPages: Int
    /// The manifest's whole-memory digest: the restored memory must come out with it.
    public var memoryDigest: UInt64

    public init(name: String, vcpus: Int, ramBytes: UInt64, guestMode: String, totalPages: Int, dataPages: Int,
                memoryDigest: UInt64) {
        self.name = name
        self.vcpus = vcpus
        self.ramBytes = ramBytes
        self.guestMode = guestMode
        self.totalPages = totalPages
        self.dataPages = dataPages
        self.memoryDigest = memoryDigest
    }

    enum CodingKeys: String, CodingKey {
        case name, vcpus, ramBytes = "ram_bytes", guestMode = "guest_mode", totalPages = "total_pages"
        case dataPages = "data_pages", memoryDigest = "memory_digest"
    }
}

/// server -> restorer: accepted (the dial-back follows) or refused, with the reason.
public struct RestoreAnswer: Codable, Sendable, Equatable {
    public var type: String
    public var version: Int
    public var snapshot: ServedSnapshot?
    public var error: String?

    public static func accepted(_ snapshot: ServedSnapshot) -> RestoreAnswer {
        RestoreAnswer(type: "accepted", version: RestoreRequest.currentVersion, snapshot: snapshot, error: nil)
    }

    public static func refused(_ error: String) -> RestoreAnswer {
        RestoreAnswer(type: "refused", version: RestoreRequest.currentVersion, snapshot: nil, error: error)
    }

    public var isAccepted: Bool { type == "accepted" && snapshot != nil }
}

/// server -> restorer, after an accepted request: how serving it ended on the server's side.
public struct RestoreEnd: Codable, Sendable, Equatable {
    public var type = "ended"
    /// "completed" (the restorer confirmed the digest) or "failed".
    public var outcome: String
    /// The server committed (the restorer's guest may have started): after this a failure is
    /// no longer one before the start.
    public var committed: Bool
    public var error: String?
    public var reconnects: Int
    public var demandPages: Int
    public var backgroundPages: Int
    /// Sessions that failed before the commit and were retried.
    public var failedAttempts: [String]

    public init(outcome: String, committed: Bool, error: String?, reconnects: Int, demandPages: Int, backgroundPages: Int,
                failedAttempts: [String]) {
        self.outcome = outcome
        self.committed = committed
        self.error = error
        self.reconnects = reconnects
        self.demandPages = demandPages
        self.backgroundPages = backgroundPages
        self.failedAttempts = failedAttempts
    }

    enum CodingKeys: String, CodingKey {
        case type, outcome, committed, error, reconnects, demandPages = "demand_pages", backgroundPages = "background_pages"
        case failedAttempts = "failed_attempts"
    }
}
