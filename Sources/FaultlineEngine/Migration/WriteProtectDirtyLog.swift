import FaultlineCore
import FaultlineLinux

/// A dirty log for memory KVM will not log: the shared view of a guest_memfd memslot (the
/// kernel refuses KVM_MEM_LOG_DIRTY_PAGES with KVM_MEM_GUEST_MEMFD). The mapping is
/// registered with userfaultfd write-protect and protected whole (UFFD_FEATURE_WP_UNPOPULATED
/// covers pages never touched yet); the first write to a protected page - the guest's, through
/// KVM's GUP with FOLL_WRITE once the protection change has zapped its TDP entry - stops in a
/// write-protect fault. The reader thread notes the page, then lifts the protection (which
/// wakes the writer). `collect` hands the noted pages over and protects them again, so a
/// later write is the next round's: a write between the hand-over and the re-protection is
/// still in the bytes sent afterwards.
final class WriteProtectDirtyLog: @unchecked Sendable {
    let uffd: Userfaultfd
    let base: HostAddress
    let pages: Int
    private let written: PageBitmap
    private let stopEvent: EventFD
    private var reader: OSThread?
    private let failure = Locked<String?>(nil)
    /// Held by the reader from noting a page to lifting its protection, and by `collect`
    /// throughout: a collection between the two would protect the page again, the reader
    /// would then lift that protection, and the page's later writes would go unseen.
    private let noting = Locked(())
    /// Test hooks: the reader has noted `page` and not yet lifted its protection (it holds
    /// `noting`); `collect` found `noting` held and is about to wait for it.
    var afterNoting: ((Int) -> Void)?
    var collectWaits: (() -> Void)?

    /// Starts tracking writes to `pages` pages at `base`, all protected from now on.
    init(base: HostAddress, pages: Int) throws {
        uffd = try Userfaultfd(required: [.wpUnpopulated], label: "write-protect dirty log")
        self.base = base
        self.pages = pages
        written = PageBitmap(count: pages)
        stopEvent = try EventFD()
        try uffd.register(start: base, length: UInt64(pages) * 4096, mode: .writeProtect)
        reader = try OSThread(name: "wp dirty log", niceness: OSThread.Niceness.faultPath) { [self] in readLoop() }
        try uffd.writeProtect(start: base, length: UInt64(pages) * 4096, protect: true)
    }

    deinit { stop() }

    private func readLoop() {
        var events = UffdEventBuffer(capacity: 16)
        do {
            while try uffd.waitReadable(orStop: stopEvent.fd) {
                let n = try uffd.readEvents(into: &events)
                for i in 0..<n {
                    guard case .pagefault(let address, let flags, _) = events[i], flags.contains(.writeProtect) else { continue }
                    let offset = (address.rawValue &- base.rawValue) & ~4095
                    guard offset < UInt64(pages) * 4096 else { continue }
                    try noting.withLock { _ in
                        written.insert(Int(offset / 4096))  // before the write can happen
                        afterNoting?(Int(offset / 4096))
                        try uffd.writeProtect(start: HostAddress(rawValue: base.rawValue + offset), length: 4096, protect: false)
                    }
                }
            }
        } catch {
            failure.withLock { $0 = "\(uffd.label) reader: \(error)" }
        }
    }

    /// Moves the pages written since the last call into `dirty` (at `firstPage` + page) and
    /// protects them again.
    func collect(into dirty: PageBitmap, firstPage: Int) throws {
        if let f = failure.withLock({ $0 }) { throw MachineLayout.Invalid(description: f) }
        if try noting.withLockIfAvailable({ _ in try collectNoted(into: dirty, firstPage: firstPage) }) == nil {
            collectWaits?()
            try noting.withLock { _ in try collectNoted(into: dirty, firstPage: firstPage) }
        }
    }

    /// `collect`'s work, with `noting` held.
    private func collectNoted(into dirty: PageBitmap, firstPage: Int) throws {
        var runStart = -1
        func protect(_ range: Range<Int>) throws {
            try uffd.writeProtect(start: HostAddress(rawValue: base.rawValue + UInt64(range.lowerBound) * 4096),
                                  length: UInt64(range.count) * 4096, protect: true)
        }
        for page in 0..<pages {
            if written.contains(page) {
                written.remove(page)
                dirty.insert(firstPage + page)
                if runStart < 0 { runStart = page }
            } else if runStart >= 0 {
                try protect(runStart..<page)
                runStart = -1
            }
        }
        if runStart >= 0 { try protect(runStart..<pages) }
    }

    /// Stops the reader and unregisters (which lifts every protection and wakes any writer).
    func stop() {
        guard let reader else { return }
        try? uffd.unregister(start: base, length: UInt64(pages) * 4096)
        stopEvent.signal()
        reader.join()
        self.reader = nil
    }
}
