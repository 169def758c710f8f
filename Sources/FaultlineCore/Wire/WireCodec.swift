/// Encoder and incremental decoder for the Faultline wire protocol (see WireProtocol.swift
/// and docs/protocol.md). Page data is never copied more than once on either side: the
/// encoder copies a page from guest memory straight into its output buffer, and the
/// decoder hands out page data as slices of its receive buffer.

// MARK: - Page batches

/// The pages of a `pages` or `pageReply` message, held in wire form (page size, then for
/// each page a 16-byte descriptor followed, for data pages, by the page bytes).
///
/// A decoded batch is a view into the decoder's buffer; it shares that storage without
/// copying. Drop it before feeding the decoder more bytes, or the next append has to copy
/// the buffer (it stays valid either way).
public struct PageBatch: Sequence, Equatable, Sendable, CustomStringConvertible {
    /// How a page is carried.
    public enum Kind: UInt8, Sendable {
        /// The page's bytes follow its descriptor.
        case data = 0
        /// The page is all zeros; no bytes follow (feature `zeroPageMarkers`).
        case zero = 1
    }

    /// One page of a batch. `data` is empty for zero pages and has been checked against `checksum`.
    public struct Page: Equatable, Sendable {
        public var index: UInt64
        public var kind: Kind
        public var checksum: UInt32
        public var data: ArraySlice<UInt8>

