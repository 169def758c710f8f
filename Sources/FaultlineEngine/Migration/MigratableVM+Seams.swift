import FaultlineCore
import FaultlineLinux
#if canImport(Glibc)
import Glibc
#endif

extension MigratableVM: SourceMachine, DestinationMachine {
    public var vcpuError: String? { error }

    public func startDirtyLog() throws {
        try setRAMSlot(dirtyLogging: true)
        let scratch = PageBitmap(count: layout.totalPages)
        try collectDirty(into: scratch)  // tracking starts from here
    }

    public func collectDirty(into dirty: PageBitmap) throws {
        let bytes = (layout.ramPages + 63) / 64 * 8
        let bits = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { bits.deallocate() }
        memset(bits, 0, bytes)
        try vm.getDirtyLog(slot: 1, into: bits)
        dirty.merge(kernelBitmap: bits, pages: layout.ramPages, firstPage: layout.lowPages)
    }

    public func stopDirtyLog() throws { try setRAMSlot(dirtyLogging: false) }

    public func residency(into bytes: UnsafeMutablePointer<UInt8>) -> Bool {
        mincore(ram.base, Int(layout.ramSize), bytes) == 0
    }

    public func startGuest(faultHandler: RAMFaultHandler?, niceness: Int32) throws {
        self.faultHandler = faultHandler
        startNiceness = niceness
        try start()
    }

    public func stopGuest() -> String? { stop() }

    /// Needs the VM created with `dirtyLogging: true` (both slots).
    public func collectGuestWrites(into pages: PageBitmap) throws {
        let lowBits = UnsafeMutableRawPointer.allocate(byteCount: (layout.lowPages + 63) / 64 * 8, alignment: 8)
        defer { lowBits.deallocate() }
        memset(lowBits, 0, (layout.lowPages + 63) / 64 * 8)
        try vm.getDirtyLog(slot: 0, into: lowBits)
        pages.merge(kernelBitmap: lowBits, pages: layout.lowPages, firstPage: 0)
        try collectDirty(into: pages)
        hostCompletedWrites?.forEachSetPage { pages.insert($0) }
    }

    public func vcpu(forThread tid: UInt32) -> Int {
        for i in 0..<layout.vcpus where threadIDs[i] == Int32(bitPattern: tid) { return i }
        return -1
    }
}
