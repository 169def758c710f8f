import Atomics
import FaultlineCore
import FaultlineLinux

/// What KVM_RUN made of a guest store to a RAM page that is missing in a userfaultfd range
/// registered with UFFD_FEATURE_SIGBUS (docs/design.md, "Fault mode on TDP hosts").
public enum VcpuFaultOutcome: Equatable, Sendable, CustomStringConvertible {
    /// KVM_EXIT_MMIO at the page (shadow paging): the vcpu-exit fault path works.
    case mmioExit(gpa: UInt64)
    /// KVM_EXIT_MEMORY_FAULT at the page (KVM Userfault-like): the vcpu-exit fault path works.
    case memoryFault(gpa: UInt64, flags: UInt64)
    /// KVM_RUN failed with EFAULT and no exit information (TDP without KVM Userfault):
    /// nothing says which page the vCPU wanted, so vcpu-exit cannot work.
    case bareEFAULT
    /// Any other answer (an exit at another address, HLT, an error).
    case other(String)
    /// The probe could not be set up, or KVM_RUN did not return in time.
    case failed(String)

    /// An exit naming the faulting page: what the vcpu-exit fault path needs.
    public var namesFaultingPage: Bool {
        switch self {
        case .mmioExit, .memoryFault: true
        default: false
        }
    }

    public var description: String {
        switch self {
        case .mmioExit(let gpa): "MMIO exit at 0x\(String(gpa, radix: 16))"
        case .memoryFault(let gpa, let flags): "memory-fault exit at 0x\(String(gpa, radix: 16)), flags 0x\(String(flags, radix: 16))"
        case .bareEFAULT: "bare EFAULT from KVM_RUN (no exit information)"
        case .other(let s): s
        case .failed(let s): "probe failed: \(s)"
        }
    }
}

/// A start-up probe of how guest page faults can reach Faultline on this kernel: a one-page
/// VM whose single vCPU stores to a userfaultfd-registered page that is not populated, plus
/// whether userfaultfd MISSING and MINOR registrations work. Run once per process
/// (`current`); bounded by a kick, so it cannot hang.
public struct VcpuFaultProbe: Equatable, Sendable {
    /// The plain memslot with uffd SIGBUS: what `vcpu-exit` relies on.
    public var sigbusFault: VcpuFaultOutcome
    /// The same store with the page marked in a KVM_MEM_USERFAULT bitmap; nil when the kernel
    /// refuses the memslot flag (no KVM Userfault).
    public var kvmUserfault: VcpuFaultOutcome?
    /// nil when a MISSING registration (with UFFD_FEATURE_THREAD_ID) works, else why not.
    public var uffdMissingObstacle: String?
    /// nil when a MINOR registration on shmem (UFFD_FEATURE_MINOR_SHMEM) works, else why not.
    public var uffdMinorObstacle: String?
    /// How long the probe took.
    public var milliseconds: Double

    public init(sigbusFault: VcpuFaultOutcome, kvmUserfault: VcpuFaultOutcome? = nil, uffdMissingObstacle: String? = nil,
                uffdMinorObstacle: String? = nil, milliseconds: Double = 0) {
        self.sigbusFault = sigbusFault
        self.kvmUserfault = kvmUserfault
        self.uffdMissingObstacle = uffdMissingObstacle
        self.uffdMinorObstacle = uffdMinorObstacle
        self.milliseconds = milliseconds
    }

    /// True when a store to a page marked in a KVM_MEM_USERFAULT memslot's bitmap came back as
    /// a KVM Userfault exit naming the page: vcpu-exit can run on KVM Userfault.
    public var hasKVMUserfault: Bool {
        if case .memoryFault(let gpa, let flags)? = kvmUserfault {
            return flags & VcpuExit.memoryFaultFlagUserfault != 0 && gpa & ~0xFFF == Self.ramGPA
        }
        return false
    }

    /// This process's probe, run on first use.
    public static let current = VcpuFaultProbe.run()

