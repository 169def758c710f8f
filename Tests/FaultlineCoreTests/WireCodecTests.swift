import Testing
@testable import FaultlineCore

// MARK: - Helpers

/// SplitMix64: a tiny seeded generator so fuzz failures reproduce.
private struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Bit-at-a-time CRC32C, the reference the table-driven one must match.
private func referenceCRC32C(_ bytes: [UInt8]) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    for byte in bytes {
        crc ^= UInt32(byte)
        for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    }
    return ~crc
}

private func page(_ seed: UInt8, size: Int = 4096) -> [UInt8] {
    (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) }
}

private func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.littleEndian) { Array($0) }
}

/// A frame assembled by hand, with correct checksums unless told otherwise.
private func rawFrame(type: UInt16, flags: UInt16 = 0, payload: [UInt8], length: UInt32? = nil,
                      magic: UInt32 = WireProtocol.magic) -> [UInt8] {
    var header = le(magic) + le(type) + le(flags) + le(length ?? UInt32(payload.count)) + le(CRC32C.checksum(payload))
    header += le(CRC32C.checksum(header))
    return header + payload
}

private let sampleHello = WireMessage.Hello(
    role: .bulk, sessionID: 0xDEAD_BEEF_0123_4567, pageSize: 4096,
    layout: [MemoryRegionDescriptor(guestPhysicalAddress: 0, size: 0xA0000),
             MemoryRegionDescriptor(guestPhysicalAddress: 0x10_0000, size: 0x3FF0_0000)],
    vcpuCount: 4, features: [.zeroPageMarkers, .batchedPages, .resume])

private let sampleBatch = PageBatch(pageSize: 4096, pages: [(7, page(1)), (8, nil), (1_000_000, page(2))])

/// One message of every type.
private let sampleMessages: [WireMessage] = [
    .hello(sampleHello),
    .hello(WireMessage.Hello(role: .fault, sessionID: 1, pageSize: 2 << 20,
                             layout: [MemoryRegionDescriptor(guestPhysicalAddress: 0, size: 4 << 20)],
                             vcpuCount: 1, features: FeatureFlags(rawValue: 1 << 63))),
    .helloAck(version: 2, features: [.zeroPageMarkers, .resume]),
    .reject(reason: "session 42 unknown; ☃"),
    .vcpuState(id: 3, blob: Array(0..<200)),
    .vcpuState(id: 0, blob: []),
    .pages(sampleBatch),
    .pages(PageBatch(pageSize: 4096, pages: [])),
    .pageRequest(requestID: 99, pageIndex: 12345, count: 16),
    .pageReply(requestID: 99, pages: PageBatch(pageSize: 4096, pages: [(12345, page(9))])),
    .prioritize(pageIndex: 777),
    .pageSetSummary([0..<10, 20..<21, 1 << 40 ..< (1 << 40) + 3]),
    .pageSetSummary([]),
    .digest(algorithm: .pageCRC32CXor, bytes: [1, 2, 3, 4]),
    .complete,
    .error(message: "vCPU 2 state rejected"),
    .resume(sessionID: 0xDEAD_BEEF_0123_4567, installedPages: 5000, missing: [5..<6, 100..<4000]),
    .ack(.max),
    .discard([0..<10, 20..<21]),
    .discard([]),
]

private func encodeAll(_ messages: [WireMessage]) throws -> [UInt8] {
    var encoder = WireEncoder()
    for message in messages { try encoder.encode(message) }
    return encoder.bytes
}

/// Feeds `bytes` in chunks of `chunk` bytes and decodes until the first error.
private func decodeAll(_ bytes: [UInt8], chunk: Int = .max) -> (messages: [WireMessage], error: WireError?) {
    var decoder = WireDecoder()
    var messages: [WireMessage] = []
    var offset = 0
    do {
        repeat {
            let end = offset + min(chunk, bytes.count - offset)
            bytes[offset..<end].withUnsafeBytes { decoder.append($0) }
            offset = end
            while let message = try decoder.nextMessage() {
                messages.append(message)
                // Every frame takes at least one byte: more messages than bytes is a decoder stuck in place.
                guard messages.count <= bytes.count else { Issue.record("the decoder returns messages without consuming input"); return (messages, nil) }
            }
        } while offset < bytes.count
        try decoder.finish()
        return (messages, nil)
    } catch {
        return (messages, error)
    }
}

