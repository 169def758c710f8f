import FaultlineCore

/// Rewrites the CRC fields of every frame in a stream so they match its (mutated)
/// content: random mutations almost never keep a CRC32C valid, and without this the
/// fuzzer would not get past the checksum checks into the payload parsing.
///
/// Written from docs/protocol.md, independently of the codec: the header CRC covers
/// header bytes 0..<16; the payload CRC covers the payload except page data; a data
/// page's descriptor carries the CRC of its bytes. Frames are walked by their `length`;
/// the walk stops at the first frame that does not fit in the stream.
enum ChecksumRepair {
    static let headerSize = 20
    static let descriptorSize = 16

    static func repair(_ stream: inout [UInt8]) {
        stream.withUnsafeMutableBytes { raw in
            var offset = 0
            while raw.count - offset >= headerSize {
                let length = Int(load(UInt32.self, raw, offset + 8))
                let fits = raw.count - offset - headerSize >= length
                if fits {
                    let payload = UnsafeMutableRawBufferPointer(rebasing: raw[offset + headerSize..<offset + headerSize + length])
                    let type = load(UInt16.self, raw, offset + 4)
                    let crc = type == 0x05 || type == 0x07 ? repairBatch(payload, prefix: type == 0x07 ? 8 : 0)
                                                           : CRC32C.checksum(UnsafeRawBufferPointer(payload))
                    store(crc, raw, offset + 12)
                }
                store(CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[offset..<offset + 16])), raw, offset + 16)
                guard fits else { return }
                offset += headerSize + length
            }
        }
    }

    /// Fixes each data page's CRC and returns the payload CRC of a `pages` (`prefix` 0)
    /// or `pageReply` (`prefix` 8, the request id) payload. Malformed batches get the CRC
    /// of what a lenient walk sees; the decoder rejects them for their shape anyway.
    private static func repairBatch(_ payload: UnsafeMutableRawBufferPointer, prefix: Int) -> UInt32 {
        var crc = CRC32C()
        guard payload.count >= prefix + 4 else {
            crc.update(UnsafeRawBufferPointer(payload))
            return crc.value
        }
        crc.update(UnsafeRawBufferPointer(rebasing: payload[0..<prefix + 4]))
        let pageSize = Int(load(UInt32.self, payload, prefix))
        var offset = prefix + 4
        while payload.count - offset >= descriptorSize {
            let kind = load(UInt32.self, payload, offset + 8)
            let dataStart = offset + descriptorSize
            if kind == 0, payload.count - dataStart >= pageSize {
                let data = UnsafeRawBufferPointer(rebasing: payload[dataStart..<dataStart + pageSize])
                store(CRC32C.checksum(data), payload, offset + 12)
                crc.update(UnsafeRawBufferPointer(rebasing: payload[offset..<dataStart]))
                offset = dataStart + pageSize
            } else {
                crc.update(UnsafeRawBufferPointer(rebasing: payload[offset..<dataStart]))
                offset = dataStart
            }
        }
        crc.update(UnsafeRawBufferPointer(rebasing: payload[offset...]))
        return crc.value
    }

    private static func load<T: FixedWidthInteger>(_: T.Type, _ raw: UnsafeMutableRawBufferPointer, _ offset: Int) -> T {
        T(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    private static func store(_ value: UInt32, _ raw: UnsafeMutableRawBufferPointer, _ offset: Int) {
        raw.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt32.self)
    }
}
