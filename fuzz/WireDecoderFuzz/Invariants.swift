import FaultlineCore

/// What must hold for every message the decoder accepts.
enum Invariants {
    /// `frame` is the exact stream bytes the message was decoded from.
    static func check(_ message: WireMessage, frame: UnsafeRawBufferPointer) {
        switch message {
        case .pages(let batch), .pageReply(_, let batch):
            checkBatch(batch)
        case .hello(let hello):
            _ = try? hello.memoryLayout()  // wire values into GuestMemoryLayout: may throw, must not trap
        default:
            break
        }
        roundTrip(message, frame: frame)
    }

    /// Every page of a decoded batch is intact: data pages hold `pageSize` bytes matching
    /// their CRC32C, zero pages nothing; iterating yields `count` pages.
    static func checkBatch(_ batch: PageBatch) {
        var seen = 0
        for page in batch {
            seen += 1
            switch page.kind {
            case .data:
                guard page.data.count == Int(batch.pageSize) else {
                    fatalError("data page \(page.index) has \(page.data.count) bytes in a \(batch.pageSize)-byte batch")
                }
                let crc = page.withUnsafeBytes { CRC32C.checksum($0) }
                guard crc == page.checksum else { fatalError("decoded page \(page.index) fails its CRC32C") }
            case .zero:
                guard page.data.isEmpty, page.checksum == 0 else { fatalError("zero page \(page.index) carries data") }
            }
        }
        guard seen == batch.count else { fatalError("batch says \(batch.count) pages, iterates \(seen)") }
        _ = batch.description
    }

    /// Re-encoding gives back the very frame (the encoding is canonical), and that decodes
    /// to an equal message. The one exception: `reject`/`error` text that was not valid
    /// UTF-8 decodes with U+FFFD replacements, so its re-encoding differs in bytes (and can
    /// grow); it must still decode to an equal message.
    static func roundTrip(_ message: WireMessage, frame: UnsafeRawBufferPointer) {
        let encoded: [UInt8]
        do {
            encoded = try WireEncoder.encode(message)
        } catch {
            fatalError("decoded \(message) but the encoder refuses it: \(error)")
        }
        if !encoded.elementsEqual(frame) {
            guard hasInvalidText(message, frame: frame) else {
                fatalError("re-encoding \(message) changed its frame:\n  \(Array(frame))\n  \(encoded)")
            }
        }
        var decoder = WireDecoder()
        decoder.append(encoded)
        do {
            let again = try decoder.nextMessage()
            guard again == message else { fatalError("round trip: \(message) came back as \(String(describing: again))") }
            guard try decoder.nextMessage() == nil else { fatalError("round trip of \(message) left a second message") }
            try decoder.finish()
        } catch {
            fatalError("round trip: re-encoded \(message) fails to decode: \(error)")
        }
    }

    /// True for a text message whose payload bytes are not valid UTF-8.
    private static func hasInvalidText(_ message: WireMessage, frame: UnsafeRawBufferPointer) -> Bool {
        switch message {
        case .reject, .error:
            let payload = UnsafeRawBufferPointer(rebasing: frame[20...])
            return String(validating: payload, as: UTF8.self) == nil
        default:
            return false
        }
    }
}