        /// Calls `body` with the page's bytes (empty for a zero page), without copying.
        @inlinable public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
            try data.withUnsafeBytes(body)
        }
    }

    public let pageSize: UInt32
    /// Number of pages (data and zero).
    public let count: Int
    /// The batch in wire form: page size u32, then the page entries.
    let wire: ArraySlice<UInt8>

    init(pageSize: UInt32, count: Int, wire: ArraySlice<UInt8>) {
        self.pageSize = pageSize
        self.count = count
        self.wire = wire
    }

    /// A batch built from `pages`: a nil `data` makes a zero marker; otherwise `data` must
    /// be exactly `pageSize` bytes. For streaming without per-page arrays use `WireEncoder.beginPages`.
    public init(pageSize: UInt32, pages: [(index: UInt64, data: [UInt8]?)]) {
        var encoder = WireEncoder()
        encoder.beginPages(pageSize: pageSize)
        for page in pages {
            if let data = page.data {
                _ = data.withUnsafeBytes { encoder.appendPage(index: page.index, bytes: $0) }
            } else {
                encoder.appendZeroPage(index: page.index)
            }
        }
        encoder.endPages()
        self.init(pageSize: pageSize, count: pages.count, wire: encoder.bytes[WireProtocol.headerSize...])
    }

    /// True when every byte of `bytes` is zero (the test for sending a zero marker).
    public static func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        var offset = 0
        var accumulated: UInt64 = 0
        while bytes.count - offset >= 64 {
            for lane in stride(from: offset, to: offset + 64, by: 8) {
                accumulated |= base.loadUnaligned(fromByteOffset: lane, as: UInt64.self)
            }
            if accumulated != 0 { return false }
            offset += 64
        }
        while offset < bytes.count {
            accumulated |= UInt64(base.load(fromByteOffset: offset, as: UInt8.self))
            offset += 1
        }
        return accumulated == 0
    }

    public static func == (a: PageBatch, b: PageBatch) -> Bool { a.wire.elementsEqual(b.wire) }

    public var description: String {
        "PageBatch(\(count) pages of \(pageSize) bytes: \(map(\.index)))"
    }

    public func makeIterator() -> Iterator { Iterator(batch: self) }

    /// Walks the entries of a validated batch.
    public struct Iterator: IteratorProtocol, Sendable {
        let batch: PageBatch
        var offset = 4  // past the page size, relative to the start of `wire`

        public mutating func next() -> Page? {
            let wire = batch.wire
            guard wire.count - offset >= WireProtocol.pageDescriptorSize else { return nil }
            let start = wire.startIndex + offset
            let (index, kindByte, checksum) = wire.withUnsafeBytes { raw in
                (UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: UInt64.self)),
                 raw[offset + 8],
                 UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset + 12, as: UInt32.self)))
            }
            let kind = Kind(rawValue: kindByte) ?? .zero  // a validated batch only holds known kinds
            let dataStart = start + WireProtocol.pageDescriptorSize
            let dataLength = kind == .data ? Swift.min(Int(batch.pageSize), wire.endIndex - dataStart) : 0
            offset += WireProtocol.pageDescriptorSize + dataLength
            return Page(index: index, kind: kind, checksum: checksum, data: wire[dataStart..<dataStart + dataLength])
        }
    }

    /// Validates a batch in wire form, feeding its non-data bytes to `crc` and, when
    /// `verifyData`, checking each data page against its CRC32C. Returns the page size,
    /// the page count and the first page whose data failed its check.
    static func scan(_ wire: UnsafeRawBufferPointer, crc: inout CRC32C, verifyData: Bool)
        throws(WireError) -> (pageSize: UInt32, count: Int, firstBadPage: UInt64?)
    {
        var reader = WireReader(wire, "page batch")
        let pageSize = try reader.read(UInt32.self)
        guard WireProtocol.isValidPageSize(pageSize) else {
            throw .malformed("page batch has invalid page size \(pageSize)")
        }
        crc.update(UnsafeRawBufferPointer(rebasing: wire[0..<4]))
        var count = 0
        var firstBad: UInt64?
        while reader.remaining > 0 {
            let descriptor = try reader.bytes(WireProtocol.pageDescriptorSize)
            crc.update(descriptor)
            let index = UInt64(littleEndian: descriptor.loadUnaligned(as: UInt64.self))
            let kindAndReserved = UInt32(littleEndian: descriptor.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            let checksum = UInt32(littleEndian: descriptor.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
            switch kindAndReserved {
            case UInt32(Kind.data.rawValue):
                let data = try reader.bytes(Int(pageSize))
                if verifyData, firstBad == nil, CRC32C.checksum(data) != checksum { firstBad = index }
            case UInt32(Kind.zero.rawValue):
                guard checksum == 0 else { throw .malformed("zero page \(index) carries a checksum") }
            default:
                throw .malformed("page \(index) has unknown kind/reserved bits 0x\(String(kindAndReserved, radix: 16))")
            }
            count += 1
        }
        return (pageSize, count, firstBad)
    }
}

// MARK: - Encoder

/// Appends encoded frames to a reusable byte buffer.
///
///     var encoder = WireEncoder(reservingCapacity: 1 << 20)
///     try encoder.encode(.prioritize(pageIndex: 42))
///     encoder.beginPages(pageSize: 4096)
///     encoder.appendPage(index: 7, bytes: pagePointer)   // copied once, checksummed in place
///     encoder.endPages()
///     send(encoder.bytes); encoder.removeAll()           // capacity is kept
public struct WireEncoder: Sendable {
    /// The encoded frames so far.
    public private(set) var bytes: [UInt8]
    private var batch: OpenBatch?

    private struct OpenBatch {
        var frameStart: Int
        var pageSize: Int
        var pageCount = 0
        var crc = CRC32C()
    }

    public init(reservingCapacity capacity: Int = 0) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    /// Forgets the encoded bytes (and abandons an open page batch) but keeps the buffer's
    /// capacity - after a failed send, the frames are simply dropped.
    public mutating func removeAll() {
        batch = nil
        bytes.removeAll(keepingCapacity: true)
    }

    /// The frames of a single message.
    public static func encode(_ message: WireMessage) throws(WireError) -> [UInt8] {
        var encoder = WireEncoder()
        try encoder.encode(message)
        return encoder.bytes
    }

    /// Appends one frame. Throws `malformed` for content the decoder would reject
    /// (the version is not checked, so a test can speak another one) and
    /// `payloadTooLarge` when the payload would exceed `WireProtocol.maxPayloadLength`;
    /// nothing is appended then.
    public mutating func encode(_ message: WireMessage) throws(WireError) {
        precondition(batch == nil, "encode(_:) inside an open page batch")
        let start = bytes.count
        appendHeader(message.type)
        var crc = CRC32C()
        do throws(WireError) {
            switch message {
            case .hello(let hello):
                try WireValidation.check(hello)
                append(hello.version)
                append(hello.role.rawValue)
                append(hello.sessionID)
                append(hello.pageSize)
                append(hello.vcpuCount)
                append(hello.features.rawValue)
                append(UInt32(hello.layout.count))
                for region in hello.layout {
                    append(region.guestPhysicalAddress)
                    append(region.size)
                }
            case .helloAck(let version, let features):
                append(version)
                append(features.rawValue)
            case .reject(let text), .error(let text):
                bytes.append(contentsOf: text.utf8)
            case .vcpuState(let id, let blob):
                append(id)
                bytes.append(contentsOf: blob)
            case .pages(let pages):
                try appendBatch(pages, crc: &crc)
            case .pageReply(let requestID, let pages):
                append(requestID)
                bytes.withUnsafeBytes { crc.update(UnsafeRawBufferPointer(rebasing: $0[(start + WireProtocol.headerSize)...])) }
                try appendBatch(pages, crc: &crc)
            case .pageRequest(let requestID, let pageIndex, let count):
                try WireValidation.checkRequest(pageIndex: pageIndex, count: count)
                append(requestID)
                append(pageIndex)
                append(count)
            case .prioritize(let index), .ack(let index):
                append(index)
            case .pageSetSummary(let ranges), .discard(let ranges):
                try appendRanges(ranges)
            case .digest(let algorithm, let digest):
                append(algorithm.rawValue)
                bytes.append(contentsOf: digest)
            case .complete:
                break
            case .resume(let sessionID, let installed, let missing):
                append(sessionID)
                append(installed)
                try appendRanges(missing)
            }
            if message.type != .pages && message.type != .pageReply {
                bytes.withUnsafeBytes { crc.update(UnsafeRawBufferPointer(rebasing: $0[(start + WireProtocol.headerSize)...])) }
            }
            try finishFrame(at: start, payloadCRC: crc.value)
        } catch {
            bytes.removeSubrange(start...)
            throw error
        }
    }

    // MARK: Streaming page batches

    /// Opens a `pages` frame (or, with `requestID`, a `pageReply` frame) to which pages are
    /// appended one by one. Close it with `endPages()` before encoding anything else.
    public mutating func beginPages(pageSize: UInt32, replyingTo requestID: UInt64? = nil) {
        precondition(batch == nil, "beginPages inside an open page batch")
        precondition(WireProtocol.isValidPageSize(pageSize), "invalid page size \(pageSize)")
        let start = bytes.count
        appendHeader(requestID == nil ? .pages : .pageReply)
        if let requestID { append(requestID) }
        append(pageSize)
        var crc = CRC32C()
        bytes.withUnsafeBytes { crc.update(UnsafeRawBufferPointer(rebasing: $0[(start + WireProtocol.headerSize)...])) }
        batch = OpenBatch(frameStart: start, pageSize: Int(pageSize), crc: crc)
    }

    /// Pages appended to the open batch so far.
    public var openBatchPageCount: Int { batch?.pageCount ?? 0 }

    /// True when a batch is open and one more data page fits under the payload limit.
    public var canAppendPage: Bool {
        guard let batch else { return false }
        let payload = bytes.count - batch.frameStart - WireProtocol.headerSize
        return payload + WireProtocol.pageDescriptorSize + batch.pageSize <= WireProtocol.maxPayloadLength
    }

    /// Appends a data page. The bytes are copied once into the output buffer and the
    /// CRC32C is computed over that copy, so a page being written concurrently (by a
    /// running guest during pre-copy) still goes out self-consistent.
    /// `bytes.count` must equal the batch's page size and `canAppendPage` must be true.
    /// Returns the page's CRC32C (what the source's memory digest is built from).
    @discardableResult
    public mutating func appendPage(index: UInt64, bytes page: UnsafeRawBufferPointer) -> UInt32 {
        guard var open = batch else { preconditionFailure("appendPage outside a page batch") }
        precondition(page.count == open.pageSize, "page of \(page.count) bytes in a batch of \(open.pageSize)-byte pages")
        precondition(canAppendPage, "page batch is full; check canAppendPage")
        let descriptor = bytes.count
        append(index)
        append(UInt32(PageBatch.Kind.data.rawValue))
        append(UInt32(0))  // checksum, patched below
        if let base = page.baseAddress {
            bytes.append(contentsOf: UnsafeBufferPointer(start: base.assumingMemoryBound(to: UInt8.self), count: page.count))
        }
        let checksum = bytes.withUnsafeMutableBytes { raw in
            let dataStart = descriptor + WireProtocol.pageDescriptorSize
            let checksum = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[dataStart..<dataStart + open.pageSize]))
            raw.storeBytes(of: checksum.littleEndian, toByteOffset: descriptor + 12, as: UInt32.self)
            open.crc.update(UnsafeRawBufferPointer(rebasing: raw[descriptor..<dataStart]))
            return checksum
        }
        open.pageCount += 1
        batch = open
        return checksum
    }

    /// Appends a zero-page marker (no data; only with the `zeroPageMarkers` feature).
    public mutating func appendZeroPage(index: UInt64) {
        guard var open = batch else { preconditionFailure("appendZeroPage outside a page batch") }
        let descriptor = bytes.count
        append(index)
        append(UInt32(PageBatch.Kind.zero.rawValue))
        append(UInt32(0))
        bytes.withUnsafeBytes { open.crc.update(UnsafeRawBufferPointer(rebasing: $0[descriptor...])) }
        open.pageCount += 1
        batch = open
    }

    /// Closes the open batch (a `pages` frame, opened without a request id) and returns its
    /// pages as a ``PageBatch``, for pages handed over inside one process with no socket in
    /// between. The frame stays in ``bytes``; the batch shares its storage.
    public mutating func endPagesAsBatch() -> PageBatch {
        guard let open = batch else { preconditionFailure("endPagesAsBatch without beginPages") }
        endPages()
        return PageBatch(pageSize: UInt32(open.pageSize), count: open.pageCount,
                         wire: bytes[(open.frameStart + WireProtocol.headerSize)...])
    }

    /// Closes the open batch, completing its frame.
    public mutating func endPages() {
        guard let open = batch else { preconditionFailure("endPages without beginPages") }
        batch = nil
        do {
            try finishFrame(at: open.frameStart, payloadCRC: open.crc.value)
        } catch {
            preconditionFailure("page batch exceeded the payload limit: \(error)")  // prevented by appendPage
        }
    }

    // MARK: Helpers

    private mutating func append<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    private mutating func appendHeader(_ type: WireProtocol.MessageType) {
        append(WireProtocol.magic)
        append(type.rawValue)
        append(UInt16(0))  // flags
        append(UInt32(0))  // length, patched by finishFrame
        append(UInt32(0))  // payload CRC32C, patched
        append(UInt32(0))  // header CRC32C, patched
    }

    private mutating func appendRanges(_ ranges: [Range<UInt64>]) throws(WireError) {
        try WireValidation.check(ranges)
        append(UInt32(ranges.count))
        for range in ranges {
            append(range.lowerBound)
            append(range.upperBound - range.lowerBound)
        }
    }

    private mutating func appendBatch(_ pages: PageBatch, crc: inout CRC32C) throws(WireError) {
        var scanned = crc
        let result = pages.wire.withUnsafeBytes { raw in
            Result { () throws(WireError) in try PageBatch.scan(raw, crc: &scanned, verifyData: false) }
        }
        _ = try result.get()
        crc = scanned
        bytes.append(contentsOf: pages.wire)
    }

    private mutating func finishFrame(at start: Int, payloadCRC: UInt32) throws(WireError) {
        let length = bytes.count - start - WireProtocol.headerSize
        guard length <= WireProtocol.maxPayloadLength else {
            throw .payloadTooLarge(length: UInt32(clamping: length), limit: WireProtocol.maxPayloadLength)
        }
        bytes.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: UInt32(length).littleEndian, toByteOffset: start + 8, as: UInt32.self)
            raw.storeBytes(of: payloadCRC.littleEndian, toByteOffset: start + 12, as: UInt32.self)
            let headerCRC = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[start..<start + 16]))
            raw.storeBytes(of: headerCRC.littleEndian, toByteOffset: start + 16, as: UInt32.self)
        }
    }
}

