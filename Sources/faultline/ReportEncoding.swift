import Foundation

/// How every `--json` report is written: one line, keys sorted, `/` left as it is.
/// docs/reports.md documents each report's keys.
func jsonLine<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

/// Prints a report's JSON line; a report that cannot be encoded stops the command, naming it.
func printJSON<T: Encodable>(_ value: T) {
    do {
        print(try jsonLine(value))
    } catch {
        fail(CLIError(description: "cannot encode the \(T.self) report as JSON: \(error)"))
    }
}

/// Reads one JSON line back into its report (the demo reads the destination's this way).
func decodeJSONLine<T: Decodable>(_ type: T.Type, from line: String) throws -> T {
    try JSONDecoder().decode(type, from: Data(line.utf8))
}

/// A figure as the reports give it: rounded to `digits` decimals, and 0 when it is not finite
/// (JSON has no infinity or NaN).
func rounded(_ v: Double, _ digits: Int) -> Double {
    guard v.isFinite else { return 0 }
    let scale = pow(10, Double(digits))
    return (v * scale).rounded() / scale
}

/// An optional value written as JSON `null` when absent (a plain optional's key is left out).
/// The reports use it where the key itself says something: "no pre-fault ran", "no error".
@propertyWrapper
struct NullWhenAbsent<Value: Codable & Sendable & Equatable>: Codable, Sendable, Equatable {
    var wrappedValue: Value?

    init(wrappedValue: Value?) { self.wrappedValue = wrappedValue }

    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        wrappedValue = c.decodeNil() ? nil : try c.decode(Value.self)
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        if let wrappedValue { try c.encode(wrappedValue) } else { try c.encodeNil() }
    }
}

/// Two reports in one JSON object: both encode into (and decode from) the same keyed container.
/// Their keys must not overlap.
struct Merged<First: Encodable, Second: Encodable>: Encodable {
    var first: First
    var second: Second

    init(_ first: First, _ second: Second) {
        self.first = first
        self.second = second
    }

    func encode(to encoder: Encoder) throws {
        try first.encode(to: encoder)
        try second.encode(to: encoder)
    }
}

extension Merged: Decodable where First: Decodable, Second: Decodable {
    init(from decoder: Decoder) throws {
        first = try First(from: decoder)
        second = try Second(from: decoder)
    }
}

/// A command's refusal or failure as one JSON line: what failed and why.
struct FailureReport: Codable, Sendable, Equatable {
    var side: String?
    var mode: String?
    var outcome: String
    var error: String
    /// `serve-snapshot`: the snapshot folder that was refused.
    var snapshot: String?
}

/// The keys a command adds to an engine report it prints as is: what happened, and where.
struct OutcomeFields: Codable, Sendable, Equatable {
    var outcome: String
    var snapshot: String?
    var pid: String?
}

/// A JSON key named at run time (a report keyed by capability, by part, by path).
struct NamedKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(_ name: String) { stringValue = name }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}
