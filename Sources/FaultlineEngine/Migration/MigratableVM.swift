import Atomics
import FaultlineCore
import FaultlineLinux

/// Counters a running guest reports through its I/O ports.
public final class GuestCounters: @unchecked Sendable {
    public let passes: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    /// Per vCPU: when its second pass here completed (0: not yet).
    let wholePassAt: UnsafeMutablePointer<UnsafeAtomic<UInt64>.Storage>
    public let mismatches = ManagedAtomic<Int>(0)
    public let count: Int
    private let first = Locked<String?>(nil)
    /// The first mismatch a guest reported, described.
    public var firstMismatch: String? { first.withLock { $0 } }

    init(vcpus: Int) {
        count = vcpus
        passes = .allocate(capacity: vcpus)
        passes.initialize(repeating: .init(0), count: vcpus)
        wholePassAt = .allocate(capacity: vcpus)
        wholePassAt.initialize(repeating: .init(0), count: vcpus)
    }

    deinit {
        passes.deallocate()
        wholePassAt.deallocate()
    }

    public func passes(of vcpu: Int) -> UInt64 { UnsafeAtomic<UInt64>(at: passes + vcpu).load(ordering: .relaxed) }
    public var totalPasses: UInt64 { (0..<count).reduce(0) { $0 + passes(of: $1) } }

    func recordPass(_ vcpu: Int) {
        let n = UnsafeAtomic<UInt64>(at: passes + vcpu).loadThenWrappingIncrement(ordering: .relaxed) + 1
        // The second pass a guest completes here is its first whole one: every page of its
        // working set was touched in it.
        if n == 2 { UnsafeAtomic<UInt64>(at: wholePassAt + vcpu).store(MonotonicClock.nanoseconds(), ordering: .relaxed) }
    }

    /// When every vCPU had completed a whole pass here (monotonic ns), or nil if one has not.
    public var everyVcpuWholePassAt: UInt64? {
        var latest: UInt64 = 0
        for v in 0..<count {
            let t = UnsafeAtomic<UInt64>(at: wholePassAt + v).load(ordering: .relaxed)
            if t == 0 { return nil }
            latest = max(latest, t)
        }
        return latest
    }

    func recordMismatch(_ text: String) {
        mismatches.wrappingIncrement(ordering: .relaxed)
        first.withLock { if $0 == nil { $0 = text } }
    }
}

/// Handles a vCPU access to guest RAM that KVM could not satisfy (vcpu-exit post-copy):
/// make the page at `offset` present. Called on the vCPU's own thread.
public protocol RAMFaultHandler: AnyObject, Sendable {
    func resolveOnVcpu(_ vcpu: Int, ramOffset: UInt64) throws
}

/// A VM whose vCPUs run a never-ending guest program on dedicated threads and can be
/// paused, resumed and stopped from another thread (the kick: immediate_exit + signal).
public final class MigratableVM: @unchecked Sendable {
    public let layout: MachineLayout
    public let vm: VirtualMachine
    public let low: GuestMemoryRegion
    public let ram: GuestMemoryRegion
    public private(set) var vcpus: [Vcpu] = []
    public let counters: GuestCounters
    /// Thread ids (gettid) of the vCPU threads, for attributing userfaultfd events.
    public let threadIDs: UnsafeMutablePointer<Int32>

