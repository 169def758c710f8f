import Atomics
import FaultlineCore
import FaultlineLinux

/// The real page mapper: guest RAM of a ``MigratableVM`` under userfaultfd. Pre-copy pages
/// are plain stores (pwrite into the file for MINOR, so they stay unmapped and later fault
/// as MINOR); after `armFaults` pages are mapped with UFFDIO_COPY / MOVE (from a
/// pre-populated pool) / CONTINUE, and a missing page faults to the fault delivery.
public final class UffdPageMapper: PageMapper, @unchecked Sendable {
    let vm: MigratableVM
    let layout: MachineLayout
    let faultMode: FaultMode
    let topology: UffdTopology
    public private(set) var uffds: [Userfaultfd] = []
    var pagesPerUffd: Int
    var armed = false
    let zeroPage: UnsafeMutableRawPointer
    /// Pre-populated private pages that bulk runs are written into and then moved into guest
    /// RAM with UFFDIO_MOVE (no page allocation, no second copy). Owned by the destination
    /// (it may outlive one attempt), lent here.
    let pool: DestinationPool?
    /// Guest writes, for a guest_memfd VM (its RAM slot has no dirty log): every RAM page goes
    /// in write-protected (UFFDIO_COPY_MODE_WP), so the guest's first write to it is a
    /// write-protect fault the readers note here (when a vCPU thread took it) before they
    /// lift the protection.
    let writeLog: PageBitmap?
    /// vcpu-exit on KVM Userfault: the RAM memslot's userfault bitmap (RAM page indices). A page
    /// is marked present there (its kernel bit cleared, a store-release) only once it is in
    /// guest memory; a discarded page is marked missing again. The userfaultfd behind it
    /// (MISSING, no SIGBUS) catches accesses that do not come from a vCPU.
    let userfault: PageBitmap?
    /// MISSING-based modes on anonymous RAM where the kernel has UFFDIO_MOVE: dropped stale
    /// pages are kept for their replacements (see ``RecycledPages``). Set by `armFaults`.
    private(set) var recycler: RecycledPages?

    init(vm: MigratableVM, faultMode: FaultMode, topology: UffdTopology, pool: DestinationPool?, writeLog: PageBitmap? = nil) {
        self.vm = vm
        self.writeLog = writeLog
        self.layout = vm.layout
        self.faultMode = faultMode
        self.topology = topology
        self.pool = faultMode == .uffdMinor || writeLog != nil ? nil : pool
        self.userfault = faultMode == .vcpuExit ? vm.userfaultBitmap : nil
        pagesPerUffd = vm.layout.ramPages
        zeroPage = .allocate(byteCount: 4096, alignment: 4096)
        zeroPage.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
    }

    deinit {
        disarmFaults()
        zeroPage.deallocate()
    }

    @inline(__always) func ramOffset(_ page: Int) -> UInt64 { UInt64(page - layout.lowPages) * 4096 }

    /// KVM Userfault: pages `first..<first+count` (layout indices) are in guest memory now.
    @inline(__always) func markPresent(first page: Int, count: Int) {
        guard let userfault, page >= layout.lowPages else { return }
        for i in 0..<count { userfault.insert(page - layout.lowPages + i) }
    }

    public func store(_ page: Int, bytes: UnsafeRawPointer?) throws {
        let source = bytes ?? UnsafeRawPointer(zeroPage)
        if page >= layout.lowPages && faultMode == .uffdMinor {
            try vm.ram.writeFile(at: ramOffset(page), from: source, length: 4096)
        } else if page >= layout.lowPages && armed {
            // MISSING modes, armed before pre-copy: the first copy of a page goes in with
            // UFFDIO_COPY, which lets the kernel allocate it (no first-touch fault); a later
            // round's copy overwrites the mapped page in place. Never a plain store to a
            // missing page: it would block on (or SIGBUS from) the armed range.
            let uffd = uffds[(page - layout.lowPages) / pagesPerUffd]
            let destination = HostAddress(rawValue: vm.ram.hostAddress.rawValue + ramOffset(page))
            let tracked = writeLog != nil
            if try uffd.copy(to: destination, from: source, length: 4096, writeProtect: tracked) == .alreadyPresent {
                // A store into a write-protected page would fault on this thread: lift it around the copy.
                if tracked { try uffd.writeProtect(start: destination, length: 4096, protect: false) }
                vm.pagePointer(page).copyMemory(from: source, byteCount: 4096)
                if tracked { try uffd.writeProtect(start: destination, length: 4096, protect: true) }
            }
        } else {
            vm.pagePointer(page).copyMemory(from: source, byteCount: 4096)
        }
        markPresent(first: page, count: 1)
    }

