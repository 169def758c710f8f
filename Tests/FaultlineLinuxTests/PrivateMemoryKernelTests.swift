import FaultlineCore
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// Private memory on a kernel that has it (the rig does; run there: rig/tests PrivateMemory).
enum PrivateRig {
    /// Why this kernel cannot run private memory (PrivateMemoryVM's own answer), or nil.
    static let obstacle: String? = {
        do { return PrivateMemoryVM.obstacle(try KVM()) } catch { return "\(error)" }
    }()
    static func range(_ gpa: UInt64, _ size: UInt64) -> GuestMemoryRange { GuestMemoryRange(start: GuestPhysicalAddress(gpa), size: size)! }
}

@Suite("Private memory on a kernel without it")
struct PrivateMemoryRefusalTests {
    @Test(.gate(.privateMemoryRefusedWithoutIt))
    func refusesNamingTheMissingFeatures() throws {
        do {
            _ = try PrivateMemoryVM(kvm: KVM(), gpa: GuestPhysicalAddress(0x10_0000), size: 16 * 4096)
            Issue.record("a private-memory VM was created on a kernel whose probe says it cannot")
        } catch {
            let message = "\(error)"
            #expect(message.hasPrefix("private memory needs "))
            #expect(message.contains("KVM_X86_SW_PROTECTED_VM") || message.contains("KVM_CAP_MEMORY_ATTRIBUTES"))
            #expect(message == PrivateRig.obstacle)
        }
    }
}

@Suite("PrivateMemory rig: a SW-protected VM with guest_memfd", .gate(.privateMemoryVMOnTheRig))
struct PrivateMemoryRigKernelTests {
    @Test func attributesAndDiscardsOnBothBackings() throws {
        let pvm = try PrivateMemoryVM(kvm: KVM(), gpa: GuestPhysicalAddress(0x10_0000), size: 16 * 4096,
                                      sharedBacking: .memfd, initiallyPrivate: true)
        try pvm.setAttributes(PrivateRig.range(0x10_1000, 2 * 4096), private: false)
        try pvm.setAttributes(PrivateRig.range(0x10_0000, 16 * 4096), private: true)
        try pvm.discardPrivate(offset: 4096, length: 2 * 4096)
        // The shared backing is ordinary memory: written, discarded, read back as zeros.
        pvm.shared.base.storeBytes(of: UInt32(0xABCD), toByteOffset: 4096, as: UInt32.self)
        try pvm.discardShared(offset: 4096, length: 4096)
        #expect(pvm.shared.base.load(fromByteOffset: 4096, as: UInt32.self) == 0)
        try pvm.enableMapGPARangeExits()
    }

    @Test func kernelRefusalsNameTheOperation() throws {
        let pvm = try PrivateMemoryVM(kvm: KVM(), gpa: GuestPhysicalAddress(0x10_0000), size: 16 * 4096)
        #expect(throws: SystemError.self) { try pvm.setAttributes(PrivateRig.range(0x10_0800, 4096), private: true) }
        do {
            try pvm.setAttributes(PrivateRig.range(0x10_0800, 4096), private: true)
        } catch {
            #expect("\(error)".contains("KVM_SET_MEMORY_ATTRIBUTES") && "\(error)".contains("EINVAL"))
        }
        do {
            try pvm.discardPrivate(offset: 100, length: 4096)
            Issue.record("an unaligned hole punch on guest_memfd was accepted")
        } catch {
            #expect("\(error)".contains("fallocate PUNCH_HOLE guest_memfd") && "\(error)".contains("EINVAL"))
        }
        #expect(throws: SystemError.self) { try pvm.discardShared(offset: 15 * 4096, length: 2 * 4096) }
    }
}