    enum RunState: Int { case running = 0, pausing = 1, stopping = 2 }
    private let state = ManagedAtomic<Int>(RunState.running.rawValue)
    /// Guards `parked` and `failure`; vCPU threads wait on it while paused.
    private let parking = TimedCondition()
    private var parked = 0
    private var threads: [OSThread] = []
    private var failure: String?
    public var faultHandler: RAMFaultHandler?
    /// RAM pages the vcpu-exit path wrote on the guest's behalf (KVM's dirty log does not see
    /// those stores); nil unless asked for.
    public var hostCompletedWrites: PageBitmap?
    /// Guest writes seen another way than KVM's dirty log (a guest_memfd RAM slot has none):
    /// userfaultfd write-protect faults on the destination (see UffdPageMapper.tracksWrites).
    public var guestWriteLog: PageBitmap?
    /// The source's dirty log for a guest_memfd VM's RAM (userfaultfd write-protect).
    var writeProtectLog: WriteProtectDirtyLog?
    /// How vCPU threads are scheduled: each applies it itself when it starts, and
    /// `setVcpuScheduling` changes it for running ones. One lock orders the two, so a change
    /// made while a thread is starting is never lost (a reset to 0 that missed a thread still
    /// starting left it at post-copy niceness for good: on a loaded machine such a guest made
    /// no progress after the migration - the matrix's 0-pass failures).
    private let scheduling = Locked(VcpuScheduling.normal)
    public var startScheduling: VcpuScheduling {
        get { scheduling.withLock { $0 } }
        set { scheduling.withLock { $0 = newValue } }
    }
    /// KVM Userfault: the RAM memslot's userfault bitmap (one bit per RAM page, stored with a
    /// set bit = missing). The memslot has KVM_MEM_USERFAULT from its creation and keeps it
    /// (re-declarations for dirty logging carry it over); nil without KVM Userfault.
    public let userfaultBitmap: PageBitmap?

    /// The RAM of a guest_memfd VM (`guestMemfdRAM`): its guest_memfd, and `ram` is the
    /// slot's shared (userspace_addr) view. See MigratableVM+GuestMemfd.swift.
    public let privateRAM: PrivateMemoryVM?
    /// Ranges of RAM (page offsets into RAM) whose attributes are private.
    public internal(set) var privateRanges = RangeMap<Bool>()

    /// Creates the VM, its memory (RAM with `backing`) and its memslots; no vCPU yet.
    /// `ram`: guest RAM prepared in advance (it must be `layout.ramSize` bytes). `userfaultBitmap`:
    /// a `.setMeansMissing` bitmap of `layout.ramPages` pages, to create the RAM memslot with
    /// KVM_MEM_USERFAULT (see ``userfaultBitmap``).
    /// `guestMemfdRAM`: a KVM_X86_SW_PROTECTED_VM whose RAM memslot is a KVM_MEM_GUEST_MEMFD
    /// slot (RAM starts shared; `backing` is its shared view). Its RAM slot never logs dirty
    /// pages (the kernel refuses that on a guest_memfd slot).
    public init(layout: MachineLayout, backing: MemoryBacking, dirtyLogging: Bool = false, ram prepared: GuestMemoryRegion? = nil,
                userfaultBitmap: PageBitmap? = nil, guestMemfdRAM: Bool = false) throws {
        precondition(userfaultBitmap.map { $0.count == layout.ramPages && $0.polarity == .setMeansMissing } ?? true,
                     "a userfault bitmap stores one missing bit per RAM page")
        self.layout = layout
        self.userfaultBitmap = userfaultBitmap
        if guestMemfdRAM {
            // Memslot 1 is created here, with KVM_MEM_GUEST_MEMFD (and KVM_MEM_USERFAULT when
            // asked), and never changed (6.12 refuses any change to a guest_memfd memslot but
            // its deletion; toggling KVM_MEM_USERFAULT there is the series' hazard).
            let privateRAM = try PrivateMemoryVM(kvm: KVM(), gpa: GuestPhysicalAddress(layout.ramBase), size: layout.ramSize,
                                                 slot: 1, sharedBacking: backing,
                                                 userfaultBitmap: userfaultBitmap.map { UnsafeRawPointer($0.words) })
            vm = privateRAM.vm
            ram = privateRAM.shared
            self.privateRAM = privateRAM
        } else {
            vm = try KVM().createVM()
            ram = try prepared ?? GuestMemoryRegion(backing: backing, size: layout.ramSize, vm: vm, label: "guest-ram")
            privateRAM = nil
        }
        low = try GuestMemoryRegion(backing: .anonymous, size: layout.lowSize, label: "guest-low")
        counters = GuestCounters(vcpus: layout.vcpus)
        threadIDs = .allocate(capacity: layout.vcpus)
        threadIDs.initialize(repeating: 0, count: layout.vcpus)
        try vm.setMemoryRegion(slot: 0, flags: dirtyLogging ? .logDirtyPages : [], guestPhysicalAddress: GuestPhysicalAddress(0),
                               memory: low)
        if !guestMemfdRAM { try setRAMSlot(dirtyLogging: dirtyLogging) }
        for id in 0..<layout.vcpus { vcpus.append(try vm.createVcpu(id: id)) }
    }

