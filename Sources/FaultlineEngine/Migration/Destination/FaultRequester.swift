import Atomics
import FaultlineCore
import FaultlineLinux

/// Sends page requests on the fault connection (once per page, re-sent after a reconnect)
/// and runs the threads that turn faults into requests: the vcpu-exit requester, or the
/// userfaultfd readers.
final class FaultRequester: @unchecked Sendable {
    let table: DestinationPageTable
    let book: FaultBook
    let failures: FailureSlot
    let faultPathCPU: Int32?
    /// Pages asked for per fault: the faulting page and up to `faultAround - 1` that follow it
    /// and are not installed yet (``DestinationOptions/faultAround``).
    let faultAround: Int
    private let channel = Locked<WireChannel?>(nil)
    private let stopping = ManagedAtomic<Bool>(false)
    private var threads: [OSThread] = []
    private let stopEvent: EventFD
    // vcpu-exit: each vCPU thread sends its own request, with its own encoder (a vCPU waiting
    // for a page is boosted to nice -10 first, so it does not hold the send lock at +19).
    // A requester thread in between would cost a wake-up on the fault-path CPU per fault,
    // and that wake-up can wait for the CPU.
    private let vcpuEncoders: UnsafeMutablePointer<WireEncoder>
    /// Maps a page the stream staged already, from the staged bytes (true), so that no request
    /// is sent for it (``InstallPipeline/resolveStaged(_:)``). Set before the readers start.
    var resolveStaged: ((Int) throws -> Bool)?
    /// After a request went out: maps the page if it was staged meanwhile
    /// (``InstallPipeline/lookAgainAfterRequest(_:)``).
    var lookAgainAfterRequest: ((Int) throws -> Void)?
    /// Pages this process can read itself: a fault is served on its own thread, not requested.
    /// Set before the readers and vCPUs start.
    var local: LocalDemand? {
        didSet {
            guard local != nil else { return }
            vcpuScratches = (0..<max(book.vcpus, 1)).map { _ in PageInstaller.Scratch(pages: faultAround) }
            for v in 0..<max(book.vcpus, 1) { vcpuEncoders[v].reserve(max(faultAround, local?.aheadPages ?? 0)) }
        }
    }
    private var vcpuScratches: [PageInstaller.Scratch] = []

    init(table: DestinationPageTable, book: FaultBook, failures: FailureSlot, faultPathCPU: Int32?, faultAround: Int = 1) throws {
        self.faultAround = max(faultAround, 1)
        self.table = table
        self.book = book
        self.failures = failures
        self.faultPathCPU = faultPathCPU
        stopEvent = try EventFD()
        vcpuEncoders = .allocate(capacity: max(book.vcpus, 1))
        for v in 0..<max(book.vcpus, 1) { (vcpuEncoders + v).initialize(to: WireEncoder(reservingCapacity: 4096)) }  // a buffer each
    }

    deinit {
        stop()
        vcpuEncoders.deinitialize(count: max(book.vcpus, 1))
        vcpuEncoders.deallocate()
    }

    func setChannel(_ c: WireChannel?) { channel.withLock { $0 = c } }
    var currentChannel: WireChannel? { channel.withLock { $0 } }

    /// Sends a request unless one is outstanding. Thread-safe; never waits for the page.
    /// The request covers the pages after `page` up to the fault-around window, stopping at
    /// the first one already installed: a guest that walks memory faults once per window,
    /// not once per page. Only `page` counts as a fault (latency, requested set); the others
    /// are read ahead (the source sends them even where its stream already did).
    func request(_ page: Int, vcpu: Int, faultTime: UInt64 = MonotonicClock.nanoseconds(), encoder: inout WireEncoder,
                 scratch: PageInstaller.Scratch? = nil) {
        guard book.noteRequest(page, vcpu: vcpu, at: faultTime) else { return }
        var count = 1
        while count < faultAround && page + count < table.count && !table.installed.contains(page + count) { count += 1 }
        if let local, let scratch {
            do {
                book.noteSent(page, at: MonotonicClock.nanoseconds())
                try local.serve(page..<page + count, encoder: &encoder, scratch: scratch)
            } catch {
                failures.record("local page supplier", error)
            }
            return
        }
        guard let channel = currentChannel else { return }
        do {
            try encoder.encode(.pageRequest(requestID: UInt64(page), pageIndex: UInt64(page), count: UInt32(count)))
            try channel.flush(&encoder)
            book.noteSent(page, at: MonotonicClock.nanoseconds())
        } catch {
            encoder.removeAll()  // the connection is down: re-sent after the reconnect
        }
    }

