@testable import FaultlineEngine
import FaultlineCore
import FaultlineLinux
import Foundation
import Testing

@Suite("Installer claims and the failure classifier (no kernel)")
struct InstallerAndClassifierTests {
    func batch(_ pages: Range<Int>) throws -> PageBatch {
        var e = WireEncoder(reservingCapacity: pages.count * 4200)
        e.beginPages(pageSize: 4096)
        var bytes = [UInt8](repeating: 0, count: 4096)
        for p in pages {
            bytes[0] = UInt8(truncatingIfNeeded: p); bytes[1] = 0xEE
            _ = bytes.withUnsafeBytes { e.appendPage(index: UInt64(p), bytes: $0) }
        }
        e.endPages()
        return try decodedBatch(e.bytes)
    }

    @Test(arguments: [true, false])
    func twoInstallersRacingOnTheSamePagesMapEachOnce(exclusive: Bool) throws {
        let pages = 16 + 2048
        let table = DestinationPageTable(count: pages)
        _ = table.switchOver(owed: [16..<pages])
        let mapper = MemoryPageMapper(pages: pages)
        try mapper.armFaults()
        let book = FaultBook(pages: pages, vcpus: 1, vcpusAccountOwnStall: false)
        let installer = PageInstaller(table: table, mapper: mapper, book: book, lowPages: 16, exclusiveInstalls: exclusive)
        let b = try batch(16..<pages)
        let threads = try (0..<2).map { i in
            try OSThread(name: "installer \(i)") {
                let scratch = PageInstaller.Scratch(pages: 64)
                try? installer.install(b, demand: i == 1, scratch: scratch, runPages: 64)
            }
        }
        threads.forEach { $0.join() }
        #expect(table.isComplete == false)  // low pages were never sent
        for p in 16..<pages {
            #expect(mapper.mapCount[p] == 1, "page \(p) mapped \(mapper.mapCount[p]) times")
            #expect(mapper.bytes(of: p).load(as: UInt8.self) == UInt8(truncatingIfNeeded: p))
            #expect(table.state(p) == .installed)
        }
    }

    @Test func aPageOutsideMemoryIsAProtocolViolation() throws {
        let table = DestinationPageTable(count: 32)
        _ = table.switchOver(owed: [16..<32])
        let mapper = MemoryPageMapper(pages: 32)
        let installer = PageInstaller(table: table, mapper: mapper, book: FaultBook(pages: 32, vcpus: 1, vcpusAccountOwnStall: false),
                                      lowPages: 16, exclusiveInstalls: false)
        #expect(throws: MigrationError.self) {
            try installer.install(try batch(30..<34), demand: false, scratch: PageInstaller.Scratch(pages: 8), runPages: 8)
        }
    }

    @Test func theClassifierSeparatesLostConnectionsFromViolations() {
        #expect(FailureClassifier.classify(SystemError("send", errno: EPIPE)) == .connectionLost)
        #expect(FailureClassifier.classify(SystemError("recv", errno: EAGAIN)) == .connectionLost)
        #expect(FailureClassifier.classify(SystemError("UFFDIO_COPY", errno: ENOMEM)) == .local)
        #expect(FailureClassifier.classify(WireError.truncated(bufferedBytes: 3)) == .connectionLost)
        #expect(FailureClassifier.classify(WireError.headerChecksumMismatch) == .corruptTransport)
        #expect(FailureClassifier.classify(MigrationError.corruptTransport("x")) == .corruptTransport)
        #expect(FailureClassifier.classify(WireError.malformed("x")) == .protocolViolation)
        #expect(FailureClassifier.classify(WireError.notAFaultlinePeer(magic: 1)) == .protocolViolation)
        #expect(FailureClassifier.classify(MigrationError.protocolViolation("x")) == .protocolViolation)
        #expect(FailureClassifier.classify(MigrationError.thread("fault receiver", MigrationError.protocolViolation("x"))) == .protocolViolation)
        #expect(FailureClassifier.classify(MigrationError.peerError("x")) == .peerReported)
        #expect(FailureClassifier.classify(MigrationError.digestMismatch(source: 1, destination: 2)) == .verification)
    }
}
