import CFaultlineShim
import Atomics
import FaultlineCore
#if canImport(Glibc)
import Glibc
#endif

/// Why KVM_RUN returned, decoded from kvm_run. Payloads are plain values copied out of
/// the shared page, so an exit never outlives the data it describes and decoding never
/// allocates.
public enum VcpuExit: Equatable, Sendable {
    /// Port I/O. For `out`, the bytes are at `Vcpu.ioData` (size * count bytes).
    case io(port: UInt16, size: UInt8, count: UInt32, isOut: Bool)
    /// An access to guest physical memory KVM could not satisfy from a memslot.
    /// For writes, `data` holds the little-endian bytes written; for reads, answer with
    /// `Vcpu.completeMMIORead`.
    case mmio(address: GuestPhysicalAddress, length: UInt32, isWrite: Bool, data: UInt64)
    case hlt
    case shutdown
    case failEntry(reason: UInt64, cpu: UInt32)
    case internalError(suberror: UInt32)
    case systemEvent(type: UInt32)
    /// KVM_EXIT_MEMORY_FAULT (after EFAULT/EHWPOISON from KVM_RUN).
    case memoryFault(address: GuestPhysicalAddress, size: UInt64, flags: UInt64)
    /// KVM_EXIT_HYPERCALL: a hypercall KVM hands to userspace (KVM_CAP_EXIT_HYPERCALL), e.g.
    /// KVM_HC_MAP_GPA_RANGE with args gpa, pages, attributes. Answer with
    /// `Vcpu.completeHypercall(returning:)` before the next KVM_RUN.
    case hypercall(number: UInt64, arg0: UInt64, arg1: UInt64, arg2: UInt64, flags: UInt64)
    /// KVM_RUN returned EINTR: a signal (the kick) or immediate_exit.
    case interrupted
    case unknown(reason: UInt32)

    public static let memoryFaultFlagPrivate: UInt64 = 1 << 3
    /// Proposed by KVM Userfault; never merged upstream.
    public static let memoryFaultFlagUserfault: UInt64 = 1 << 4
}

/// Exit reason numbers (kvm_run.exit_reason).
public enum KVMExitReason {
    public static let io: UInt32 = 2
    public static let hypercall: UInt32 = 3
    public static let hlt: UInt32 = 5
    public static let mmio: UInt32 = 6
    public static let shutdown: UInt32 = 8
    public static let failEntry: UInt32 = 9
    public static let internalError: UInt32 = 17
    public static let systemEvent: UInt32 = 24
    public static let memoryFault: UInt32 = 39
}

/// A vCPU: its fd and the mmapped kvm_run page. One thread runs it (KVM_RUN blocks);
/// `kick()` may be called from any thread to make that KVM_RUN return `.interrupted`.
public final class Vcpu: @unchecked Sendable {
    public let id: Int
    public let fd: FileDescriptor
    @usableFromInline let run: UnsafeMutablePointer<fl_kvm_run>
    let runSize: Int
    /// The thread running KVM_RUN (the kick's target), if bound.
    private let runner = Locked<pthread_t?>(nil)
    /// Keeps the VM, and with it the memory behind its memslots, alive while this vCPU exists.
    let machine: VirtualMachine

    init(id: Int, fd: FileDescriptor, run: UnsafeMutableRawPointer, runSize: Int, machine: VirtualMachine) {
        self.id = id
        self.fd = fd
        self.run = run.assumingMemoryBound(to: fl_kvm_run.self)
        self.runSize = runSize
        self.machine = machine
    }

    deinit { munmap(UnsafeMutableRawPointer(run), runSize) }

    /// One KVM_RUN. EINTR is `.interrupted`, not an error; EFAULT/EHWPOISON carrying a
    /// memory-fault exit is `.memoryFault`; anything else throws naming the vCPU.
    @inlinable
    public func runOnce() throws(SystemError) -> VcpuExit {
        let rc = fd.ioctl(FL_KVM_RUN, value: 0)
        if rc < 0 {
            let code = fl_errno()
            if code == EINTR { return .interrupted }
            if (code == EFAULT || code == EHWPOISON) && run.pointee.exit_reason == KVMExitReason.memoryFault {
                let f = run.pointee.u.memory_fault
                return .memoryFault(address: GuestPhysicalAddress(f.gpa), size: f.size, flags: f.flags)
            }
            throw SystemError("KVM_RUN vcpu \(id)", errno: code)
        }
        return decodeExit()
    }

