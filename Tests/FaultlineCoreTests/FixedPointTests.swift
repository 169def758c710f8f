import FaultlineCore
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("Fixed-point text, as printf prints it")
struct FixedPointTests {
    static func printf(_ v: Double, _ digits: Int) -> String {
        var buf = [CChar](repeating: 0, count: 128)
        _ = withVaList([v]) { vsnprintf(&buf, 128, "%.\(digits)f", $0) }
        return String(cString: buf)
    }

    @Test func tiesAndEdgesMatchPrintf() {
        let values: [Double] = [0, -0.0, 0.05, 0.15, 0.25, 0.35, 1.25, 2.5, 3.5, -0.04, -2.5, 0.95, 9.95, 99.95,
                                1e-300, .leastNonzeroMagnitude, 123456.789, 1e15 + 0.5, 0.1 + 0.2, 1234.5678]
        for v in values {
            for digits in [0, 1, 2, 6] { #expect(FixedPoint.format(v, digits: digits) == Self.printf(v, digits), "\(v) \(digits)") }
        }
    }

    @Test func randomValuesMatchPrintf() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<20_000 {
            let v = Double.random(in: -1e6...1e6, using: &generator) / Double(1 << Int.random(in: 0...30, using: &generator))
            let digits = Int.random(in: 0...9, using: &generator)
            #expect(FixedPoint.format(v, digits: digits) == Self.printf(v, digits), "\(v) \(digits)")
        }
    }

    @Test func nonFiniteValues() {
        #expect(FixedPoint.format(.infinity, digits: 1) == "inf")
        #expect(FixedPoint.format(-.infinity, digits: 1) == "-inf")
        #expect(FixedPoint.format(.nan, digits: 1) == "nan")
    }
}