    public func storeRun(first page: Int, count: Int, data: UnsafeRawPointer) throws {
        if page >= layout.lowPages && count > 1 {
            if faultMode == .uffdMinor {
                try vm.ram.writeFile(at: ramOffset(page), from: data, length: count * 4096)
                return
            }
            if armed {
                let uffd = uffds[(page - layout.lowPages) / pagesPerUffd]
                let destination = HostAddress(rawValue: vm.ram.hostAddress.rawValue + ramOffset(page))
                if try uffd.copy(to: destination, from: data, length: UInt64(count) * 4096, writeProtect: writeLog != nil) == .installed {
                    markPresent(first: page, count: count)
                    return
                }
                // Some page was mapped already: page by page (those are overwritten in place).
            }
        }
        for i in 0..<count { try store(page + i, bytes: data + i * 4096) }
    }

    public func discard(_ pages: Range<Int>) throws {
        guard faultMode != .uffdMinor else { return }  // MINOR: the file copy is overwritten before CONTINUE maps it
        let ram = pages.clamped(to: layout.lowPages..<layout.totalPages)
        guard !ram.isEmpty else { return }
        if let recycler, armed {
            // One userfaultfd's slice at a time: a move stays within one registration.
            var first = ram.lowerBound
            while first < ram.upperBound {
                let index = (first - layout.lowPages) / pagesPerUffd
                guard index < uffds.count else { break }
                let end = min(ram.upperBound, layout.lowPages + (index + 1) * pagesPerUffd)
                recycler.recycle((first - layout.lowPages)..<(end - layout.lowPages), ramBase: vm.ram.hostAddress, uffd: uffds[index])
                first = end
            }
        }
        // Always: whatever the moves left behind is dropped (a stale page must never stay).
        try vm.ram.discard(offset: ramOffset(ram.lowerBound), length: UInt64(ram.count) * 4096)
        if let userfault { for page in ram { userfault.remove(page - layout.lowPages) } }  // vCPUs exit there again
    }

    public func armFaults() throws {
        guard !armed else { return }
        let features: UffdFeatures = faultMode == .uffdMinor ? [.minorShmem, .missingShmem, .threadID]
            : (faultMode == .vcpuExit && userfault == nil ? [.sigbus] : [.threadID])
        // MINOR also registers MISSING: the memfd is not allocated up front (that would delay
        // the first page by the whole allocation), so a page nothing was written to yet is a hole,
        // which faults as MISSING (MINOR alone would let the kernel fill it with zeros). Both
        // are resolved the same way: the bytes are written into the file, then CONTINUE maps
        // them (and wakes either kind of waiter: wake-ups go by address).
        var mode: UffdRegisterMode = faultMode == .uffdMinor ? [.minor, .missing] : .missing
        if writeLog != nil { mode.insert(.writeProtect) }
        let count = topology == .perVcpu && faultMode != .vcpuExit ? layout.vcpus : 1
        pagesPerUffd = layout.ramPages / count
        let recycling = faultMode != .uffdMinor && writeLog == nil && pool == nil && vm.ram.backing == .anonymous
            && Userfaultfd.kernelOffers(.move)
        recycler = recycling ? RecycledPages(ramPages: layout.ramPages) : nil
        for i in 0..<count {
            let u = try Userfaultfd(required: features.union(pool != nil || recycler != nil ? [.move] : []), label: "uffd \(i)")
            try u.register(start: vm.ram.hostAddress.adding(UInt64(i * pagesPerUffd) * 4096)!,
                           length: UInt64(pagesPerUffd) * 4096, mode: mode)
            do { try recycler?.register(first: i * pagesPerUffd, count: pagesPerUffd, with: u) }
            catch { recycler = nil }  // stale pages are then dropped, as without MOVE
            uffds.append(u)
        }
        armed = true
    }

    public func group(of page: Int) -> Int { page < layout.lowPages ? -1 : (page - layout.lowPages) / max(pagesPerUffd, 1) }

    public func takePool(_ pages: Int) -> UnsafeMutableRawPointer? { pool?.take(pages) }

