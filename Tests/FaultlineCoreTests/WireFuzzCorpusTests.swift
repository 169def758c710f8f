import Foundation
import Testing
import FaultlineCore

/// The fuzzer's committed seeds (fuzz/corpus/wire, see docs/fuzzing.md) must stay real
/// frames: after a wire format change they would silently stop reaching the parsers.
/// Regenerate them with fuzz/make-corpus.sh.
@Suite struct WireFuzzCorpusTests {
    static let corpus = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("fuzz/corpus/wire")

    /// Each seed: the fuzz target's control byte, then frames.
    static func seeds() throws -> [(name: String, stream: [UInt8])] {
        let names = try FileManager.default.contentsOfDirectory(atPath: corpus.path).sorted()
        return try names.map { name in
            let bytes = [UInt8](try Data(contentsOf: corpus.appendingPathComponent(name)))
            return (name, Array(bytes.dropFirst()))
        }
    }

    @Test func everySeedDecodesCleanlyAndReencodesToItself() throws {
        let seeds = try Self.seeds()
        #expect(seeds.count >= WireProtocol.MessageType.allCases.count)
        for (name, stream) in seeds {
            var decoder = WireDecoder()
            decoder.append(stream)
            var messages: [WireMessage] = []
            while let message = try decoder.nextMessage() { messages.append(message) }
            try decoder.finish()
            #expect(!messages.isEmpty, "\(name)")
            var encoder = WireEncoder()
            for message in messages { try encoder.encode(message) }
            #expect(encoder.bytes == stream, "\(name) does not re-encode to itself")
        }
    }

    @Test func seedsCoverEveryMessageType() throws {
        var types = Set<WireProtocol.MessageType>()
        for (_, stream) in try Self.seeds() {
            var decoder = WireDecoder()
            decoder.append(stream)
            while let message = try decoder.nextMessage() { types.insert(message.type) }
        }
        #expect(types == Set(WireProtocol.MessageType.allCases))
    }
}