    @inlinable
    func decodeExit() -> VcpuExit {
        let reason = run.pointee.exit_reason
        switch reason {
        case KVMExitReason.mmio:
            let m = run.pointee.u.mmio
            let data = withUnsafeBytes(of: m.data) { $0.loadUnaligned(as: UInt64.self) }
            return .mmio(address: GuestPhysicalAddress(m.phys_addr), length: m.len, isWrite: m.is_write != 0,
                         data: m.is_write != 0 ? data : 0)
        case KVMExitReason.io:
            let io = run.pointee.u.io
            return .io(port: io.port, size: io.size, count: io.count, isOut: io.direction == 1)
        case KVMExitReason.hlt: return .hlt
        case KVMExitReason.hypercall:
            let h = run.pointee.u.hypercall
            return .hypercall(number: h.nr, arg0: h.args.0, arg1: h.args.1, arg2: h.args.2, flags: h.flags)
        case KVMExitReason.shutdown: return .shutdown
        case KVMExitReason.failEntry:
            let f = run.pointee.u.fail_entry
            return .failEntry(reason: f.hardware_entry_failure_reason, cpu: f.cpu)
        case KVMExitReason.internalError: return .internalError(suberror: run.pointee.u.internal.suberror)
        case KVMExitReason.systemEvent: return .systemEvent(type: run.pointee.u.system_event.type)
        case KVMExitReason.memoryFault:
            let f = run.pointee.u.memory_fault
            return .memoryFault(address: GuestPhysicalAddress(f.gpa), size: f.size, flags: f.flags)
        default: return .unknown(reason: reason)
        }
    }

    /// Supplies the value of an MMIO read before the next KVM_RUN (little-endian, `length` bytes).
    @inlinable
    public func completeMMIORead(_ value: UInt64) {
        withUnsafeMutableBytes(of: &run.pointee.u.mmio.data) { $0.storeBytes(of: value.littleEndian, as: UInt64.self) }
    }

    /// The hypercall's result (kvm_run.hypercall.ret): KVM writes it to the guest's rax
    /// (truncated to 32 bits outside 64-bit mode) on the next KVM_RUN and skips the
    /// hypercall instruction. 0 for success, else a negated KVM error (-KVM_EINVAL...).
    @inlinable
    public func completeHypercall(returning value: UInt64) {
        run.pointee.u.hypercall.ret = value
    }

    /// Copies `length` bytes from `source` into kvm_run's MMIO data (an MMIO read answered from memory).
    @inlinable
    public func completeMMIORead(from source: UnsafeRawPointer, length: Int) {
        withUnsafeMutableBytes(of: &run.pointee.u.mmio.data) { $0.baseAddress!.copyMemory(from: source, byteCount: min(length, 8)) }
    }

    /// The data of an `.io` exit (valid until the next KVM_RUN).
    public var ioData: UnsafeMutableRawBufferPointer {
        let io = run.pointee.u.io
        let base = UnsafeMutableRawPointer(run) + Int(io.data_offset)
        return UnsafeMutableRawBufferPointer(start: base, count: Int(io.size) * Int(io.count))
    }

    /// 32-bit protected mode, flat 4 GiB code and data segments, paging off - the mode
    /// of Faultline's 32-bit guest programs (long mode: Vcpu+LongMode.swift).
    public func enterFlatProtectedMode() throws(SystemError) {
        var s = try specialRegisters()
        s.cs = Self.flatSegment(selector: 8, type: 11, db: 1)
        let data = Self.flatSegment(selector: 16, type: 3, db: 1)
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.cr0 |= 1
        try setSpecialRegisters(s)
    }

    /// A flat segment: base 0, 4 GiB limit (page granular), present, DPL 0, code or data
    /// (`type` 11: execute/read, 3: read/write, both accessed); `l` = 1 for 64-bit code.
    static func flatSegment(selector: UInt16, type: UInt8, db: UInt8, l: UInt8 = 0) -> fl_kvm_segment {
        var segment = fl_kvm_segment()
        segment.base = 0
        segment.limit = 0xffff_ffff
        segment.selector = selector
        segment.type = type
        segment.present = 1
        segment.db = db
        segment.l = l
        segment.s = 1
        segment.g = 1
        return segment
    }

    // MARK: pre-fault: PreFault.swift

    // MARK: kicking

    /// Records the calling thread as this vCPU's runner (call before the first KVM_RUN).
    public func bindToCurrentThread() {
        _ = try? KickSignal.install()
        try? KickSignal.unblockInCurrentThread()
        let current = KickSignal.currentThread()
        runner.withLock { $0 = current }
    }

    public func unbindThread() {
        runner.withLock { $0 = nil }
    }

    /// Makes the current or next KVM_RUN return `.interrupted`: sets immediate_exit, then
    /// signals the runner so a KVM_RUN already blocked in the guest returns EINTR.
    public func kick() {
        withUnsafeMutablePointer(to: &run.pointee.immediate_exit) { p in
            UnsafeMutableRawPointer(p).storeBytes(of: 1, as: UInt8.self)
        }
        atomicFence()
        runner.withLock { thread in
            if let thread { try? KickSignal.send(to: thread) }
        }
    }

    /// Clears immediate_exit after handling an `.interrupted` exit.
    public func clearKick() {
        run.pointee.immediate_exit = 0
        atomicFence()
    }
}

@inline(__always) func atomicFence() { atomicMemoryFence(ordering: .sequentiallyConsistent) }