// MARK: - Codec

@Suite struct WireCodecTests {
    @Test func samplesCoverEveryMessageType() {
        #expect(Set(sampleMessages.map(\.type)) == Set(WireProtocol.MessageType.allCases))
    }

    @Test func everyMessageRoundTrips() throws {
        for message in sampleMessages {
            let bytes = try WireEncoder.encode(message)
            let (decoded, error) = decodeAll(bytes)
            #expect(error == nil, "\(message.type): \(String(describing: error))")
            #expect(decoded == [message])
        }
    }

    @Test func headerLayoutIsAsDocumented() throws {
        let bytes = try WireEncoder.encode(.ack(5))
        #expect(Array(bytes[0..<4]) == Array("FLT1".utf8))
        #expect(Array(bytes[4..<8]) == [0x0E, 0, 0, 0])  // type ack, flags 0
        #expect(Array(bytes[8..<12]) == [8, 0, 0, 0])  // payload length
        #expect(Array(bytes[12..<16]) == le(CRC32C.checksum(le(UInt64(5)))))
        #expect(Array(bytes[16..<20]) == le(CRC32C.checksum(Array(bytes[0..<16]))))
        #expect(Array(bytes[20...]) == le(UInt64(5)))
    }

    @Test func byteAtATimeDecodingYieldsTheSameMessages() throws {
        let stream = try encodeAll(sampleMessages)
        for chunk in [1, 3, 19, 20, 21, 4096, 5000] {
            let (decoded, error) = decodeAll(stream, chunk: chunk)
            #expect(error == nil, "chunk \(chunk)")
            #expect(decoded == sampleMessages, "chunk \(chunk)")
        }
    }

    @Test func decodedPagesCarryTheirDataAndChecksums() throws {
        let (decoded, error) = decodeAll(try WireEncoder.encode(.pages(sampleBatch)))
        #expect(error == nil)
        guard case .pages(let batch)? = decoded.first else { Issue.record("no batch"); return }
        let pages = Array(batch)
        #expect(batch.count == 3 && pages.count == 3)
        #expect(pages.map(\.index) == [7, 8, 1_000_000])
        #expect(pages.map(\.kind) == [.data, .zero, .data])
        #expect(Array(pages[0].data) == page(1) && pages[1].data.isEmpty && Array(pages[2].data) == page(2))
        #expect(pages[0].checksum == CRC32C.checksum(page(1)))
        #expect(pages[2].withUnsafeBytes { CRC32C.checksum($0) } == pages[2].checksum)
    }

    @Test func streamingBatchEncoderMatchesBatchValue() throws {
        var encoder = WireEncoder(reservingCapacity: 1 << 16)
        encoder.beginPages(pageSize: 4096, replyingTo: 99)
        let crc9 = page(9).withUnsafeBytes { encoder.appendPage(index: 12345, bytes: $0) }
        #expect(crc9 == CRC32C.checksum(page(9)))  // the source's digest is built from this
        #expect(encoder.openBatchPageCount == 1 && encoder.canAppendPage)
        encoder.endPages()
        #expect(!encoder.canAppendPage)
        encoder.beginPages(pageSize: 4096)
        _ = page(1).withUnsafeBytes { encoder.appendPage(index: 7, bytes: $0) }
        encoder.appendZeroPage(index: 8)
        _ = page(2).withUnsafeBytes { encoder.appendPage(index: 1_000_000, bytes: $0) }
        encoder.endPages()
        let expected = try encodeAll([.pageReply(requestID: 99, pages: PageBatch(pageSize: 4096, pages: [(12345, page(9))])),
                                      .pages(sampleBatch)])
        #expect(encoder.bytes == expected)
        encoder.removeAll()
        #expect(encoder.bytes.isEmpty)
    }