    /// Runs `current` on a thread of its own, for a caller with other start-up work to do
    /// meanwhile (a restore opens its snapshot): a later use of `current` waits only for what
    /// is left of it. Join the thread before relying on it having finished; nil if no thread
    /// could be started (then `current` runs on first use, as always).
    public static func startInBackground() -> OSThread? {
        try? OSThread(name: "fault probe") { _ = current }
    }

    /// Guest layout of the probe VM: the program's page and the missing RAM page.
    static let codeGPA: UInt64 = 0x1000
    static let ramGPA: UInt64 = 0x10_0000
    static let storedValue: UInt64 = 0x5A5A_5A5A

    /// Runs the probe now (`current` caches it). Each KVM_RUN is kicked after `timeoutMilliseconds`.
    public static func run(timeoutMilliseconds: Int = 1000) -> VcpuFaultProbe {
        let start = MonotonicClock.nanoseconds()
        let sigbus = trial(userfault: false, timeoutMilliseconds: timeoutMilliseconds) ?? .failed("no result")
        // Only worth a second VM when the first said nothing usable.
        let userfault = sigbus.namesFaultingPage ? nil : trial(userfault: true, timeoutMilliseconds: timeoutMilliseconds)
        return VcpuFaultProbe(sigbusFault: sigbus, kvmUserfault: userfault,
                              uffdMissingObstacle: registrationObstacle(minor: false),
                              uffdMinorObstacle: registrationObstacle(minor: true),
                              milliseconds: Double(MonotonicClock.nanoseconds() - start) / 1e6)
    }

