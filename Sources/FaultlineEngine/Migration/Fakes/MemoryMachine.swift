import FaultlineCore
import FaultlineLinux

/// A guest without a kernel, for deterministic tests of the migration logic: memory is a
/// plain buffer, "running" is whatever the test does between pre-copy rounds (`onCollect`),
/// and guest writes are recorded as a dirty log would. It plays either side.
public final class MemoryMachine: SourceMachine, DestinationMachine, @unchecked Sendable {
    public let layout: MachineLayout
    public let counters: GuestCounters
    public let memory: UnsafeMutableRawPointer
    public private(set) var paused = false
    public private(set) var pauses = 0
    public private(set) var resumes = 0
    public private(set) var guestStarted = false
    public private(set) var loadedStates: [Int: [UInt8]] = [:]
    public var vcpuError: String? { nil }
    /// Called at every dirty-log collection with its number (0 = after the first round): the
    /// "guest" writes pages here (with `write`), and they show up as dirty.
    public var onCollect: ((MemoryMachine, Int) -> Void)?
    /// Called with the page whenever the migration takes a page's address to read it (the
    /// source's sender, digest and fault server): the "guest" can hold a round there.
    public var onRead: ((Int) -> Void)?
    /// Destination: pages the "guest" rewrote after installation (excluded from the memory digest).
    public let guestWrites: PageBitmap
    /// Destination: RAM offsets a simulated vCPU touches right after the start (vcpu-exit faults).
    public var simulatedFaults: [UInt64] = []
    /// Called with each change of the vCPUs' scheduling.
    public var onScheduling: (@Sendable (VcpuScheduling) -> Void)?
    public private(set) var faultErrors: [String] = []
    private let dirty: PageBitmap
    private var logging = false
    private var collections = 0
    private var faultThread: OSThread?

    public init(layout: MachineLayout) {
        self.layout = layout
        counters = GuestCounters(vcpus: layout.vcpus)
        memory = .allocate(byteCount: layout.totalPages * 4096, alignment: 4096)
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: layout.totalPages * 4096)
        dirty = PageBitmap(count: layout.totalPages)
        guestWrites = PageBitmap(count: layout.totalPages)
    }

    deinit {
        faultThread?.join()
        memory.deallocate()
    }

    public func pagePointer(_ page: Int) -> UnsafeMutableRawPointer {
        onRead?(page)
        return memory + page * 4096
    }

    /// A guest store: fills the page with `byte` and marks it dirty.
    public func write(page: Int, byte: UInt8) {
        (memory + page * 4096).initializeMemory(as: UInt8.self, repeating: byte, count: 4096)
        if logging { dirty.insert(page) }
    }

    public func pause() { paused = true; pauses += 1 }
    public func resume() { paused = false; resumes += 1 }
    public func vcpuStateBlob(_ id: Int) throws -> [UInt8] { [UInt8](repeating: UInt8(truncatingIfNeeded: id + 1), count: 32) }
    public func startDirtyLog() throws { logging = true; dirty.forEachSetPage { dirty.remove($0) } }
    public func stopDirtyLog() throws { logging = false }
    public func residency(into bytes: UnsafeMutablePointer<UInt8>) -> Bool { false }

    public func collectDirty(into pages: PageBitmap) throws {
        onCollect?(self, collections)
        collections += 1
        dirty.forEachSetPage {
            pages.insert($0)
            dirty.remove($0)
        }
    }

    public func loadVcpuState(_ id: Int, blob: [UInt8]) throws {
        guard id >= 0, id < layout.vcpus else { throw MachineLayout.Invalid(description: "vCPU state for unknown vCPU \(id)") }
        loadedStates[id] = blob
    }

    public func startGuest(faultHandler: RAMFaultHandler?, scheduling: VcpuScheduling) throws {
        guestStarted = true
        guard let faultHandler, !simulatedFaults.isEmpty else { return }
        let offsets = simulatedFaults
        faultThread = try OSThread(name: "simulated vcpu") { [self] in
            for offset in offsets {
                do { try faultHandler.resolveOnVcpu(0, ramOffset: offset) } catch { faultErrors.append("\(error)") }
            }
        }
    }

    public func setVcpuScheduling(_ scheduling: VcpuScheduling) { onScheduling?(scheduling) }
    public func pauseGuest() {}
    public func resumeGuest() {}

    public func stopGuest() -> String? {
        faultThread?.join()
        faultThread = nil
        guestStarted = false
        return nil
    }

    public func collectGuestWrites(into pages: PageBitmap) throws { guestWrites.forEachSetPage { pages.insert($0) } }
    public func vcpu(forThread tid: UInt32) -> Int { -1 }
}
