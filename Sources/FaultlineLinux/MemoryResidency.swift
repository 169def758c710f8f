import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// mincore(2) over `length` bytes at `base`: one byte per 4 KiB page into `bytes`, bit 0
/// set when the page is resident.
func queryResidency(base: UnsafeMutableRawPointer, length: Int, into bytes: UnsafeMutablePointer<UInt8>,
                    label: String) throws(SystemError) {
    try systemCall("mincore \(label) \(length) bytes") { mincore(base, length, bytes) }
}

extension GuestMemoryRegion {
    /// Which pages of the region are resident (mincore): one byte per 4 KiB page, bit 0 set
    /// when resident. `bytes` holds at least `size / 4096` bytes.
    public func residency(into bytes: UnsafeMutablePointer<UInt8>) throws(SystemError) {
        try queryResidency(base: base, length: Int(size), into: bytes, label: "\(backing) guest memory")
    }
}

extension MappedFile {
    /// How many of the file's pages are in the page cache (mincore on this mapping reports the
    /// page cache for pages it has not touched), for `size` rounded up to whole pages.
    public func cachedPages() throws(SystemError) -> Int {
        let pages = Int((size + 4095) / 4096)
        let bytes = UnsafeMutablePointer<UInt8>.allocate(capacity: pages)
        defer { bytes.deallocate() }
        try queryResidency(base: UnsafeMutableRawPointer(mutating: base), length: Int(size), into: bytes, label: path)
        return (0..<pages).reduce(0) { $0 + Int(bytes[$1] & 1) }
    }
}
