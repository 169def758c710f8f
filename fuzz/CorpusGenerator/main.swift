// Writes the fuzzer's seed corpus: real frames from `WireEncoder`, one file per message
// type (and a few multi-frame session excerpts). Each file is one control byte for the
// fuzz target (see fuzz/WireDecoderFuzz/FeedPlan.swift), then the stream.
// Run by fuzz/make-corpus.sh; the output is committed in fuzz/corpus/wire/.
import FaultlineCore

#if canImport(Glibc)
import Glibc
#endif

let pageSize: UInt32 = 4096

func pageBytes(_ index: UInt64) -> [UInt8] {
    (0..<Int(pageSize)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(index) &* 13) }
}

func batch(_ pages: [(index: UInt64, data: [UInt8]?)]) -> PageBatch {
    PageBatch(pageSize: pageSize, pages: pages)
}

let hello = WireMessage.Hello(
    role: .bulk, sessionID: 0x5EED_F00D_CAFE_0001, pageSize: pageSize,
    layout: [MemoryRegionDescriptor(guestPhysicalAddress: 0, size: 1 << 20),
             MemoryRegionDescriptor(guestPhysicalAddress: 1 << 32, size: 64 << 12)],
    vcpuCount: 2, features: .supported)
var faultHello = hello
faultHello.role = .fault
let accepted = WireMessage.helloAck(version: WireProtocol.version, features: .supported)
let vcpu0 = WireMessage.vcpuState(id: 0, blob: (0..<64).map { UInt8($0) })
let vcpu1 = WireMessage.vcpuState(id: 1, blob: (0..<64).map { UInt8(255 - $0) })
let lowMemory = WireMessage.pages(batch([(0, pageBytes(0)), (1, nil), (2, pageBytes(2))]))
let summary = WireMessage.pageSetSummary([3..<256, 300..<320, 1000..<1064])

/// (file name, control byte, messages).
let seeds: [(String, UInt8, [WireMessage])] = [
    ("hello-bulk", 0x80, [.hello(hello)]),
    ("hello-fault", 0x95, [.hello(faultHello)]),
    ("helloAck", 0x86, [accepted]),
    ("reject", 0x87, [.reject(reason: "session id does not match the bulk connection")]),
    ("vcpuState", 0x88, [vcpu0]),
    ("pages-data", 0x8C, [.pages(batch([(7, pageBytes(7))]))]),
    ("pages-data-and-zero", 0x9D, [.pages(batch([(8, pageBytes(8)), (9, nil)]))]),
    ("pages-zero-only", 0x83, [.pages(batch([(10, nil), (11, nil), (12, nil)]))]),
    ("pages-empty", 0x81, [.pages(batch([]))]),
    ("pageRequest", 0x89, [.pageRequest(requestID: 41, pageIndex: 4242, count: 4)]),
    ("pageReply", 0x9E, [.pageReply(requestID: 41, pages: batch([(4242, pageBytes(4242))]))]),
    ("pageReply-zero", 0x8A, [.pageReply(requestID: 42, pages: batch([(4243, nil)]))]),
    ("pageReply-empty", 0x82, [.pageReply(requestID: 43, pages: batch([]))]),
    ("prioritize", 0x8B, [.prioritize(pageIndex: 999)]),
    ("pageSetSummary", 0x99, [summary]),
    ("pageSetSummary-empty", 0x84, [.pageSetSummary([])]),
    ("digest-crc", 0x85, [.digest(algorithm: .pageCRC32CXor, bytes: [0x12, 0x34, 0x56, 0x78])]),
    ("digest-sha256", 0x97, [.digest(algorithm: .sha256, bytes: (0..<32).map { UInt8($0 * 5) })]),
    ("complete", 0x80, [.complete]),
    ("error", 0x87, [.error(message: "page 12 failed its CRC32C check")]),
    ("resume", 0x9A, [.resume(sessionID: hello.sessionID, installedPages: 200, missing: [5..<6, 256..<512])]),
    ("ack", 0x80, [.ack(0)]),
    // Session excerpts: several frames in one stream, fed in varying chunks.
    ("session-handshake", 0x96, [.hello(hello), accepted, .hello(faultHello), accepted]),
    ("session-switch-over", 0x9B, [vcpu0, vcpu1, lowMemory, summary, .ack(0)]),
    ("session-fault", 0x1F, [.pageRequest(requestID: 1, pageIndex: 3, count: 1), .prioritize(pageIndex: 3),
                             .pageReply(requestID: 1, pages: batch([(3, pageBytes(3))]))]),
    ("session-end", 0x10, [.digest(algorithm: .pageCRC32CXor, bytes: [1, 2, 3, 4]), .complete, .ack(1)]),
    ("discard", 0x9C, [.discard([3..<9, 300..<301])]),
    ("session-precopy-round", 0x95, [.pages(batch([(8, pageBytes(8)), (9, nil)])), .ack(5), .discard([8..<9]), .ack(5), .ack(6)]),
]

guard CommandLine.arguments.count == 2 else {
    fputs("usage: corpus-generator OUTPUT_DIR\n", stderr)
    exit(2)
}
let directory = CommandLine.arguments[1]
for (index, (name, control, messages)) in seeds.enumerated() {
    var encoder = WireEncoder()
    do {
        for message in messages { try encoder.encode(message) }
    } catch {
        fputs("cannot encode \(name): \(error)\n", stderr)
        exit(1)
    }
    let path = "\(directory)/\(index < 10 ? "0" : "")\(index)-\(name).bin"
    let bytes = [control] + encoder.bytes
    guard let file = fopen(path, "wb"), fwrite(bytes, 1, bytes.count, file) == bytes.count, fclose(file) == 0 else {
        fputs("cannot write \(path)\n", stderr)
        exit(1)
    }
}
print("wrote \(seeds.count) seeds to \(directory)")