    deinit { threadIDs.deallocate() }

    /// (Re)declares the RAM memslot, turning dirty logging on or off (KVM_MEM_USERFAULT and its
    /// bitmap stay as they were at creation).
    public func setRAMSlot(dirtyLogging: Bool) throws {
        var flags: MemslotFlags = dirtyLogging ? .logDirtyPages : []
        if privateRAM != nil { flags.insert(.guestMemfd) }  // a change the kernel refuses: kept honest, not hidden
        if userfaultBitmap != nil { flags.insert(.userfault) }
        try vm.setMemoryRegion(slot: 1, flags: flags,
                               guestPhysicalAddress: GuestPhysicalAddress(layout.ramBase), memory: ram,
                               guestMemfd: privateRAM?.guestMemfd ?? ram.guestMemfd,
                               userfaultBitmap: userfaultBitmap.map { UnsafeRawPointer($0.words) })
    }

    /// Host pointer of a page index of the machine layout.
    public func pagePointer(_ page: Int) -> UnsafeMutableRawPointer {
        page < layout.lowPages ? low.base + page * 4096 : ram.base + (page - layout.lowPages) * 4096
    }

    // MARK: vCPU state

    /// regs + sregs, as raw ABI bytes (the same kernel ABI on both ends).
    public func vcpuStateBlob(_ id: Int) throws -> [UInt8] { try vcpus[id].stateBlob() }

    public func loadVcpuState(_ id: Int, blob: [UInt8]) throws {
        guard id >= 0, id < vcpus.count else { throw MachineLayout.Invalid(description: "vCPU state for unknown vCPU \(id)") }
        guard blob.count == Vcpu.stateBlobSize else {
            throw MachineLayout.Invalid(description: "vCPU \(id) state is \(blob.count) bytes, expected \(Vcpu.stateBlobSize)")
        }
        try vcpus[id].loadStateBlob(blob)
    }