// MARK: - Decoder

/// Turns a byte stream, fed in arbitrary pieces, back into messages.
///
///     var decoder = WireDecoder()
///     decoder.append(received)
///     while let message = try decoder.nextMessage() { handle(message) }
///     // at end of stream: try decoder.finish()
///
/// Errors with `leavesStreamInSync` (a bad page, a bad payload, an unknown type) consume
/// just the offending frame, so the caller may carry on; other errors are sticky.
/// Never traps on any input.
public struct WireDecoder: Sendable {
    private var storage: [UInt8] = []
    private var readIndex = 0
    private var writeIndex = 0
    private var failure: WireError?
    /// Frames announcing a longer payload are rejected with `payloadTooLarge`.
    public let maxPayloadLength: Int

    /// `initialCapacity`: bytes of receive buffer allocated now, so that a decoder fed in
    /// bounded reads never allocates while it runs (see ``WireChannel``). The bytes are left
    /// unwritten: only what a read put there is ever decoded, and a buffer of half a MiB
    /// written with zeros up front would cost every connection its first touch of each page
    /// (a millisecond on a nested host, on the way to a restored guest's first instruction).
    public init(maxPayloadLength: Int = WireProtocol.maxPayloadLength, initialCapacity: Int = 0) {
        self.maxPayloadLength = min(max(maxPayloadLength, 0), WireProtocol.maxPayloadLength)
        if initialCapacity > 0 {
            storage = [UInt8](unsafeUninitializedCapacity: initialCapacity) { _, count in count = initialCapacity }
        }
    }