    @Test func zeroPageDetection() {
        var bytes = [UInt8](repeating: 0, count: 4096)
        #expect(bytes.withUnsafeBytes { PageBatch.isAllZero($0) })
        for position in [0, 63, 64, 4095] {
            bytes[position] = 1
            #expect(!bytes.withUnsafeBytes { PageBatch.isAllZero($0) }, "byte \(position)")
            bytes[position] = 0
        }
    }

    @Test func directReceiveIntoTheDecoderBuffer() throws {
        let stream = try encodeAll(sampleMessages)
        var decoder = WireDecoder()
        var offset = 0
        var messages: [WireMessage] = []
        while offset < stream.count {
            let written = decoder.append(upTo: 777) { window in
                let n = min(window.count, stream.count - offset)
                stream[offset..<offset + n].withUnsafeBytes { window.copyMemory(from: $0) }
                return n
            }
            try #require(written > 0, "append(upTo:) took no bytes at offset \(offset)")
            offset += written
            while let message = try decoder.nextMessage() {
                messages.append(message)
                try #require(messages.count <= stream.count, "the decoder returns messages without consuming input")
            }
        }
        try decoder.finish()
        #expect(messages == sampleMessages)
    }

    @Test func aDecoderAtItsSteadyCapacityNeverGrows() throws {
        // Full-window replies (the largest frames), read 1 MiB at a time as WireChannel does.
        let readBytes = 1 << 20
        let pages = (0..<Int(WireProtocol.maxPagesPerRequest)).map { (UInt64($0), Optional(page(UInt8($0 & 0x7F) | 1))) }
        let frame = try WireEncoder.encode(.pageReply(requestID: 5, pages: PageBatch(pageSize: 4096, pages: pages)))
        var stream: [UInt8] = []
        for _ in 0..<9 { stream += frame }
        stream += Array(frame.prefix(1000))  // a frame cut short stays buffered
        // Feeds the stream; returns the replies decoded and the capacities seen after each read.
        func feed(_ decoder: inout WireDecoder) throws -> (replies: Int, capacities: Set<Int>) {
            var offset = 0, replies = 0
            var capacities: Set<Int> = []
            while offset < stream.count {
                offset += decoder.append(upTo: readBytes) { window in
                    let n = min(window.count, stream.count - offset)
                    stream[offset..<offset + n].withUnsafeBytes { window.copyMemory(from: $0) }
                    return n
                }
                while case .pageReply? = try decoder.nextMessage() { replies += 1 }
                capacities.insert(decoder.capacity)
            }
            return (replies, capacities)
        }
        var steady = WireDecoder(initialCapacity: WireDecoder.steadyCapacity(readBytes: readBytes))
        let fed = try feed(&steady)
        #expect(fed.replies == 9)
        #expect(fed.capacities == [WireDecoder.steadyCapacity(readBytes: readBytes)], "the buffer grew")
        var grown = WireDecoder()
        let fedGrown = try feed(&grown)
        #expect(fedGrown.replies == 9)
        #expect(fedGrown.capacities.count > 1, "without the initial capacity the same reads grow the buffer")
    }

    @Test func heldBatchSurvivesLaterAppends() throws {
        let first = try WireEncoder.encode(.pages(sampleBatch))
        var decoder = WireDecoder()
        decoder.append(first + Array(try WireEncoder.encode(.complete).prefix(7)))
        guard case .pages(let held)? = try decoder.nextMessage() else { Issue.record("no batch"); return }
        // Force compaction and growth while `held` still shares the buffer.
        decoder.append([UInt8](try WireEncoder.encode(.complete).dropFirst(7)))
        for _ in 0..<50 { decoder.append(try WireEncoder.encode(.pages(sampleBatch))) }
        #expect(held == sampleBatch)
        #expect(try decoder.nextMessage() == .complete)
    }

