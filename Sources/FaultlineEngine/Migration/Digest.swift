import FaultlineCore

/// The memory digest both sides compute: a per-page CRC32C, mixed with the page index and
/// XOR-folded, so it can be accumulated in any order (the destination installs pages in
/// fault order) and recomputed for a page that is sent again.
public enum MemoryDigest {
    @inlinable public static func mix(page: Int, crc: UInt32) -> UInt64 {
        var z = (UInt64(truncatingIfNeeded: page) << 32 | UInt64(crc)) &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// CRC32C of a 4 KiB zero page.
    public static let zeroPageCRC: UInt32 = {
        let zeros = [UInt8](repeating: 0, count: 4096)
        return CRC32C.checksum(zeros)
    }()

    public static func bytes(_ digest: UInt64) -> [UInt8] { withUnsafeBytes(of: digest.littleEndian) { Array($0) } }
    public static func value(_ bytes: [UInt8]) -> UInt64? {
        guard bytes.count == 8 else { return nil }
        return bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
    }
}
