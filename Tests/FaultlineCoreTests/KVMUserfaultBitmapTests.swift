import FaultlineCore
import Testing

/// A PageBitmap stored in KVM Userfault's polarity (a stored 1 = the page is missing) behaves
/// exactly like a plain one through the API, and its words are what the kernel must see.
@Suite("KVMUserfault bitmap polarity")
struct KVMUserfaultBitmapTests {
    /// The raw 64-bit words as the kernel reads them.
    static func raw(_ b: PageBitmap) -> [UInt64] {
        (0..<b.wordCount).map { b.words.load(fromByteOffset: $0 * 8, as: UInt64.self) }
    }

    @Test("starts with every page marked missing for the kernel, and nothing past the last page")
    func initialWords() {
        let b = PageBitmap(count: 130, polarity: .setMeansMissing)
        let words = Self.raw(b)
        #expect(words == [UInt64.max, UInt64.max, 0b11])
        #expect(b.populationCount == 0)
        #expect(!b.contains(0) && !b.contains(129))
        #expect(b.firstClear() == 0)
    }

    @Test("insert clears the kernel's bit, remove sets it again; the API stays set = present")
    func insertAndRemove() {
        let b = PageBitmap(count: 70, polarity: .setMeansMissing)
        #expect(b.insert(3))
        #expect(!b.insert(3))
        #expect(b.contains(3))
        let w0: UInt64 = Self.raw(b)[0]
        #expect(w0 == ~UInt64(8))
        b.insert(69)
        let w1: UInt64 = Self.raw(b)[1]
        #expect(w1 == 0b01_1111)  // pages 64-68 still missing, 69 present
        #expect(b.populationCount == 2)
        #expect(b.remove(3))
        #expect(!b.remove(3))
        let again: UInt64 = Self.raw(b)[0]
        #expect(again == UInt64.max)
        #expect(b.populationCount == 1)
    }

    @Test("scans, ranges and copies agree with a plain bitmap", arguments: [1, 63, 64, 65, 200])
    func sameAsPlain(count: Int) {
        let plain = PageBitmap(count: count)
        let userfault = PageBitmap(count: count, polarity: .setMeansMissing)
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<(count / 2 + 1) {
            let page = Int.random(in: 0..<count, using: &rng)
            plain.insert(page)
            userfault.insert(page)
        }
        #expect(plain.populationCount == userfault.populationCount)
        var a: [Range<Int>] = [], b: [Range<Int>] = []
        plain.forEachClearRange { a.append($0) }
        userfault.forEachClearRange { b.append($0) }
        #expect(a == b)
        var sa: [Int] = [], sb: [Int] = []
        plain.forEachSetPage { sa.append($0) }
        userfault.forEachSetPage { sb.append($0) }
        #expect(sa == sb)
        #expect(plain.firstClear(from: count / 2) == userfault.firstClear(from: count / 2))
        // Copies cross polarities: the pages are the same, the stored words each bitmap's own.
        let copy = PageBitmap(count: count, polarity: .setMeansMissing)
        copy.copyBits(from: plain)
        for p in 0..<count { #expect(copy.contains(p) == plain.contains(p)) }
        let plainWords = Self.raw(plain)
        var expected: [UInt64] = []
        for i in 0..<plain.wordCount {
            let tail: UInt64 = i == plain.wordCount - 1 && count % 64 != 0 ? (1 << UInt64(count % 64)) - 1 : ~0
            expected.append(~plainWords[i] & tail)
        }
        let copyWords = Self.raw(copy)
        #expect(copyWords == expected)
        userfault.insert(0..<count)
        #expect(userfault.isFull)
        let cleared = Self.raw(userfault)
        #expect(cleared.allSatisfy { $0 == 0 })
    }
}
