import Atomics
import FaultlineCore
import FaultlineLinux

/// The source's fault server: answers the destination's page requests on the fault
/// connection from the (paused) guest memory and moves the background stream next to each
/// fault (locality, as QEMU does). One thread, on the fault-path CPU.
final class FaultServer: @unchecked Sendable {
    let sender: PageSender
    let done: PageBitmap
    let cursor: ManagedAtomic<Int>
    let failures: FailureSlot
    let demandServed = ManagedAtomic<Int>(0)
    let requests = ManagedAtomic<Int>(0)
    /// Requests whose page the background stream had sent already (in flight or queued at the
    /// destination when the vCPU touched it): how much of a fault storm is pages in transit.
    let requestsForSentPages = ManagedAtomic<Int>(0)
    /// The fault connection is gone (the stream notices and reconnects).
    let broken = ManagedAtomic<Bool>(false)
    private var thread: OSThread?
    private var channel: WireChannel?

    init(sender: PageSender, done: PageBitmap, cursor: ManagedAtomic<Int>, failures: FailureSlot) {
        self.sender = sender
        self.done = done
        self.cursor = cursor
        self.failures = failures
    }

    func start(on channel: WireChannel, cpu: Int32?) throws {
        self.channel = channel
        broken.store(false, ordering: .sequentiallyConsistent)
        let total = sender.layout.totalPages
        // Room for the largest reply (a request's whole window), allocated here: the thread
        // never grows it.
        var encoder = WireEncoder(reservingCapacity: Int(WireProtocol.maxPagesPerRequest) * 4200 + 4096)
        thread = try OSThread(name: "fault server", niceness: OSThread.Niceness.faultPath, cpu: cpu) { [self] in
            do {
                while true {
                    switch try channel.receive() {
                    case .pageRequest(let requestID, let first, let count):
                        requests.wrappingIncrement(ordering: .relaxed)
                        guard first < UInt64(total), count >= 1 else {
                            throw MigrationError.protocolViolation("page request for \(first)+\(count) outside guest memory (\(total) pages)")
                        }
                        if done.contains(Int(first)) { requestsForSentPages.wrappingIncrement(ordering: .relaxed) }
                        encoder.beginPages(pageSize: 4096, replyingTo: requestID)
                        let end = min(first &+ UInt64(count), UInt64(total))
                        try sender.machine.checkPages(Int(first)..<Int(end))
                        // The requested page and the rest of the destination's fault-around
                        // window, even pages the stream has sent already: a vCPU that walks
                        // into pages still in flight would otherwise get them one fault at a
                        // time (docs/design.md, "Post-copy": fault-around).
                        for page in Int(first)..<Int(end) {
                            _ = sender.encode(page, into: &encoder)
                            if done.insert(page) { demandServed.wrappingIncrement(ordering: .relaxed) }
                        }
                        cursor.store(Int(end) < total ? Int(end) : 0, ordering: .relaxed)
                        encoder.endPages()
                        try channel.flush(&encoder)
                    case .prioritize(let page):
                        if page < UInt64(total) { cursor.store(Int(page), ordering: .relaxed) }
                    case .error(let m):
                        throw MigrationError.peerError(m)
                    case let other:
                        throw MigrationError.protocolViolation("unexpected \(other.type) on the fault connection")
                    }
                }
            } catch {
                if FailureClassifier.isConnectionLoss(error) { broken.store(true, ordering: .sequentiallyConsistent) }
                else { failures.record("fault server", error) }
            }
        }
    }

    /// Closes its connection and joins the thread (idempotent).
    func stop() {
        channel?.close()
        thread?.join()
        thread = nil
        channel = nil
    }
}
