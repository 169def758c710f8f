import FaultlineCore
import Foundation
import Testing

/// The snapshot service's control messages (docs/protocol.md, "The snapshot service"): the
/// frame, the JSON field names that are the contract, and every check a server makes of a
/// request before it looks at a snapshot.
@Suite("Snapshot service control messages")
struct SnapshotServiceProtocolTests {
    @Test func aFrameCarriesItsPayloadWithMagicLengthAndCRC() throws {
        let payload = Array(#"{"type":"restore"}"#.utf8)
        let frame = ServiceFrame.encode(payload)
        #expect(frame.count == ServiceFrame.headerSize + payload.count)
        #expect(Array(frame[0..<4]) == Array("FLS1".utf8))
        let (length, crc) = try ServiceFrame.header(Array(frame[0..<ServiceFrame.headerSize]))
        #expect(length == payload.count)
        #expect(crc == payload.withUnsafeBytes { CRC32C.checksum($0) })
        try ServiceFrame.check(payload: Array(frame[ServiceFrame.headerSize...]), crc: crc)
    }

    @Test func aForeignOversizedOrDamagedFrameIsRefused() throws {
        var frame = ServiceFrame.encode(Array("{}".utf8))
        // A migration peer's frame ("FLT1"), or an HTTP request, is not a control message.
        var foreign = Array(frame[0..<12])
        foreign[3] = UInt8(ascii: "T")
        #expect(throws: ServiceFrameError.self) { try ServiceFrame.header(foreign) }
        #expect { try ServiceFrame.header(Array("GET / HTTP/".utf8) + [0]) } throws: {
            "\($0)".contains("does not speak the snapshot service protocol")
        }
        var big = Array(frame[0..<12])
        big.replaceSubrange(4..<8, with: [0, 0, 0x10, 0])  // 1 MiB
        #expect(throws: ServiceFrameError.tooLarge(1 << 20)) { try ServiceFrame.header(big) }
        #expect(throws: ServiceFrameError.truncated) { try ServiceFrame.header(Array(frame[0..<5])) }
        frame[ServiceFrame.headerSize] ^= 1
        let (_, crc) = try ServiceFrame.header(Array(frame[0..<12]))
        #expect(throws: ServiceFrameError.checksumMismatch) { try ServiceFrame.check(payload: Array(frame[12...]), crc: crc) }
    }

    @Test func theJSONFieldNamesAreTheDocumentedOnes() throws {
        let request = RestoreRequest(dialBackPort: 40000, snapshot: "web-1", lazy: true, retries: 2)
        let object = try JSONSerialization.jsonObject(with: JSONEncoder().encode(request)) as? [String: Any]
        #expect(object?["type"] as? String == "restore")
        #expect(object?["version"] as? Int == 1)
        #expect(object?["dial_back_port"] as? Int == 40000)
        #expect(object?["snapshot"] as? String == "web-1")
        #expect(object?["mode"] as? String == "lazy")
        #expect(object?["retries"] as? Int == 2)
        let served = ServedSnapshot(name: "web-1", vcpus: 2, ramBytes: 1 << 24, guestMode: "protected", totalPages: 4112,
                                    dataPages: 4000, memoryDigest: 99)
        let answer = try JSONSerialization.jsonObject(with: JSONEncoder().encode(RestoreAnswer.accepted(served))) as? [String: Any]
        #expect(answer?["type"] as? String == "accepted")
        #expect((answer?["snapshot"] as? [String: Any])?["memory_digest"] as? Int == 99)
        let decoded = try JSONDecoder().decode(RestoreRequest.self, from: JSONEncoder().encode(request))
        #expect(decoded == request)
        #expect(!RestoreAnswer.refused("no").isAccepted)
    }

    @Test func aValidRequestPassesAndEachBadFieldIsNamed() throws {
        try RestoreRequest(dialBackPort: 1, snapshot: nil, lazy: false, retries: 0).validate()
        try RestoreRequest(dialBackPort: 65535, snapshot: "snap_2.v1-a", lazy: true, retries: RestoreRequest.maxRetries).validate()
        func refusal(_ edit: (inout RestoreRequest) -> Void) -> String {
            var r = RestoreRequest(dialBackPort: 7000, snapshot: nil, lazy: true, retries: 0)
            edit(&r)
            do { try r.validate(); return "accepted" } catch { return "\(error)" }
        }
        #expect(refusal { $0.type = "shutdown" }.contains("unknown request type 'shutdown'"))
        #expect(refusal { $0.version = 2 }.contains("request version 2 is not supported"))
        #expect(refusal { $0.dialBackPort = 0 }.contains("dial-back port 0"))
        #expect(refusal { $0.dialBackPort = 70000 }.contains("dial-back port 70000"))
        #expect(refusal { $0.mode = "hurried" }.contains("unknown mode 'hurried'"))
        #expect(refusal { $0.retries = 9 }.contains("retries 9"))
        #expect(refusal { $0.retries = -1 }.contains("retries -1"))
    }

    @Test(arguments: ["", ".", "..", "../etc", "a/b", "/abs", ".hidden", "with space", "tab\t", String(repeating: "x", count: 256), "é"])
    func aNameThatIsNotOneFolderNameIsRefused(name: String) {
        #expect(throws: ServiceRequestError.self) { try RestoreRequest.checkName(name) }
    }

    @Test func theEnvelopeNamesTheTypeAndVersionBeforeAnyOtherField() {
        #expect { try ServiceEnvelope(type: nil, version: 1).check() } throws: { "\($0)".contains("without a 'type'") }
        #expect { try ServiceEnvelope(type: "list", version: 1).check() } throws: { "\($0)".contains("unknown request type 'list'") }
        #expect { try ServiceEnvelope(type: "restore", version: nil).check() } throws: { "\($0)".contains("without a 'version'") }
        #expect { try ServiceEnvelope(type: "restore", version: 3).check() } throws: { "\($0)".contains("version 3") }
        #expect(throws: Never.self) { try ServiceEnvelope(type: "restore", version: 1).check() }
    }

    @Test func restoreSchedulesHaveNoPrecopyEvents() {
        for seed in UInt64(1)...100 {
            let s = ChaosSchedule.generate(seed: seed, vcpus: 2, precopy: false)
            #expect(!s.events.contains { $0.phase == .precopy }, "seed \(seed): \(s)")
            #expect(!s.events.isEmpty)
        }
        let phases = Set((UInt64(1)...50).flatMap { ChaosSchedule.generate(seed: $0, vcpus: 2, precopy: false).events.map(\.phase) })
        #expect(phases == [.switchover, .postcopy, .completion])
    }
}
