/// The Faultline migration wire protocol: constants, message types and their values.
/// The byte layouts are in docs/protocol.md; `WireEncoder` and `WireDecoder` implement them.
///
/// Every frame is a 20-byte little-endian header followed by a payload:
///
///     magic u32 "FLT1" | type u16 | flags u16 | length u32 | payload CRC32C u32 | header CRC32C u32
///
/// The header CRC covers the first 16 header bytes, so a damaged length is caught before
/// the decoder trusts it. The payload CRC covers the whole payload except page data,
/// which is covered by each page's own CRC32C.
public enum WireProtocol {
    /// The protocol version spoken by this build, carried in `hello` and `helloAck`.
    public static let version: UInt32 = 2
    /// "FLT1" as it appears on the wire (bytes 46 4C 54 31), read as a little-endian u32.
    public static let magic: UInt32 = 0x3154_4C46
    /// Size of the fixed frame header in bytes.
    public static let headerSize = 20
    /// The largest payload a decoder accepts; longer frames are malformed.
    public static let maxPayloadLength = 64 << 20
    /// Page sizes are powers of two in this range (4 KiB pages up to 2 MiB huge pages).
    public static let pageSizes: ClosedRange<UInt32> = 4096...(2 << 20)
    /// The most memory regions a `hello` may describe.
    public static let maxMemoryRegions = 1024
    /// Most pages one `pageRequest` may ask for (a fault and its fault-around window): the
    /// reply stays one small frame on the fault connection.
    public static let maxPagesPerRequest: UInt32 = 256
    /// Size of one page descriptor in a page batch: index u64, kind u8, 3 reserved, CRC32C u32.
    public static let pageDescriptorSize = 16

    /// The message type field of the frame header.
    public enum MessageType: UInt16, Sendable, CaseIterable {
        case hello = 0x01
        case helloAck = 0x02
        case reject = 0x03
        case vcpuState = 0x04
        case pages = 0x05
        case pageRequest = 0x06
        case pageReply = 0x07
        case prioritize = 0x08
        case pageSetSummary = 0x09
        case digest = 0x0A
        case complete = 0x0B
        case error = 0x0C
        case resume = 0x0D
        case ack = 0x0E
        case discard = 0x0F
    }

    /// True when `size` is a page size the protocol allows.
    @inlinable public static func isValidPageSize(_ size: UInt32) -> Bool {
        pageSizes.contains(size) && size.nonzeroBitCount == 1
    }
}

/// Which of the two connections of a migration session a `hello` opens.
public enum ConnectionRole: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    /// Handshake, vCPU state, the background page stream and control messages.
    case bulk = 1
    /// Demand-fault page requests and their urgent replies, never queued behind bulk data.
    case fault = 2

    public var description: String { self == .bulk ? "bulk" : "fault" }
}

/// Optional protocol features, offered in `hello` and accepted (intersected) in `helloAck`.
/// Unknown bits are carried through unchanged so a newer peer's offer can be intersected.
public struct FeatureFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// All-zero pages may be sent as data-less zero markers.
    public static let zeroPageMarkers = FeatureFlags(rawValue: 1 << 0)
    /// Page batches may hold more than one page.
    public static let batchedPages = FeatureFlags(rawValue: 1 << 1)
    /// The session may be resumed over new connections after a cut (`resume`).
    public static let resume = FeatureFlags(rawValue: 1 << 2)
    /// The destination sends `prioritize` hints that reorder the background stream.
    public static let prioritize = FeatureFlags(rawValue: 1 << 3)
    /// The source ends each pre-copy round with `ack(roundSent)` and waits for the
    /// destination's `ack(roundStored)` before it reads the dirty log: it never pauses while
    /// the destination still has a pre-copy backlog to absorb.
    public static let roundAcks = FeatureFlags(rawValue: 1 << 4)
    /// The source may send `discard` before the pause: stale pre-copied pages are dropped
    /// while the guest still runs, not in the downtime.
    public static let earlyDiscard = FeatureFlags(rawValue: 1 << 5)

    /// Everything this build implements.
    public static let supported: FeatureFlags = [.zeroPageMarkers, .batchedPages, .resume, .prioritize, .roundAcks,
                                                 .earlyDiscard]
}