    /// One VM, one vCPU, one store to the missing page. With `userfault`, the RAM slot has
    /// KVM_MEM_USERFAULT and the page's bit set; returns nil when the kernel refuses that flag.
    static func trial(userfault: Bool, timeoutMilliseconds: Int) -> VcpuFaultOutcome? {
        let bitmap = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
        bitmap.initialize(to: 1)  // bit 0: the slot's first (only) page
        defer { bitmap.deallocate() }
        do {
            let kvm = try KVM()
            let vm = try kvm.createVM()
            let code = try GuestMemoryRegion(backing: .anonymous, size: 4096, label: "probe-code")
            var asm = X86Assembler()
            asm.store(.eax, to: .esi)
            asm.hlt()
            let program = try asm.assemble()
            program.withUnsafeBytes { code.base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            try vm.setMemoryRegion(slot: 0, guestPhysicalAddress: GuestPhysicalAddress(codeGPA), memory: code)
            let ram = try GuestMemoryRegion(backing: .anonymous, size: 4096, label: "probe-ram")
            let uffd = try Userfaultfd(required: .sigbus, label: "probe uffd")
            try uffd.register(start: ram.hostAddress, length: 4096, mode: .missing)
            if let error = setRAMSlot(vm, ram: ram, userfaultBitmap: userfault ? UnsafeRawPointer(bitmap) : nil) {
                if userfault && error.code == .invalidArgument { return nil }  // no KVM_MEM_USERFAULT
                throw error
            }
            let vcpu = try vm.createVcpu(id: 0)
            try vcpu.enterFlatProtectedMode()
            var regs = VcpuRegisters()
            regs.rip = codeGPA
            regs.rflags = 2
            regs.rsi = ramGPA
            regs.rax = storedValue
            try vcpu.setRegisters(regs)
            let outcome = try boundedRun(vcpu, uffd: uffd, ram: ram, timeoutMilliseconds: timeoutMilliseconds)
            withExtendedLifetime((vm, code, ram, uffd)) {}
            return outcome
        } catch {
            return .failed("\(error)")
        }
    }

    /// Slot 1: the missing RAM page, with KVM_MEM_USERFAULT when a bitmap is given.
    static func setRAMSlot(_ vm: VirtualMachine, ram: GuestMemoryRegion, userfaultBitmap: UnsafeRawPointer?) -> SystemError? {
        do {
            try vm.setMemoryRegion(slot: 1, flags: userfaultBitmap == nil ? [] : .userfault,
                                   guestPhysicalAddress: GuestPhysicalAddress(ramGPA), memory: ram,
                                   userfaultBitmap: userfaultBitmap)
            return nil
        } catch {
            return error
        }
    }

    /// Runs the vCPU on its own thread; kicks it after the timeout, then unregisters the
    /// range (which wakes a thread blocked on it); gives up after a last grace period.
    static func boundedRun(_ vcpu: Vcpu, uffd: Userfaultfd, ram: GuestMemoryRegion,
                           timeoutMilliseconds: Int) throws -> VcpuFaultOutcome {
        let run = BoundedRun()
        let thread = try OSThread(name: "vcpu fault probe") {
            vcpu.bindToCurrentThread()
            let outcome = classify(vcpu, kicked: run.kicked)
            vcpu.unbindThread()
            run.finish(outcome)
        }
        if !run.wait(milliseconds: timeoutMilliseconds) {
            run.kicked.store(true, ordering: .sequentiallyConsistent)
            vcpu.kick()
            if !run.wait(milliseconds: 200) {
                try? uffd.unregister(start: ram.hostAddress, length: ram.size)
                vcpu.kick()
                guard run.wait(milliseconds: 200) else {
                    return .failed("KVM_RUN did not return within \(timeoutMilliseconds + 400) ms, even when kicked")
                }
            }
        }
        thread.join()
        return run.outcome ?? .failed("no result")
    }

    /// Classifies what KVM_RUN returned for the store. A stray EINTR re-enters.
    static func classify(_ vcpu: Vcpu, kicked: ManagedAtomic<Bool>) -> VcpuFaultOutcome {
        let expected = "0x\(String(ramGPA, radix: 16))"
        for _ in 0..<8 {
            let exit: VcpuExit
            do {
                exit = try vcpu.runOnce()
            } catch {
                return error.code == .badAddress ? .bareEFAULT : .other("\(error)")
            }
            switch exit {
            case .mmio(let address, _, _, _):
                return address.rawValue == ramGPA ? .mmioExit(gpa: address.rawValue)
                    : .other("MMIO exit at \(address), expected \(expected)")
            case .memoryFault(let address, _, let flags):
                return address.rawValue & ~0xFFF == ramGPA ? .memoryFault(gpa: address.rawValue, flags: flags)
                    : .other("memory-fault exit at \(address), expected \(expected)")
            case .hlt:
                return .other("the guest's store completed without an exit (HLT)")
            case .interrupted:
                if kicked.load(ordering: .sequentiallyConsistent) { return .failed("KVM_RUN did not return in time (kicked)") }
            default:
                return .other("unexpected exit \(exit)")
            }
        }
        return .other("KVM_RUN kept returning EINTR")
    }

    /// Why a userfaultfd MISSING (anonymous) or MINOR (shmem) registration of one page fails
    /// with the features the migration destination asks for, or nil when it works.
    static func registrationObstacle(minor: Bool) -> String? {
        do {
            let region = try GuestMemoryRegion(backing: minor ? .memfd : .anonymous, size: 4096, label: "probe-uffd")
            let uffd = try Userfaultfd(required: minor ? [.minorShmem, .threadID] : [.threadID], label: "probe uffd")
            try uffd.register(start: region.hostAddress, length: 4096, mode: minor ? .minor : .missing)
            withExtendedLifetime(region) {}
            return nil
        } catch {
            return "\(error)"
        }
    }
}

/// The result slot and completion signal of one bounded KVM_RUN.
private final class BoundedRun: @unchecked Sendable {
    let kicked = ManagedAtomic(false)
    private let condition = TimedCondition()
    /// Written once, under `condition`'s lock.
    private var result: VcpuFaultOutcome?

    var outcome: VcpuFaultOutcome? { condition.withLock { result } }

    func finish(_ outcome: VcpuFaultOutcome) {
        condition.withLock { result = outcome }
        condition.broadcast()
    }

    /// True when the run finished within `milliseconds`.
    func wait(milliseconds: Int) -> Bool {
        condition.wait(timeoutNanoseconds: UInt64(milliseconds) * 1_000_000) { result != nil }
    }
}
