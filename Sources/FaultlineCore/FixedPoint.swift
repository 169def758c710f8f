/// Decimal text with a fixed number of digits after the point, as C's `%.Nf` prints it:
/// the double's exact binary value rounded half to even (never through a second rounding).
public enum FixedPoint {
    /// `value` with `digits` (0...18) decimals. "nan", "inf", "-inf" for the non-finite.
    public static func format(_ value: Double, digits: Int) -> String {
        precondition(digits >= 0 && digits <= 18, "FixedPoint supports 0 to 18 digits")
        let sign = value.sign == .minus ? "-" : ""
        if value.isNaN { return "nan" }
        if value.isInfinite { return sign + "inf" }
        let magnitude = value.magnitude
        // magnitude = mantissa * 2^exponent exactly.
        let mantissa: UInt128 = magnitude.isNormal
            ? UInt128((1 << UInt64(Double.significandBitCount)) | magnitude.significandBitPattern)
            : UInt128(magnitude.significandBitPattern)
        let exponent = magnitude.isNormal
            ? Int(magnitude.exponent) - Double.significandBitCount
            : Int(Double.leastNonzeroMagnitude.exponent)
        var power: UInt128 = 1
        for _ in 0..<digits { power *= 10 }
        let scaled = mantissa * power  // < 2^53 * 10^18 < 2^113
        let units: UInt128
        if exponent >= 0 {
            guard exponent < scaled.leadingZeroBitCount else { return "\(value)" }  // beyond 2^127: not needed here
            units = scaled << exponent
        } else if -exponent >= 128 {
            units = 0  // below 2^-14 units: rounds to zero
        } else {
            let shift = -exponent
            let quotient = scaled >> shift
            let remainder = scaled & ((1 << shift) - 1)
            let half: UInt128 = 1 << (shift - 1)
            units = remainder > half || (remainder == half && quotient & 1 == 1) ? quotient + 1 : quotient
        }
        var text = String(units)
        guard digits > 0 else { return sign + text }
        if text.count <= digits { text = String(repeating: "0", count: digits + 1 - text.count) + text }
        let point = text.index(text.endIndex, offsetBy: -digits)
        return sign + text[..<point] + "." + text[point...]
    }
}