/// One guest RAM region of the layout announced in `hello`, in page-index order.
public struct MemoryRegionDescriptor: Hashable, Sendable {
    public var guestPhysicalAddress: UInt64
    public var size: UInt64

    public init(guestPhysicalAddress: UInt64, size: UInt64) {
        self.guestPhysicalAddress = guestPhysicalAddress
        self.size = size
    }

    public init(_ range: GuestMemoryRange) {
        self.init(guestPhysicalAddress: range.start.rawValue, size: range.size)
    }
}

/// A decoded or to-be-encoded protocol message.
///
/// Page indices are layout page indices (`PageIndex`): 0 is the first page of the first
/// region in `hello`, counting on through the regions in order. Page ranges are
/// half-open `Range<UInt64>` of such indices (on the wire: start u64, count u64).
public enum WireMessage: Equatable, Sendable {
    /// First message on each connection, source -> destination.
    case hello(Hello)
    /// Destination accepts the hello; `features` is the subset of the offer it will use.
    case helloAck(version: UInt32, features: FeatureFlags)
    /// Destination refuses the hello (or a resume); the connection is then closed.
    case reject(reason: String)
    /// The opaque register state of one vCPU (the engine chooses the serialisation).
    case vcpuState(id: UInt32, blob: [UInt8])
    /// Background page stream, source -> destination, bulk connection.
    case pages(PageBatch)
    /// Demand fault: destination asks for `count` pages from `pageIndex`, fault connection.
    case pageRequest(requestID: UInt64, pageIndex: UInt64, count: UInt32)
    /// Urgent answer to a `pageRequest`, source -> destination, fault connection.
    case pageReply(requestID: UInt64, pages: PageBatch)
    /// Destination hint: stream the pages around this one next.
    case prioritize(pageIndex: UInt64)
    /// At switch-over: the pages the destination does not have yet (never sent or dirtied
    /// since), as ascending, disjoint, non-empty ranges.
    case pageSetSummary([Range<UInt64>])
    /// A digest of guest memory to compare at the end of the migration.
    case digest(algorithm: DigestAlgorithm, bytes: [UInt8])
    /// Everything has been sent (source) / installed and verified (destination).
    case complete
    /// A fatal error; the sender closes the session after it.
    case error(message: String)
    /// After reconnecting: the destination tells the source which pages it still misses
    /// (ascending, disjoint, non-empty ranges) and how many it has installed.
    case resume(sessionID: UInt64, installedPages: UInt64, missing: [Range<UInt64>])
    /// Cumulative acknowledgement: the number of pages the destination has installed.
    case ack(UInt64)
    /// Before the pause (feature `earlyDiscard`): the destination's copies of these pages are
    /// out of date (ascending, disjoint, non-empty ranges); it drops them now, while the guest
    /// still runs on the source, and the switch-over's summary owes them.
    case discard([Range<UInt64>])

    /// The first message of every connection.
    public struct Hello: Hashable, Sendable {
        public var version: UInt32
        public var role: ConnectionRole
        /// Random per migration; ties the two connections (and a resume) together.
        public var sessionID: UInt64
        public var pageSize: UInt32
        public var layout: [MemoryRegionDescriptor]
        public var vcpuCount: UInt32
        public var features: FeatureFlags

        public init(version: UInt32 = WireProtocol.version, role: ConnectionRole, sessionID: UInt64,
                    pageSize: UInt32, layout: [MemoryRegionDescriptor], vcpuCount: UInt32,
                    features: FeatureFlags) {
            self.version = version
            self.role = role
            self.sessionID = sessionID
            self.pageSize = pageSize
            self.layout = layout
            self.vcpuCount = vcpuCount
            self.features = features
        }

        /// A hello announcing `layout` (whose page size must fit in 32 bits, as every valid one does).
        public init(role: ConnectionRole, sessionID: UInt64, layout: GuestMemoryLayout,
                    vcpuCount: UInt32, features: FeatureFlags) {
            self.init(role: role, sessionID: sessionID, pageSize: UInt32(truncatingIfNeeded: layout.pageSize),
                      layout: layout.regions.map(MemoryRegionDescriptor.init), vcpuCount: vcpuCount,
                      features: features)
        }