    /// Boots the guest program: code (and in long mode the GDT and page tables) into low
    /// memory, the layout's CPU mode, registers. The workload must be assembled for that mode.
    public func boot(workload: RunningWorkload) throws {
        guard workload.mode == layout.mode else {
            throw MachineLayout.Invalid(description: "a \(workload.mode)-mode workload cannot boot in a \(layout.mode)-mode machine")
        }
        let code = try workload.program()
        code.withUnsafeBytes { (low.base + Int(GuestWorkload.codeAddress)).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        if let tables = try longModeTables() {
            tables.write(into: UnsafeMutableRawBufferPointer(start: low.base, count: Int(layout.lowSize)))
        }
        for (id, vcpu) in vcpus.enumerated() {
            try enterGuestMode(vcpu)
            let r = workload.startRegisters(vcpu: id, chunkBase: layout.chunkBase(vcpu: id))
            var regs = VcpuRegisters()
            regs.rip = GuestWorkload.codeAddress
            regs.rflags = 2
            (regs.rax, regs.rbx, regs.rcx, regs.rdx) = (r.rax, r.rbx, r.rcx, r.rdx)
            (regs.rsi, regs.rdi, regs.rsp, regs.rbp) = (r.rsi, r.rdi, r.rsp, r.rbp)
            try vcpu.setRegisters(regs)
        }
    }

    /// The identity map of everything below RAM's end, for a long-mode layout; nil otherwise.
    func longModeTables() throws -> LongModePageTables? {
        guard layout.mode == .long64 else { return nil }
        return try LongModePageTables(mapping: layout.ramBase + layout.ramSize, lowSize: layout.lowSize)
    }

    /// Puts `vcpu` in the layout's CPU mode (long mode: its tables must be in low memory).
    func enterGuestMode(_ vcpu: Vcpu) throws {
        if let tables = try longModeTables() { try vcpu.enterLongMode(tables) } else { try vcpu.enterFlatProtectedMode() }
    }

    // MARK: running

    /// Starts every vCPU on its own thread.
    public func start() throws {
        state.store(RunState.running.rawValue, ordering: .sequentiallyConsistent)
        let avoided = startScheduling.avoidedCPU
        for id in vcpus.indices {
            threads.append(try OSThread(name: "vcpu \(id)", avoidingCPU: avoided) { [self] in vcpuLoop(id, startedAvoiding: avoided) })
        }
    }

    private func vcpuLoop(_ id: Int, startedAvoiding: Int32?) {
        let vcpu = vcpus[id]
        scheduling.withLock { value in
            threadIDs[id] = ThreadScheduling.currentThreadID()
            if value.niceness != 0 { OSThread.setCurrentNiceness(value.niceness) }
            // Started off that CPU already (OSThread, best effort); this catches a change made
            // since, or a start where the placement was refused.
            if value.avoidedCPU != startedAvoiding || (value.avoidedCPU != nil && ThreadScheduling.currentCPU() == value.avoidedCPU) {
                try? ThreadScheduling.avoidCPU(value.avoidedCPU, ofThread: threadIDs[id])
            }
        }
        vcpu.bindToCurrentThread()
        defer { vcpu.unbindThread() }
        let ramBase = layout.ramBase, ramSize = layout.ramSize
        do {
            while true {
                let exit = try vcpu.runOnce()
                switch exit {
                case .io(let port, _, _, true) where port == UInt16(RunningWorkload.progressPort):
                    counters.recordPass(id)
                case .io(let port, _, _, true) where port == UInt16(RunningWorkload.mismatchPort):
                    let value = vcpu.ioData.load(as: UInt32.self)
                    let address = (try? vcpu.registers().rdx) ?? 0
                    counters.recordMismatch("vcpu \(id): read 0x\(String(value, radix: 16)) at GPA 0x\(String(address, radix: 16))")
                case .interrupted:
                    vcpu.clearKick()
                    if !parkIfAsked() { return }
                case .hlt:
                    return
                default:
                    if let written = hostCompletedWrites, case .mmio(let address, let length, true, _) = exit,
                       address.rawValue >= ramBase, address.rawValue - ramBase < ramSize {
                        let first = Int((address.rawValue - ramBase) / 4096)
                        let last = Int(min(address.rawValue - ramBase + UInt64(max(length, 1)) - 1, ramSize - 1) / 4096)
                        for p in first...last { written.insert(layout.lowPages + p) }  // before the store
                    }
                    guard let handler = faultHandler,
                          try completeRAMAccess(exit, vcpu: vcpu, ramBase: ramBase, ram: ram.base, ramSize: ramSize,
                                                resolve: { offset in try waitingForPage { try handler.resolveOnVcpu(id, ramOffset: offset) } })
                    else { throw DemandPagingError.unexpectedExit(vcpu: id, exit: exit) }
                }
            }
        } catch {
            parking.withLock { if failure == nil { failure = DemandPagingError.onVcpu(id, error) } }
        }
    }

    /// Runs `body` - a vCPU thread waiting for a page - at the fault path's priority, then
    /// puts the thread back as the VM's vCPUs run now (read under the same lock as
    /// ``setVcpuScheduling(_:)``, so a change made meanwhile is kept). During post-copy the
    /// vCPUs run at +19 so that the page stream gets the CPUs, but a vCPU woken at +19 would
    /// wait behind the stream's threads for several scheduler slices: fault latency. So the
    /// thread is SCHED_FIFO while it sends its request and waits (it runs no guest code then);
    /// unprivileged it asks for nice -10 instead, and without that nothing changes.
    private func waitingForPage<T>(_ body: () throws -> T) rethrows -> T {
        guard scheduling.withLock({ $0.niceness }) > OSThread.Niceness.vcpuWaitingForPage else { return try body() }
        let tid = ThreadScheduling.currentThreadID()
        if (try? ThreadScheduling.setRealtimeFIFO(true, ofThread: tid)) != nil {
            defer { try? ThreadScheduling.setRealtimeFIFO(false, ofThread: tid) }  // its niceness was kept
            return try body()
        }
        try? ThreadScheduling.setCurrentNiceness(OSThread.Niceness.vcpuWaitingForPage)
        defer { scheduling.withLock { value in try? ThreadScheduling.setCurrentNiceness(value.niceness) } }
        return try body()
    }

    /// Called on a vCPU thread after a kick: parks while paused. False = stop.
    private func parkIfAsked() -> Bool {
        while true {
            switch RunState(rawValue: state.load(ordering: .sequentiallyConsistent))! {
            case .running: return true
            case .stopping: return false
            case .pausing:
                parking.withLock { parked += 1 }
                parking.broadcast()
                parking.wait { state.load(ordering: .sequentiallyConsistent) != RunState.pausing.rawValue }
                parking.withLock { parked -= 1 }
            }
        }
    }

    /// Stops every vCPU at an instruction boundary and waits until all are parked.
    ///
    /// Kicked vCPU threads run SCHED_FIFO until they are parked (best effort, where
    /// privileged): on a busy machine a kicked thread otherwise waits its turn for a CPU
    /// before it can leave KVM_RUN and park, and each of those waits counts as downtime.
    /// The kick comes first: with its signal pending (and immediate_exit set) KVM_RUN
    /// returns at once, so a real-time vCPU thread never runs guest code (boosted before
    /// the kick, it would, and starve the thread kicking it for the kernel's 1 s real-time
    /// throttling period).
    public func pause() {
        state.store(RunState.pausing.rawValue, ordering: .sequentiallyConsistent)
        for v in vcpus { v.kick() }
        setVcpuRealtime(true)
        defer { setVcpuRealtime(false) }
        while !parking.withLock({ allParked() }) {
            parking.wait(timeoutNanoseconds: 1_000_000) { allParked() }
            if parking.withLock({ allParked() }) { break }
            for v in vcpus { v.kick() }
        }
    }

    private func setVcpuRealtime(_ realtime: Bool) {
        for i in 0..<layout.vcpus where threadIDs[i] != 0 {
            try? ThreadScheduling.setRealtimeFIFO(realtime, ofThread: threadIDs[i])
        }
    }

    /// Under `parking`'s lock: every running vCPU thread is parked (none run after a failure).
    private func allParked() -> Bool { parked >= (failure == nil ? vcpus.count : 0) }

    public func resume() { setStateAndWake(.running) }

    /// Under `parking`'s lock, so a vCPU thread about to wait sees the change.
    private func setStateAndWake(_ new: RunState) {
        parking.withLock { state.store(new.rawValue, ordering: .sequentiallyConsistent) }
        parking.broadcast()
    }

    /// Stops and joins every vCPU thread. Returns the first vCPU error, if any.
    @discardableResult
    public func stop() -> String? {
        setStateAndWake(.stopping)
        for v in vcpus { v.kick() }
        for t in threads { t.join() }
        threads = []
        return error
    }

    /// Sets how every vCPU thread is scheduled (niceness 0 normal, higher yields the CPU to
    /// other threads - during post-copy the page stream is what the guest waits for; a CPU
    /// to keep off). Refused (unprivileged, negative values, a cpuset) quietly.
    public func setVcpuScheduling(_ value: VcpuScheduling) {
        scheduling.withLock { current in
            let placementChanged = current.avoidedCPU != value.avoidedCPU
            current = value
            for i in 0..<layout.vcpus where threadIDs[i] != 0 {
                try? ThreadScheduling.setNiceness(value.niceness, ofThread: threadIDs[i])
                if placementChanged { try? ThreadScheduling.avoidCPU(value.avoidedCPU, ofThread: threadIDs[i]) }
            }
        }
    }

    public var error: String? { parking.withLock { failure } }
}