    @Test func helloDescribesAGuestMemoryLayout() throws {
        let layout = try sampleHello.memoryLayout()
        #expect(layout.pageSize == 4096 && layout.regions.count == 2)
        let again = WireMessage.Hello(role: .bulk, sessionID: sampleHello.sessionID, layout: layout,
                                      vcpuCount: 4, features: sampleHello.features)
        #expect(again == sampleHello)
    }

    // MARK: Errors

    @Test func truncatedStreamIsReported() throws {
        let stream = try encodeAll([.ack(1), .pages(sampleBatch)])
        for cut in [1, 19, 20, 100, stream.count - 28 - 1] {
            let (decoded, error) = decodeAll(Array(stream.dropLast(cut)))
            #expect(decoded == [.ack(1)], "cut \(cut)")
            #expect(error == .truncated(bufferedBytes: stream.count - 28 - cut), "cut \(cut)")
        }
        try WireDecoder().finish()  // an empty stream is a clean end
    }

    @Test func flippedBitInPageIsNamedAndTheStreamStaysInSync() throws {
        var stream = try encodeAll([.pages(sampleBatch), .ack(3)])
        // Header 20, page size 4, descriptor 16, then the first page's data; the third page's
        // data begins after two more descriptors and one page.
        let thirdPageData = 20 + 4 + 16 + 4096 + 16 + 16
        stream[thirdPageData + 100] ^= 0x10
        var decoder = WireDecoder()
        decoder.append(stream)
        #expect(throws: WireError.checksumMismatch(pageIndex: 1_000_000)) { try decoder.nextMessage() }
        #expect(WireError.checksumMismatch(pageIndex: 1).leavesStreamInSync)
        #expect(try decoder.nextMessage() == .ack(3))
        try decoder.finish()
    }

    @Test func damagedDescriptorOrHeaderIsDetected() throws {
        let stream = try WireEncoder.encode(.pages(sampleBatch))
        var descriptor = stream
        descriptor[24] ^= 1  // the first page's index
        #expect(decodeAll(descriptor).error == .payloadChecksumMismatch(.pages))
        var header = stream
        header[9] ^= 0x80  // payload length
        #expect(decodeAll(header).error == .headerChecksumMismatch)
        var payload = try WireEncoder.encode(.vcpuState(id: 1, blob: [1, 2, 3]))
        payload[payload.count - 1] ^= 4
        #expect(decodeAll(payload).error == .payloadChecksumMismatch(.vcpuState))
    }

    @Test func everySingleBitFlipIsDetected() throws {
        // Exhaustive over a stream without page data, sampled over one with it.
        let small = try encodeAll([.hello(sampleHello), .pages(PageBatch(pageSize: 4096, pages: [(1, nil), (2, nil)])),
                                   .pageRequest(requestID: 1, pageIndex: 2, count: 3), .complete])
        var random = SeededRandom(seed: 7)
        let large = try encodeAll([.pages(sampleBatch), .pageSetSummary([1..<5])])
        let positions = Array(0..<small.count * 8).map { (small, $0) }
            + (0..<400).map { _ in (large, Int.random(in: 0..<large.count * 8, using: &random)) }
        for (stream, bit) in positions {
            var damaged = stream
            damaged[bit / 8] ^= 1 << UInt8(bit % 8)
            #expect(decodeAll(damaged).error != nil, "bit \(bit) of \(stream.count) bytes went unnoticed")
        }
    }

    @Test func wrongMagicIsNotAFaultlinePeer() {
        var decoder = WireDecoder()
        decoder.append(Array("GET / HTTP/1.1\r\n\r\n".utf8))
        let expected = WireError.notAFaultlinePeer(magic: 0x2054_4547)
        #expect(throws: expected) { try decoder.nextMessage() }
        #expect(throws: expected) { try decoder.nextMessage() }  // sticky
        #expect(throws: expected) { try decoder.finish() }
        #expect(!expected.leavesStreamInSync)
        #expect(expected.description.contains("not a Faultline peer"))
    }