        /// The announced layout as a `GuestMemoryLayout` (which also rejects overlapping regions).
        public func memoryLayout() throws -> GuestMemoryLayout {
            let regions = try layout.map { region -> GuestMemoryRange in
                guard let range = GuestMemoryRange(start: GuestPhysicalAddress(region.guestPhysicalAddress),
                                                   size: region.size)
                else { throw WireError.malformed("memory region at \(region.guestPhysicalAddress) is empty or wraps") }
                return range
            }
            return try GuestMemoryLayout(pageSize: UInt64(pageSize), regions: regions)
        }
    }

    /// Identifies how a `digest` was computed. Unknown values decode fine; the receiver
    /// decides whether it can check them.
    public struct DigestAlgorithm: RawRepresentable, Hashable, Sendable {
        public var rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }

        /// Order-independent: XOR over all pages of CRC32C(page index as u64 LE ++ page bytes),
        /// 4 bytes LE. The destination can fold each page in as it installs it.
        public static let pageCRC32CXor = DigestAlgorithm(rawValue: 1)
        /// SHA-256 of all guest memory in page-index order (only meaningful while both VMs are paused).
        public static let sha256 = DigestAlgorithm(rawValue: 2)
    }

    /// The header type this message is sent with.
    public var type: WireProtocol.MessageType {
        switch self {
        case .hello: return .hello
        case .helloAck: return .helloAck
        case .reject: return .reject
        case .vcpuState: return .vcpuState
        case .pages: return .pages
        case .pageRequest: return .pageRequest
        case .pageReply: return .pageReply
        case .prioritize: return .prioritize
        case .pageSetSummary: return .pageSetSummary
        case .digest: return .digest
        case .complete: return .complete
        case .error: return .error
        case .resume: return .resume
        case .ack: return .ack
        case .discard: return .discard
        }
    }
}

/// Everything that can go wrong decoding (or encoding) the wire format.
public enum WireError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The stream does not start with the Faultline magic: the peer is something else.
    case notAFaultlinePeer(magic: UInt32)
    /// The peer speaks another protocol version.
    case unsupportedVersion(ours: UInt32, theirs: UInt32)
    /// The stream ended in the middle of a frame; `bufferedBytes` of it had arrived.
    case truncated(bufferedBytes: Int)
    /// A frame announced a payload above the limit.
    case payloadTooLarge(length: UInt32, limit: Int)
    /// A well-formed frame of a type this version does not know.
    case unknownMessageType(UInt16)
    /// A page's data does not match its CRC32C; the page must not be installed.
    case checksumMismatch(pageIndex: UInt64)
    /// The frame header is damaged (its CRC32C does not match).
    case headerChecksumMismatch
    /// The payload (everything but page data) is damaged.
    case payloadChecksumMismatch(WireProtocol.MessageType)
    /// Structurally invalid content.
    case malformed(String)

    /// True when the decoder has consumed the offending frame and can go on decoding the
    /// next one (the frame header was intact). False when framing is lost: the connection
    /// must be dropped, and every later `nextMessage()` repeats this error.
    public var leavesStreamInSync: Bool {
        switch self {
        case .notAFaultlinePeer, .truncated, .payloadTooLarge, .headerChecksumMismatch: return false
        case .unsupportedVersion, .unknownMessageType, .checksumMismatch, .payloadChecksumMismatch, .malformed:
            return true
        }
    }

    public var description: String {
        switch self {
        case .notAFaultlinePeer(let magic):
            return "not a Faultline peer (stream starts with 0x\(String(magic, radix: 16)), expected \"FLT1\")"
        case .unsupportedVersion(let ours, let theirs):
            return "protocol version mismatch: we speak version \(ours), the peer speaks version \(theirs)"
        case .truncated(let n):
            return "the stream ended in the middle of a frame (\(n) bytes of it received)"
        case .payloadTooLarge(let length, let limit):
            return "frame payload of \(length) bytes exceeds the limit of \(limit) bytes"
        case .unknownMessageType(let type):
            return "unknown message type 0x\(String(type, radix: 16))"
        case .checksumMismatch(let page):
            return "page \(page) failed its CRC32C check"
        case .headerChecksumMismatch:
            return "frame header failed its CRC32C check"
        case .payloadChecksumMismatch(let type):
            return "\(type) payload failed its CRC32C check"
        case .malformed(let why):
            return "malformed message: \(why)"
        }
    }
}