    /// Asks again for every page requested and not yet installed (after a reconnect or a
    /// dropped reply); with `all`, for every page still missing.
    func rerequest(all: Bool) {
        guard let channel = currentChannel else { return }
        var encoder = WireEncoder(reservingCapacity: 4096)
        for page in 0..<table.count where !table.installed.contains(page) && (all || book.requested.contains(page)) {
            if all { book.requested.insert(page) }
            try? encoder.encode(.pageRequest(requestID: UInt64(page), pageIndex: UInt64(page), count: 1))
            if encoder.bytes.count > 60_000 { try? channel.flush(&encoder) }
        }
        try? channel.flush(&encoder)
    }

    // MARK: vcpu-exit

    /// Called on vCPU thread `vcpu` (only there: the encoder is that thread's): asks for the
    /// page it faulted on.
    func requestFromVcpu(_ page: Int, vcpu: Int, time: UInt64) {
        let v = min(max(vcpu, 0), max(book.vcpus, 1) - 1)
        request(page, vcpu: vcpu, faultTime: time, encoder: &vcpuEncoders[v], scratch: vcpuScratches.isEmpty ? nil : vcpuScratches[v])
    }

    // MARK: userfaultfd readers

    /// `writeLog`: RAM was installed write-protected (a guest_memfd VM): note each page the
    /// guest writes there, then lift the protection (which wakes the writer).
    func startReaders(_ uffds: [Userfaultfd], perUffd: Int, ramBase: UInt64, lowPages: Int,
                      mapper: PageMapper, writeLog: PageBitmap? = nil, vcpuForThread: @escaping @Sendable (UInt32) -> Int) throws {
        for u in uffds {
            for _ in 0..<perUffd {
                threads.append(try OSThread(name: "\(u.label) reader", niceness: OSThread.Niceness.faultPath, cpu: faultPathCPU) { [self] in
                    readerLoop(u, ramBase: ramBase, lowPages: lowPages, mapper: mapper, writeLog: writeLog, vcpuForThread: vcpuForThread)
                })
            }
        }
    }

    private func readerLoop(_ uffd: Userfaultfd, ramBase: UInt64, lowPages: Int, mapper: PageMapper,
                            writeLog: PageBitmap?, vcpuForThread: (UInt32) -> Int) {
        var events = UffdEventBuffer(capacity: 16)
        var encoder = WireEncoder(reservingCapacity: 64)
        let scratch = local.map { _ in PageInstaller.Scratch(pages: faultAround) }
        if let local { encoder.reserve(max(faultAround, local.aheadPages)) }
        do {
            while try uffd.waitReadable(orStop: stopEvent.fd) {
                let n = try uffd.readEvents(into: &events)
                for i in 0..<n {
                    guard case .pagefault(let address, let flags, let tid) = events[i] else { continue }
                    let page = lowPages + Int(((address.rawValue &- ramBase) & ~4095) / 4096)
                    guard page >= lowPages, page < table.count else { continue }
                    if flags.contains(.writeProtect), let writeLog {
                        // Only a vCPU thread's write is the guest's (KVM writes for the guest
                        // on its vCPU threads); any other writer must show in the digest.
                        if vcpuForThread(tid) >= 0 { writeLog.insert(page) }  // before the write can happen
                        try uffd.writeProtect(start: HostAddress(rawValue: address.rawValue & ~4095), length: 4096, protect: false)
                        continue
                    }
                    if table.installed.contains(page) {
                        try mapper.wake(page)  // installed meanwhile: do not leave the faulting thread asleep
                        continue
                    }
                    let faultTime = MonotonicClock.nanoseconds()
                    if let resolveStaged, try resolveStaged(page) {  // the mapping woke the faulting thread
                        book.noteResolvedWithoutRequest(page, vcpu: vcpuForThread(tid), faultTime: faultTime,
                                                        now: MonotonicClock.nanoseconds())
                        continue
                    }
                    request(page, vcpu: vcpuForThread(tid), faultTime: faultTime, encoder: &encoder, scratch: scratch)
                    try lookAgainAfterRequest?(page)
                }
            }
        } catch {
            if !stopping.load(ordering: .relaxed) { failures.record("\(uffd.label) reader", error) }
        }
    }

    /// Stops and joins every thread this requester started (idempotent).
    func stop() {
        stopping.store(true, ordering: .relaxed)
        stopEvent.signal()
        for t in threads { t.join() }
        threads = []
    }
}

extension WireEncoder {
    /// Room for a batch of `pages` data pages, so that encoding one on the fault path never grows it.
    mutating func reserve(_ pages: Int) {
        var bigger = WireEncoder(reservingCapacity: (pages + 1) * (4096 + WireProtocol.pageDescriptorSize) + 4096)
        swap(&self, &bigger)
    }
}