    @Test func wrongVersionReportsBothVersions() throws {
        var hello = sampleHello
        hello.version = 1  // the version before the commit step: not compatible
        let error = decodeAll(try WireEncoder.encode(.hello(hello))).error
        #expect(error == .unsupportedVersion(ours: 2, theirs: 1))
        #expect(error?.description == "protocol version mismatch: we speak version 2, the peer speaks version 1")
        #expect(decodeAll(try WireEncoder.encode(.helloAck(version: 7, features: []))).error
                == .unsupportedVersion(ours: 2, theirs: 7))
    }

    @Test func oversizedLengthIsRejectedBeforeThePayloadArrives() {
        var decoder = WireDecoder()
        decoder.append(rawFrame(type: 5, payload: [], length: UInt32(WireProtocol.maxPayloadLength) + 1))
        #expect(throws: WireError.payloadTooLarge(length: UInt32(WireProtocol.maxPayloadLength) + 1,
                                                  limit: WireProtocol.maxPayloadLength)) { try decoder.nextMessage() }
        var strict = WireDecoder(maxPayloadLength: 16)
        strict.append(rawFrame(type: 14, payload: [UInt8](repeating: 0, count: 17)))
        #expect(throws: WireError.payloadTooLarge(length: 17, limit: 16)) { try strict.nextMessage() }
    }

    @Test func encoderRefusesOversizedPayloads() {
        var encoder = WireEncoder()
        #expect(throws: WireError.payloadTooLarge(length: UInt32(WireProtocol.maxPayloadLength) + 5,
                                                  limit: WireProtocol.maxPayloadLength)) {
            try encoder.encode(.vcpuState(id: 0, blob: [UInt8](repeating: 0, count: WireProtocol.maxPayloadLength + 1)))
        }
        #expect(encoder.bytes.isEmpty)
    }

    @Test func unknownTypeIsReportedAndSkipped() throws {
        var decoder = WireDecoder()
        decoder.append(rawFrame(type: 0x7777, payload: [1, 2, 3]) + (try WireEncoder.encode(.complete)))
        #expect(throws: WireError.unknownMessageType(0x7777)) { try decoder.nextMessage() }
        #expect(try decoder.nextMessage() == .complete)
    }

    @Test(arguments: [
        (UInt16(14), UInt16(1), le(UInt64(1))),  // reserved flags
        (14, 0, le(UInt64(1)) + [0]),  // trailing byte
        (11, 0, [0]),  // complete with payload
        (6, 0, le(UInt64(1)) + le(UInt64(5)) + le(UInt32(0))),  // request for zero pages
        (6, 0, le(UInt64(1)) + le(UInt64.max) + le(UInt32(2))),  // request wraps
        (9, 0, le(UInt32(2)) + le(UInt64(10)) + le(UInt64(5)) + le(UInt64(12)) + le(UInt64(1))),  // overlap
        (9, 0, le(UInt32(1)) + le(UInt64(10)) + le(UInt64(0))),  // empty range
        (9, 0, le(UInt32(1)) + le(UInt64.max) + le(UInt64(2))),  // range wraps
        (9, 0, le(UInt32.max)),  // count beyond payload
        (5, 0, le(UInt32(4096)) + le(UInt64(1)) + [1, 0, 0, 0] + le(UInt32(9))),  // zero page with CRC
        (5, 0, le(UInt32(4096)) + le(UInt64(1)) + [2, 0, 0, 0] + le(UInt32(0))),  // unknown kind
        (5, 0, le(UInt32(4096)) + le(UInt64(1)) + [0, 0, 0, 0] + le(UInt32(0)) + [1, 2]),  // short page
        (5, 0, le(UInt32(1000))),  // bad page size
        (7, 0, [1, 2, 3]),  // reply shorter than its request ID
        (1, 0, le(WireProtocol.version) + le(UInt32(3))),  // hello with unknown role, cut short
    ])
    func malformedPayloadsAreRejected(type: UInt16, flags: UInt16, payload: [UInt8]) throws {
        var decoder = WireDecoder()
        decoder.append(rawFrame(type: type, flags: flags, payload: payload) + (try WireEncoder.encode(.complete)))
        let error = #expect(throws: WireError.self) { try decoder.nextMessage() }
        guard case .malformed? = error else { Issue.record("expected malformed, got \(String(describing: error))"); return }
        #expect(try decoder.nextMessage() == .complete)
    }

    /// A bit flipped in a descriptor's kind byte breaks the batch's structure: that is damage
    /// (the batch is dropped, the stream stays in sync), not a malformed message from the peer.
    @Test func aDamagedDescriptorIsDamageNotAProtocolViolation() throws {
        let batch = PageBatch(pageSize: 4096, pages: [(5, [UInt8](repeating: 1, count: 4096)), (6, nil)])
        let frame = try WireEncoder.encode(.pages(batch))
        let kindOffsets = [WireProtocol.headerSize + 4 + 8, WireProtocol.headerSize + 4 + 16 + 4096 + 8]
        for offset in kindOffsets {
            for bit in 0..<8 {
                var damaged = frame
                damaged[offset] ^= UInt8(1) << bit
                var decoder = WireDecoder()
                decoder.append(damaged + (try WireEncoder.encode(.complete)))
                #expect(throws: WireError.payloadChecksumMismatch(.pages)) { try decoder.nextMessage() }
                #expect(try decoder.nextMessage() == .complete)
            }
        }
    }

    @Test func invalidHellosAreRejected() {
        func rejected(_ change: (inout WireMessage.Hello) -> Void) -> Bool {
            var hello = sampleHello
            change(&hello)
            var encoder = WireEncoder()
            do { try encoder.encode(.hello(hello)) } catch { return encoder.bytes.isEmpty }
            return false
        }
        #expect(rejected { $0.pageSize = 4097 })
        #expect(rejected { $0.pageSize = 1 << 30 })
        #expect(rejected { $0.vcpuCount = 0 })
        #expect(rejected { $0.layout = [] })
        #expect(rejected { $0.layout[0].size = 0 })
        #expect(rejected { $0.layout[1].guestPhysicalAddress += 1 })
        #expect(rejected { $0.layout[1] = MemoryRegionDescriptor(guestPhysicalAddress: UInt64.max - 4095, size: 8192) })
        #expect(!rejected { _ in })
    }

    @Test func encoderRefusesInvalidRanges() throws {
        var encoder = WireEncoder()
        #expect(throws: WireError.self) { try encoder.encode(.pageSetSummary([5..<9, 8..<10])) }
        #expect(throws: WireError.self) { try encoder.encode(.resume(sessionID: 1, installedPages: 0, missing: [3..<3])) }
        #expect(throws: WireError.self) { try encoder.encode(.pageRequest(requestID: 0, pageIndex: 0, count: 0)) }
        // A fault and its fault-around window: at most maxPagesPerRequest pages.
        #expect(throws: WireError.self) {
            try encoder.encode(.pageRequest(requestID: 0, pageIndex: 0, count: WireProtocol.maxPagesPerRequest + 1))
        }
        #expect(encoder.bytes.isEmpty)
        var fine = WireEncoder()
        try fine.encode(.pageRequest(requestID: 0, pageIndex: 0, count: WireProtocol.maxPagesPerRequest))
    }

    @Test func everyErrorHasADescription() {
        let errors: [WireError] = [
            .notAFaultlinePeer(magic: 1), .unsupportedVersion(ours: 1, theirs: 2), .truncated(bufferedBytes: 3),
            .payloadTooLarge(length: 9, limit: 8), .unknownMessageType(99), .checksumMismatch(pageIndex: 5),
            .headerChecksumMismatch, .payloadChecksumMismatch(.hello), .malformed("x"),
        ]
        for error in errors { #expect(!error.description.isEmpty) }
        #expect(WireError.checksumMismatch(pageIndex: 5).description.contains("page 5"))
    }

    // MARK: Fuzz

    @Test func randomGarbageNeverCrashes() {
        var random = SeededRandom(seed: 0xFA17)
        for round in 0..<2000 {
            let length = Int.random(in: 0..<300, using: &random)
            let body = (0..<length).map { _ in UInt8.random(in: 0...255, using: &random) }
            let stream: [UInt8]
            switch round % 3 {
            case 0: stream = body  // pure noise
            case 1: stream = le(WireProtocol.magic) + body  // past the magic check
            default:  // a valid header around random content: exercises every payload parser
                stream = rawFrame(type: UInt16.random(in: 0...16, using: &random), payload: body)
            }
            var decoder = WireDecoder()
            decoder.append(stream)
            for _ in 0..<4 {
                do { guard try decoder.nextMessage() != nil else { break } } catch { if !error.leavesStreamInSync { break } }
            }
            _ = try? decoder.finish()
        }
    }

    @Test func mutatedValidStreamsNeverCrashOrInstallBadPages() throws {
        let valid = try encodeAll(sampleMessages)
        var random = SeededRandom(seed: 0xBAD)
        for _ in 0..<300 {
            var stream = valid
            for _ in 0..<Int.random(in: 1...4, using: &random) {
                let position = Int.random(in: 0..<stream.count, using: &random)
                switch Int.random(in: 0..<4, using: &random) {
                case 0: stream[position] ^= UInt8.random(in: 1...255, using: &random)
                case 1: stream.removeSubrange(position..<min(stream.count, position + Int.random(in: 1...64, using: &random)))
                case 2: stream.insert(contentsOf: (0..<Int.random(in: 1...8, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }, at: position)
                default: stream.replaceSubrange(position..<min(stream.count, position + 4), with: le(UInt32.random(in: 0...UInt32.max, using: &random)))
                }
                if stream.isEmpty { break }
            }
            var decoder = WireDecoder()
            var offset = 0
            while offset < stream.count {
                let end = min(stream.count, offset + Int.random(in: 1...6000, using: &random))
                stream[offset..<end].withUnsafeBytes { decoder.append($0) }
                offset = end
                // Each message or in-sync error consumes at least one byte, so this ends.
                for attempt in 0... {
                    guard attempt <= stream.count else { Issue.record("the decoder makes no progress"); break }
                    do {
                        guard let message = try decoder.nextMessage() else { break }
                        // Whatever gets through must be intact.
                        if case .pages(let batch) = message {
                            for page in batch where page.kind == .data { #expect(CRC32C.checksum(Array(page.data)) == page.checksum) }
                        }
                    } catch {
                        if !error.leavesStreamInSync { break }
                    }
                }
            }
            _ = try? decoder.finish()
        }
    }
}

// MARK: - CRC32C

extension WireCodecTests {
    /// CRC32C against published vectors and a bit-at-a-time reference.
    @Suite struct Checksums {
        @Test func knownVectors() {
            #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
            #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
            #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)  // RFC 3720 B.4
            #expect(CRC32C.checksum(Array(0..<32)) == 0x46DD_794E)
            #expect(CRC32C.checksum([]) == 0)
        }

        @Test func matchesBitwiseReferenceAtEveryLengthAndSplit() {
            var random = SeededRandom(seed: 1)
            // Lengths around the 8-byte words and the four 1 KiB lanes.
            let lengths = [0, 1, 7, 8, 9, 63, 4095, 4096, 4097, 8191, 8192, 12_345]
                + (0..<40).map { _ in Int.random(in: 0..<9000, using: &random) }
            for length in lengths {
                let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &random) }
                let expected = referenceCRC32C(bytes)
                #expect(CRC32C.checksum(bytes) == expected, "length \(length)")
                let split = Int.random(in: 0...length, using: &random)
                var running = CRC32C()
                running.update(bytes[..<split])
                running.update(bytes[split...])
                #expect(running.value == expected, "length \(length) split at \(split)")
            }
        }
    }
}
