/// How the first input byte feeds the stream to the decoder in the chunked run.
///
///     bit 7      repair checksums first (`ChecksumRepair`), so mutated payloads get past
///                the CRC checks and reach the structural parsing
///     bits 5-6   append flavour: 0 raw buffer, 1 [UInt8], 2 `append(upTo:using:)` as
///                the socket receiver does (with a larger window than it fills), 3 rotate
///     bit 4      chunk sizes vary (pseudo-random in 1...limit) instead of all `limit`
///     bits 0-3   chunk size limit, from `limits`
struct FeedPlan {
    enum Flavour { case rawBuffer, array, fill }

    static let limits = [1, 2, 3, 7, 15, 16, 19, 20, 21, 36, 64, 255, 4096, 4116, 4137, 1 << 16]

    let repairsChecksums: Bool
    let flavours: [Flavour]
    let varies: Bool
    let limit: Int
    private var random: UInt32

    init(_ byte: UInt8) {
        repairsChecksums = byte & 0x80 != 0
        switch (byte >> 5) & 3 {
        case 0: flavours = [.rawBuffer]
        case 1: flavours = [.array]
        case 2: flavours = [.fill]
        default: flavours = [.rawBuffer, .fill, .array]
        }
        varies = byte & 0x10 != 0
        limit = Self.limits[Int(byte & 0x0F)]
        random = 0x9E37_79B9 ^ UInt32(byte)
    }

    /// The size of the next chunk (at least 1).
    mutating func nextChunkSize() -> Int {
        guard varies else { return limit }
        random ^= random << 13
        random ^= random >> 17
        random ^= random << 5
        return 1 + Int(random % UInt32(limit))
    }

    /// The append flavour for chunk number `n`.
    func flavour(ofChunk n: Int) -> Flavour { flavours[n % flavours.count] }
}