    /// Bytes of receive buffer allocated (grows only when a read and the unread bytes do not fit).
    public var capacity: Int { storage.count }

    /// The capacity at which reads of up to `readBytes` never grow the buffer while no frame
    /// is longer than a page reply of ``WireProtocol/maxPagesPerRequest`` 4 KiB pages (the
    /// unread part of a frame, plus a read).
    public static func steadyCapacity(readBytes: Int) -> Int {
        let largestFrame = WireProtocol.headerSize + 8 + 4096
            + Int(WireProtocol.maxPagesPerRequest) * (WireProtocol.pageDescriptorSize + 4096)
        return readBytes + largestFrame
    }

    /// Bytes received but not yet decoded.
    public var bufferedByteCount: Int { writeIndex - readIndex }

    /// Feeds received bytes.
    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress, !bytes.isEmpty else { return }
        reserveWritable(bytes.count)
        storage.withUnsafeMutableBytes { raw in
            (raw.baseAddress.unsafelyUnwrapped + writeIndex).copyMemory(from: base, byteCount: bytes.count)
        }
        writeIndex += bytes.count
    }

    /// Feeds received bytes.
    public mutating func append(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { append($0) }
    }

    /// Lets `fill` write up to `maxCount` bytes straight into the receive buffer (e.g. a
    /// `recv` call) and returns how many it reported writing, which must be in 0...maxCount.
    @discardableResult
    public mutating func append(upTo maxCount: Int, using fill: (UnsafeMutableRawBufferPointer) throws -> Int) rethrows -> Int {
        precondition(maxCount >= 0, "negative count")
        reserveWritable(maxCount)
        let start = writeIndex
        let written = try storage.withUnsafeMutableBytes { raw in
            try fill(UnsafeMutableRawBufferPointer(rebasing: raw[start..<start + maxCount]))
        }
        precondition((0...maxCount).contains(written), "fill reported \(written) bytes for a \(maxCount)-byte window")
        writeIndex += written
        return written
    }

    /// The next complete message, or nil when more bytes are needed.
    public mutating func nextMessage() throws(WireError) -> WireMessage? {
        if let failure { throw failure }
        let available = writeIndex - readIndex
        guard available >= 4 else { return nil }
        let magic = load(UInt32.self, at: readIndex)
        guard magic == WireProtocol.magic else { return try fail(.notAFaultlinePeer(magic: magic)) }
        guard available >= WireProtocol.headerSize else { return nil }
        let headerCRC = storage.withUnsafeBytes {
            CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[readIndex..<readIndex + 16]))
        }
        guard headerCRC == load(UInt32.self, at: readIndex + 16) else { return try fail(.headerChecksumMismatch) }
        let length = load(UInt32.self, at: readIndex + 8)
        guard UInt64(length) <= UInt64(maxPayloadLength) else {
            return try fail(.payloadTooLarge(length: length, limit: maxPayloadLength))
        }
        guard available - WireProtocol.headerSize >= Int(length) else { return nil }

        // The frame is complete and its header trustworthy: consume it before looking inside,
        // so a bad payload leaves the decoder at the next frame.
        let rawType = load(UInt16.self, at: readIndex + 4)
        let flags = load(UInt16.self, at: readIndex + 6)
        let payloadCRC = load(UInt32.self, at: readIndex + 12)
        let payload = readIndex + WireProtocol.headerSize ..< readIndex + WireProtocol.headerSize + Int(length)
        readIndex = payload.upperBound
        if readIndex == writeIndex { (readIndex, writeIndex) = (0, 0) }

        guard let type = WireProtocol.MessageType(rawValue: rawType) else { throw .unknownMessageType(rawType) }
        guard flags == 0 else { throw .malformed("\(type) frame has reserved flags 0x\(String(flags, radix: 16)) set") }
        return try decodePayload(type, range: payload, expectedCRC: payloadCRC)
    }

    /// Call at end of stream: throws `truncated` when it stopped inside a frame.
    public func finish() throws(WireError) {
        if let failure { throw failure }
        if bufferedByteCount > 0 { throw .truncated(bufferedBytes: bufferedByteCount) }
    }

    // MARK: Payloads

    private func decodePayload(_ type: WireProtocol.MessageType, range: Range<Int>,
                               expectedCRC: UInt32) throws(WireError) -> WireMessage {
        let result = storage.withUnsafeBytes { raw -> Result<WireMessage, WireError> in
            do throws(WireError) {
                let payload = UnsafeRawBufferPointer(rebasing: raw[range])
                return .success(try Self.decode(type, payload, expectedCRC: expectedCRC) { storage[$0.shifted(by: range.lowerBound)] })
            } catch {
                return .failure(error)
            }
        }
        return try result.get()
    }

    /// Decodes one payload. `batchWire` turns a range of `payload` into a slice of the
    /// receive buffer, so page batches share its storage.
    private static func decode(_ type: WireProtocol.MessageType, _ payload: UnsafeRawBufferPointer, expectedCRC: UInt32,
                               batchWire: (Range<Int>) -> ArraySlice<UInt8>) throws(WireError) -> WireMessage {
        var crc = CRC32C()
        if type == .pages || type == .pageReply {
            let batchStart = type == .pageReply ? 8 : 0
            guard payload.count >= batchStart else { throw .malformed("\(type) payload too short") }
            crc.update(UnsafeRawBufferPointer(rebasing: payload[0..<batchStart]))
            let wire = UnsafeRawBufferPointer(rebasing: payload[batchStart...])
            let scan: (pageSize: UInt32, count: Int, firstBadPage: UInt64?)
            do throws(WireError) {
                scan = try PageBatch.scan(wire, crc: &crc, verifyData: true)
            } catch {
                // The payload CRC leaves page data out, so where it applies depends on the
                // descriptors: a batch whose structure is broken cannot be checked the normal
                // way. Built wrong by its sender, its CRC covers every byte (there is no data
                // to leave out); damaged in transit, it does not. Damage is dropped like any
                // damaged batch, never taken for a protocol violation.
                guard case .malformed = error, CRC32C.checksum(payload) != expectedCRC else { throw error }
                throw .payloadChecksumMismatch(type)
            }
            guard crc.value == expectedCRC else { throw .payloadChecksumMismatch(type) }
            if let bad = scan.firstBadPage { throw .checksumMismatch(pageIndex: bad) }
            let batch = PageBatch(pageSize: scan.pageSize, count: scan.count, wire: batchWire(batchStart..<payload.count))
            if type == .pages { return .pages(batch) }
            return .pageReply(requestID: UInt64(littleEndian: payload.loadUnaligned(as: UInt64.self)), pages: batch)
        }

        crc.update(payload)
        guard crc.value == expectedCRC else { throw .payloadChecksumMismatch(type) }
        var reader = WireReader(payload, "\(type)")
        let message: WireMessage
        switch type {
        case .hello:
            let version = try reader.read(UInt32.self)
            guard version == WireProtocol.version else {
                throw .unsupportedVersion(ours: WireProtocol.version, theirs: version)
            }
            let rawRole = try reader.read(UInt32.self)
            guard let role = ConnectionRole(rawValue: rawRole) else { throw .malformed("hello has unknown role \(rawRole)") }
            let sessionID = try reader.read(UInt64.self)
            let pageSize = try reader.read(UInt32.self)
            let vcpuCount = try reader.read(UInt32.self)
            let features = FeatureFlags(rawValue: try reader.read(UInt64.self))
            let regionCount = try reader.read(UInt32.self)
            guard regionCount <= WireProtocol.maxMemoryRegions, reader.remaining == Int(regionCount) * 16 else {
                throw .malformed("hello announces \(regionCount) regions in \(reader.remaining) bytes")
            }
            var layout: [MemoryRegionDescriptor] = []
            layout.reserveCapacity(Int(regionCount))
            for _ in 0..<regionCount {
                layout.append(MemoryRegionDescriptor(guestPhysicalAddress: try reader.read(UInt64.self),
                                                     size: try reader.read(UInt64.self)))
            }
            let hello = WireMessage.Hello(version: version, role: role, sessionID: sessionID, pageSize: pageSize,
                                          layout: layout, vcpuCount: vcpuCount, features: features)
            try WireValidation.check(hello)
            message = .hello(hello)
        case .helloAck:
            let version = try reader.read(UInt32.self)
            guard version == WireProtocol.version else {
                throw .unsupportedVersion(ours: WireProtocol.version, theirs: version)
            }
            message = .helloAck(version: version, features: FeatureFlags(rawValue: try reader.read(UInt64.self)))
        case .reject:
            message = .reject(reason: String(decoding: reader.rest(), as: UTF8.self))
        case .error:
            message = .error(message: String(decoding: reader.rest(), as: UTF8.self))
        case .vcpuState:
            message = .vcpuState(id: try reader.read(UInt32.self), blob: Array(reader.rest()))
        case .pageRequest:
            let requestID = try reader.read(UInt64.self)
            let pageIndex = try reader.read(UInt64.self)
            let count = try reader.read(UInt32.self)
            try WireValidation.checkRequest(pageIndex: pageIndex, count: count)
            message = .pageRequest(requestID: requestID, pageIndex: pageIndex, count: count)
        case .prioritize:
            message = .prioritize(pageIndex: try reader.read(UInt64.self))
        case .pageSetSummary:
            message = .pageSetSummary(try reader.readRanges())
        case .discard:
            message = .discard(try reader.readRanges())
        case .digest:
            message = .digest(algorithm: .init(rawValue: try reader.read(UInt32.self)), bytes: Array(reader.rest()))
        case .complete:
            message = .complete
        case .resume:
            message = .resume(sessionID: try reader.read(UInt64.self), installedPages: try reader.read(UInt64.self),
                              missing: try reader.readRanges())
        case .ack:
            message = .ack(try reader.read(UInt64.self))
        case .pages, .pageReply:
            preconditionFailure("handled above")
        }
        try reader.expectEnd()
        return message
    }

    // MARK: Buffer management

    private mutating func fail(_ error: WireError) throws(WireError) -> WireMessage? {
        failure = error
        throw error
    }

    private func load<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        storage.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    /// Makes room for `count` more bytes after `writeIndex`: moves the unread bytes to the
    /// front, into a larger buffer when they would not fit with `count` more.
    private mutating func reserveWritable(_ count: Int) {
        if storage.count - writeIndex >= count { return }
        let unread = writeIndex - readIndex
        let needed = unread + count
        if storage.count >= needed {
            storage.withUnsafeMutableBytes { raw in
                guard unread > 0, let base = raw.baseAddress else { return }
                base.copyMemory(from: base + readIndex, byteCount: unread)  // a memmove: may overlap
            }
        } else {
            var grown = [UInt8](repeating: 0, count: max(needed, storage.count * 2, 4096))
            grown.withUnsafeMutableBytes { target in
                storage.withUnsafeBytes { source in
                    guard unread > 0, let to = target.baseAddress, let from = source.baseAddress else { return }
                    to.copyMemory(from: from + readIndex, byteCount: unread)
                }
            }
            storage = grown
        }
        (readIndex, writeIndex) = (0, unread)
    }
}

