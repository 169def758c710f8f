import FaultlineCore
import FaultlineLinux

extension MigratableVM: SourceMachine, DestinationMachine {
    public var vcpuError: String? { error }

    public func startDirtyLog() throws {
        if isGuestMemfdVM {
            // KVM refuses to log a guest_memfd memslot: write-protect its shared view instead.
            writeProtectLog = try WriteProtectDirtyLog(base: ram.hostAddress, pages: layout.ramPages)
            return
        }
        try setRAMSlot(dirtyLogging: true)
        let scratch = PageBitmap(count: layout.totalPages)
        try collectDirty(into: scratch)  // tracking starts from here
    }

    public func collectDirty(into dirty: PageBitmap) throws {
        if isGuestMemfdVM {
            // A guest_memfd RAM slot cannot log dirty pages (KVM refuses the flag on it).
            if let writeProtectLog { return try writeProtectLog.collect(into: dirty, firstPage: layout.lowPages) }
            guard let log = guestWriteLog else {
                throw MachineLayout.Invalid(description: "no dirty log on a guest_memfd memslot (the kernel refuses "
                                            + "KVM_MEM_LOG_DIRTY_PAGES there) and no other write tracking is set up")
            }
            log.forEachSetPage { dirty.insert($0) }
            return
        }
        let log = DirtyLogBuffer(pages: layout.ramPages)
        try vm.getDirtyLog(slot: 1, into: log)
        dirty.merge(kernelBitmap: log.bits, pages: layout.ramPages, firstPage: layout.lowPages)
    }

    public func stopDirtyLog() throws {
        if isGuestMemfdVM {
            writeProtectLog?.stop()
            writeProtectLog = nil
            return
        }
        try setRAMSlot(dirtyLogging: false)
    }

    public func residency(into bytes: UnsafeMutablePointer<UInt8>) -> Bool {
        (try? ram.residency(into: bytes)) != nil
    }

    public func startGuest(faultHandler: RAMFaultHandler?, scheduling: VcpuScheduling) throws {
        self.faultHandler = faultHandler
        startScheduling = scheduling
        try start()
    }

    public func stopGuest() -> String? { stop() }
    public func pauseGuest() { pause() }
    public func resumeGuest() { resume() }

    /// Needs the VM created with `dirtyLogging: true` (both slots).
    public func collectGuestWrites(into pages: PageBitmap) throws {
        let lowLog = DirtyLogBuffer(pages: layout.lowPages)
        try vm.getDirtyLog(slot: 0, into: lowLog)
        pages.merge(kernelBitmap: lowLog.bits, pages: layout.lowPages, firstPage: 0)
        try collectDirty(into: pages)
        hostCompletedWrites?.forEachSetPage { pages.insert($0) }
    }

    public func vcpu(forThread tid: UInt32) -> Int {
        for i in 0..<layout.vcpus where threadIDs[i] == Int32(bitPattern: tid) { return i }
        return -1
    }
}
