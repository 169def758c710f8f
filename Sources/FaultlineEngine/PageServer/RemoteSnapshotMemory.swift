import FaultlineCore
import FaultlineLinux

/// The memory of a snapshot a `serve-snapshot` server serves, fetched into this process while
/// a page server serves its peer from it (`uffd-serve --from`): the peer's guest starts before
/// its memory has crossed the network. The fetch is a lazy remote restore into
/// ``FetchedMemoryMachine``; a fault on a page that has not arrived asks for it on demand and
/// waits (``ensure(_:)``).
///
/// A page is never served before it has arrived and passed its checks. If the fetch fails
/// for good, a page that has not arrived can never be served: ``ensure(_:)`` throws and the
/// page server poisons the page (the guest gets a memory error, never a wrong page).
public final class RemoteSnapshotMemory: @unchecked Sendable {
    public let layout: MachineLayout
    let mapper: FetchedMemoryMapper
    let machine: FetchedMemoryMachine
    private var thread: OSThread?
    private let ended: TimedCondition
    private let outcomeBox: OutcomeBox
    private let demand = Locked(())

    /// Asks `server` for the snapshot `name` (nil: the server's folder itself) and starts
    /// fetching it; returns once the memory file exists (the layout is known), at most
    /// `answerSeconds` later. Throws what refused or failed the fetch before that.
    public init(server: SocketEndpoint, name: String?, options: SnapshotRestore.Options, answerSeconds: Double = 120) throws {
        let made = Locked<(FetchedMemoryMachine, FetchedMemoryMapper)?>(nil)
        let built = TimedCondition()
        var restore = options
        restore.lazy = true
        restore.destination.faultMode = .vcpuExit  // the worker resolves its own faults, as a vCPU thread would
        restore.destination.runAfterSeconds = 0
        restore.destination.machineFactory = { layout in
            let mapper = try FetchedMemoryMapper(layout: layout)
            let machine = FetchedMemoryMachine(layout: layout)
            made.withLock { $0 = (machine, mapper) }
            built.broadcast()
            return (machine, mapper)
        }
        let ended = TimedCondition()
        let box = OutcomeBox()
        let fetch = try OSThread(name: "snapshot fetch") {
            let result = Result { try SnapshotRestore.run(from: server, snapshot: name, options: restore, started: MonotonicClock.nanoseconds()) }
            ended.withLock { box.outcome = result }
            ended.broadcast()
            built.broadcast()
        }
        let deadline = MonotonicClock.deadline(after: answerSeconds)
        while made.withLock({ $0 }) == nil && ended.withLock({ box.outcome }) == nil && MonotonicClock.nanoseconds() < deadline {
            _ = built.wait(timeoutNanoseconds: 50_000_000) { made.withLock { $0 } != nil }
        }
        guard let (machine, mapper) = made.withLock({ $0 }) else {
            if case .failure(let error)? = ended.withLock({ box.outcome }) {
                fetch.join()
                throw error
            }
            // Not answered in time: the fetch thread ends at its own timeouts, unwaited.
            throw MigrationError.timeout("the snapshot server \(server) did not start sending within \(Int(answerSeconds)) s")
        }
        self.machine = machine
        self.mapper = mapper
        layout = machine.layout
        self.ended = ended
        outcomeBox = box
        thread = fetch
    }

    private final class OutcomeBox: @unchecked Sendable { var outcome: Result<RestoreReport, Error>? }

    deinit { thread?.join() }

    /// The memory file the page server serves (laid out as the snapshot's memory file).
    public var memoryFile: FileDescriptor { mapper.memory.fd }

    /// Returns once every page of `pages` (page indexes of the memory file) has arrived: those
    /// still missing are asked for, one by one, and waited for. Throws when one never can.
    public func ensure(_ pages: Range<Int>) throws {
        for page in pages where !mapper.present.contains(page) {
            // Low memory is in by the commit; RAM pages after it come on demand.
            guard let handler = machine.handlerOnceStarted(seconds: 600) else {
                throw PageServerError.pageUnavailable("the snapshot fetch ended before page \(page) arrived: \(failureText)")
            }
            if mapper.present.contains(page) { continue }
            guard page >= layout.lowPages, page < layout.totalPages else {
                throw PageServerError.pageUnavailable("page \(page) of the memory file never arrived (low memory, or past the snapshot)")
            }
            if case .failure? = ended.withLock({ outcomeBox.outcome }) {
                throw PageServerError.pageUnavailable("page \(page) never arrived: \(failureText)")
            }
            // One vCPU's worth of fault path: one request at a time.
            do {
                try demand.withLock { _ in try handler.resolveOnVcpu(0, ramOffset: UInt64(page - layout.lowPages) * 4096) }
            } catch {
                throw PageServerError.pageUnavailable("page \(page) never arrived: \(error)")
            }
            if !mapper.present.contains(page) {
                throw PageServerError.pageUnavailable("page \(page) did not arrive: \(failureText)")
            }
        }
    }

    /// Pages that have arrived.
    public var arrivedPages: Int { (0..<layout.totalPages).reduce(0) { $0 + (mapper.present.contains($1) ? 1 : 0) } }

    private var failureText: String {
        if case .failure(let error)? = ended.withLock({ outcomeBox.outcome }) { return "\(error)" }
        return "the fetch stopped"
    }

    /// Waits (at most `seconds`) for the fetch to end: its report, or what failed it (nil: not yet).
    public func finish(waitingSeconds seconds: Double) -> Result<RestoreReport, Error>? {
        let done = ended.wait(timeoutNanoseconds: UInt64(seconds * 1e9)) { outcomeBox.outcome != nil }
        if done { thread?.join(); thread = nil }
        return ended.withLock { outcomeBox.outcome }
    }
}