// MARK: - Shared reading and validation

/// A bounds-checked little-endian cursor over a payload; running off the end is `malformed`.
struct WireReader {
    let buffer: UnsafeRawBufferPointer
    let context: String
    var offset = 0

    init(_ buffer: UnsafeRawBufferPointer, _ context: String) {
        self.buffer = buffer
        self.context = context
    }

    var remaining: Int { buffer.count - offset }

    mutating func read<T: FixedWidthInteger>(_: T.Type) throws(WireError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw .malformed("\(context) payload ends early (at byte \(offset))") }
        defer { offset += size }
        return T(littleEndian: buffer.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    mutating func bytes(_ count: Int) throws(WireError) -> UnsafeRawBufferPointer {
        guard count >= 0, remaining >= count else { throw .malformed("\(context) payload ends early (at byte \(offset))") }
        defer { offset += count }
        return UnsafeRawBufferPointer(rebasing: buffer[offset..<offset + count])
    }

    mutating func rest() -> UnsafeRawBufferPointer {
        defer { offset = buffer.count }
        return UnsafeRawBufferPointer(rebasing: buffer[offset...])
    }

    /// A u32 count followed by that many (start u64, count u64) ranges, validated.
    mutating func readRanges() throws(WireError) -> [Range<UInt64>] {
        let count = try read(UInt32.self)
        guard remaining / 16 >= Int(count) else { throw .malformed("\(context) announces \(count) ranges in \(remaining) bytes") }
        var ranges: [Range<UInt64>] = []
        ranges.reserveCapacity(Int(count))
        for _ in 0..<count {
            let start = try read(UInt64.self)
            let length = try read(UInt64.self)
            let (end, overflow) = start.addingReportingOverflow(length)
            guard !overflow else { throw .malformed("\(context) range \(start)+\(length) wraps around") }
            ranges.append(start..<end)
        }
        try WireValidation.check(ranges)
        return ranges
    }

    func expectEnd() throws(WireError) {
        guard remaining == 0 else { throw .malformed("\(context) payload has \(remaining) trailing bytes") }
    }
}

/// Content rules shared by the encoder and the decoder.
enum WireValidation {
    static func check(_ hello: WireMessage.Hello) throws(WireError) {
        guard WireProtocol.isValidPageSize(hello.pageSize) else { throw .malformed("hello has invalid page size \(hello.pageSize)") }
        guard hello.vcpuCount > 0 else { throw .malformed("hello announces no vCPUs") }
        guard !hello.layout.isEmpty, hello.layout.count <= WireProtocol.maxMemoryRegions else {
            throw .malformed("hello announces \(hello.layout.count) memory regions")
        }
        let mask = UInt64(hello.pageSize) - 1
        for region in hello.layout {
            let (_, wraps) = region.guestPhysicalAddress.addingReportingOverflow(region.size)
            guard region.size > 0, !wraps, region.guestPhysicalAddress & mask == 0, region.size & mask == 0 else {
                throw .malformed("memory region at 0x\(String(region.guestPhysicalAddress, radix: 16)) of \(region.size) bytes is empty, unaligned or wraps")
            }
        }
    }

    /// Ranges must be non-empty, ascending and disjoint.
    static func check(_ ranges: [Range<UInt64>]) throws(WireError) {
        guard ranges.count <= Int(UInt32.max) else { throw .malformed("too many ranges") }
        var floor: UInt64 = 0
        for (i, range) in ranges.enumerated() {
            guard !range.isEmpty else { throw .malformed("page range \(range) is empty") }
            guard i == 0 || range.lowerBound >= floor else { throw .malformed("page range \(range) overlaps or is out of order") }
            floor = range.upperBound
        }
    }

    static func checkRequest(pageIndex: UInt64, count: UInt32) throws(WireError) {
        guard count > 0, count <= WireProtocol.maxPagesPerRequest, !pageIndex.addingReportingOverflow(UInt64(count)).overflow else {
            throw .malformed("page request for \(count) pages at \(pageIndex) (1...\(WireProtocol.maxPagesPerRequest) per request)")
        }
    }
}

private extension Range where Bound == Int {
    func shifted(by delta: Int) -> Range<Int> { lowerBound + delta ..< upperBound + delta }
}
