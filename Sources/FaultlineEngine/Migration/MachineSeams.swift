import FaultlineCore
import FaultlineLinux

/// The guest as the migration source sees it: memory, pause and resume, vCPU state and a dirty
/// log. ``MigratableVM`` is the real one; `MemoryMachine` is a deterministic fake for tests.
public protocol SourceMachine: AnyObject, Sendable {
    var layout: MachineLayout { get }
    var counters: GuestCounters { get }
    /// A vCPU failure, if any.
    var vcpuError: String? { get }
    func pagePointer(_ page: Int) -> UnsafeMutableRawPointer
    /// Stops every vCPU at an instruction boundary and waits until all are parked.
    func pause()
    func resume()
    func vcpuStateBlob(_ id: Int) throws -> [UInt8]
    /// Starts tracking guest writes to RAM (the first `collectDirty` reports writes after this).
    func startDirtyLog() throws
    /// Adds the RAM pages written since the last call to `dirty` (layout page indices).
    func collectDirty(into dirty: PageBitmap) throws
    func stopDirtyLog() throws
    /// One byte per RAM page, bit 0 set when resident (mincore); false when unknown. A page
    /// that is not resident was never touched and is zero.
    func residency(into bytes: UnsafeMutablePointer<UInt8>) -> Bool
    /// Throws if the bytes of `pages` must not be sent (a snapshot chunk that fails its
    /// checksum). Called before pages are read for the wire; a live guest has nothing to check.
    func checkPages(_ pages: Range<Int>) throws
}

extension SourceMachine {
    public func checkPages(_ pages: Range<Int>) throws {}
}

/// The guest as the destination sees it.
public protocol DestinationMachine: AnyObject, Sendable {
    var layout: MachineLayout { get }
    var counters: GuestCounters { get }
    var vcpuError: String? { get }
    func loadVcpuState(_ id: Int, blob: [UInt8]) throws
    /// Starts the vCPUs; `handler` resolves vcpu-exit faults on the vCPU's own thread. The
    /// vCPU threads run at `scheduling` (post-copy's, or the normal one).
    func startGuest(faultHandler: RAMFaultHandler?, scheduling: VcpuScheduling) throws
    /// Changes how every vCPU thread is scheduled (a thread still starting gets it too).
    func setVcpuScheduling(_ scheduling: VcpuScheduling)
    /// Parks every vCPU (the guest keeps its state) until ``resumeGuest()``: the plain TCP
    /// copy that serves as the yardstick is timed with the guest quiet.
    func pauseGuest()
    func resumeGuest()
    /// Stops and joins every vCPU thread; the first vCPU error, if any.
    func stopGuest() -> String?
    /// Pages the guest itself wrote since the last call (KVM's dirty log on the destination,
    /// plus writes the vcpu-exit path completed on the guest's behalf).
    func collectGuestWrites(into pages: PageBitmap) throws
    /// The vCPU a thread id belongs to (userfaultfd reports thread ids), or -1.
    func vcpu(forThread tid: UInt32) -> Int
}

/// Builds the destination's guest and its page mapper for a layout (the seam tests replace).
public typealias DestinationMachineFactory = @Sendable (MachineLayout) throws -> (DestinationMachine, PageMapper)

/// How a guest's vCPU threads are scheduled: their niceness, and a CPU they keep off.
public struct VcpuScheduling: Sendable, Equatable {
    /// 0 normal; higher leaves more of the CPUs to other threads.
    public var niceness: Int32
    /// A CPU the vCPU threads do not run on (nil: any the process may use).
    public var avoidedCPU: Int32?

    public init(niceness: Int32 = 0, avoidedCPU: Int32? = nil) {
        self.niceness = niceness
        self.avoidedCPU = avoidedCPU
    }

    /// Every CPU, nice 0.
    public static let normal = VcpuScheduling()
}