    public func map(first page: Int, count: Int, data: UnsafeRawPointer?, fromPool: Bool, demand: Bool) throws -> Bool {
        if page < layout.lowPages || !armed {
            for i in 0..<count { try store(page + i, bytes: data.map { $0 + i * 4096 }) }
            return true
        }
        let length = UInt64(count * 4096)
        let offset = ramOffset(page)
        let uffd = uffds[(page - layout.lowPages) / pagesPerUffd]
        let destination = HostAddress(rawValue: vm.ram.hostAddress.rawValue + offset)
        // vcpu-exit: the waiting vCPU thread is woken by the installer, not by the kernel. (On
        // KVM Userfault a non-vCPU access may sleep in the userfaultfd behind it: wake it.)
        let dontWake = faultMode == .vcpuExit && userfault == nil
        let outcome: UffdInstallOutcome
        switch faultMode {
        case .uffdMinor:
            // A demand reply is stored through the file's second mapping: write() would wait for
            // the inode lock, which a bulk write of a whole run holds for milliseconds. The bulk
            // stream keeps write(): through the mapping each page costs a first-touch fault.
            if demand {
                if let data { try vm.ram.storeThroughAlias(at: offset, from: data, length: count * 4096) }
                else { for i in 0..<count { try vm.ram.storeThroughAlias(at: offset + UInt64(i * 4096), from: zeroPage, length: 4096) } }
            } else if let data { try vm.ram.writeFile(at: offset, from: data, length: count * 4096) }
            else { for i in 0..<count { try vm.ram.writeFile(at: offset + UInt64(i * 4096), from: zeroPage, length: 4096) } }
            outcome = try uffd.continue(at: destination, length: length, dontWake: dontWake)
        default:
            // A page mapped meanwhile by the other installer holds the same verified bytes:
            // step over it and map the rest of the run.
            if let data, fromPool {
                outcome = try uffd.move(to: destination, from: HostAddress(data), length: length, dontWake: dontWake,
                                        skippingPresent: 4096)
            } else if let data, !demand, let recycler, let slot = recycler.take(first: page - layout.lowPages, count: count) {
                // The run's stale pages were kept: write the bytes into them and move them back.
                slot.copyMemory(from: data, byteCount: count * 4096)
                do {
                    outcome = try uffd.move(to: destination, from: HostAddress(slot), length: length, dontWake: dontWake,
                                            skippingPresent: 4096)
                } catch {
                    // A page the kernel would not move (pinned, say): copy what is still missing.
                    outcome = try uffd.copy(to: destination, from: data, length: length, dontWake: dontWake, skippingPresent: 4096)
                }
            } else if let data {
                outcome = try uffd.copy(to: destination, from: data, length: length, dontWake: dontWake,
                                        writeProtect: writeLog != nil, skippingPresent: 4096)
            } else if writeLog != nil {
                // UFFDIO_ZEROPAGE has no write-protect mode (and a write to the zero page is a
                // plain copy-on-write, never a userfault): copy zeros in, protected.
                var installed = false
                for i in 0..<count {
                    let at = HostAddress(rawValue: destination.rawValue + UInt64(i * 4096))
                    if try uffd.copy(to: at, from: zeroPage, length: 4096, dontWake: dontWake, writeProtect: true) == .installed {
                        installed = true
                    }
                }
                outcome = installed ? .installed : .alreadyPresent
            } else {
                outcome = try uffd.zeroPage(at: destination, length: length, dontWake: dontWake, skippingPresent: 4096)
            }
        }
        markPresent(first: page, count: count)  // every page of the run is in (skipped ones were mapped by another installer)
        return outcome == .installed
    }

    public func wake(_ page: Int) throws {
        guard armed, page >= layout.lowPages else { return }
        let uffd = uffds[(page - layout.lowPages) / pagesPerUffd]
        let at = HostAddress(rawValue: vm.ram.hostAddress.rawValue + ramOffset(page))
        if faultMode == .uffdMinor { _ = try uffd.continue(at: at, length: 4096) } else { try uffd.wake(start: at, length: 4096) }
    }

    public func disarmFaults() {
        guard armed else { return }
        for u in uffds { try? u.unregister(start: vm.ram.hostAddress, length: vm.ram.size) }
        armed = false
    }

    public func bytes(of page: Int) -> UnsafeRawPointer { UnsafeRawPointer(vm.pagePointer(page)) }

    public var recycledPages: (kept: Int, reused: Int) {
        guard let recycler else { return (0, 0) }
        return (recycler.recycled.load(ordering: .relaxed), recycler.reused.load(ordering: .relaxed))
    }
}

/// Pre-populated private pages for MISSING-mode installs (see ``UffdPageMapper``), kept
/// across attempts of one `receive`.
final class DestinationPool: @unchecked Sendable {
    let pages: Int
    private let memory: AnonymousMapping
    private let next = ManagedAtomic<Int>(0)
    var base: UnsafeMutableRawPointer { memory.base }

    /// nil when the mapping cannot be made (installs then copy instead of moving).
    init?(pages: Int) {
        guard let memory = try? AnonymousMapping(size: pages * 4096, populate: true, label: "destination pool") else { return nil }
        self.memory = memory
        self.pages = pages
    }

    /// `count` contiguous pool pages, or nil when the pool is used up.
    func take(_ count: Int) -> UnsafeMutableRawPointer? {
        let first = next.loadThenWrappingIncrement(by: count, ordering: .relaxed)
        guard first + count <= pages else { return nil }
        return base + first * 4096
    }

    /// Pages handed out so far.
    var used: Int { next.load(ordering: .relaxed) }
}

extension UffdPageMapper {
    /// A mapper whose MISSING-mode ranges are registered before pre-copy, so that pre-copy
    /// pages go in with UFFDIO_COPY (no vCPU runs yet: nothing can fault). MINOR writes the
    /// file and stays unarmed until the switch-over.
    static func armedForPrecopy(vm: MigratableVM, faultMode: FaultMode, topology: UffdTopology,
                                pool: DestinationPool?, writeLog: PageBitmap? = nil) throws -> UffdPageMapper {
        let mapper = UffdPageMapper(vm: vm, faultMode: faultMode, topology: topology, pool: pool, writeLog: writeLog)
        if faultMode != .uffdMinor { try mapper.armFaults() }
        return mapper
    }
}
