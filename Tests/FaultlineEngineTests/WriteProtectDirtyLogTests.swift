@testable import FaultlineEngine
import Dispatch
import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// The dirty log of guest_memfd pre-copy (``WriteProtectDirtyLog``) on a plain mapping: a
/// store from a thread of this process stands in for the guest's.
@Suite("Write-protect dirty log (userfaultfd WP)", .timeLimit(.minutes(1)),
       .gate(.writeProtectDirtyLog))
struct WriteProtectDirtyLogTests {
    @Test func aCollectionBetweenNotingAPageAndLiftingItsProtectionWaitsAndTheNextWriteIsSeen() throws {
        let ram = try AnonymousMapping(size: 4 * 4096, label: "test ram")
        let log = try WriteProtectDirtyLog(base: ram.hostAddress, pages: 4)
        defer { log.stop() }
        let noted = DispatchSemaphore(value: 0), proceed = DispatchSemaphore(value: 0)
        let first = PageBitmap(count: 4), second = PageBitmap(count: 4)
        let armed = Locked(true)
        // The reader holds the first write's page between noting it and lifting its protection
        // until a collection has either waited for it or run to its end in between.
        log.afterNoting = { _ in
            guard armed.withLock({ let was = $0; $0 = false; return was }) else { return }
            noted.signal()
            proceed.wait()
        }
        log.collectWaits = { proceed.signal() }
        let writer = try OSThread(name: "guest write") { ram.base.storeBytes(of: 1, toByteOffset: 4096, as: UInt8.self) }
        noted.wait()
        let collector = try OSThread(name: "collect") {
            try? log.collect(into: first, firstPage: 0)
            proceed.signal()
        }
        collector.join()
        writer.join()
        #expect(first.contains(1), "the first write is in the collection")
        // The collection protected the page again: the next write stops in a fault and is noted.
        ram.base.storeBytes(of: 2, toByteOffset: 4096, as: UInt8.self)
        try log.collect(into: second, firstPage: 0)
        #expect(second.contains(1), "a write after the collection is in the next one")
        #expect(ram.base.load(fromByteOffset: 4096, as: UInt8.self) == 2)
    }
}
