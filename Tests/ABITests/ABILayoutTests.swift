import CFaultlineShim
import Testing

/// The ABI the shim defines must match the kernel's, byte for byte (kernel-abi.md): sizes,
/// field offsets, and request numbers recomputed here from the _IOC formula.

func ioc(_ dir: UInt, _ type: UInt, _ nr: UInt, _ size: Int) -> UInt {
    (dir << 30) | (UInt(size) << 16) | (type << 8) | nr
}
let none: UInt = 0, write: UInt = 1, read: UInt = 2

@Suite("ABI struct layouts")
struct StructLayoutTests {
    @Test func sizes() {
        #expect(MemoryLayout<fl_kvm_userspace_memory_region>.size == 32)
        #expect(MemoryLayout<fl_kvm_userspace_memory_region2>.size == 160)
        #expect(MemoryLayout<fl_kvm_create_guest_memfd>.size == 64)
        #expect(MemoryLayout<fl_kvm_memory_attributes>.size == 32)
        #expect(MemoryLayout<fl_kvm_pre_fault_memory>.size == 64)
        #expect(MemoryLayout<fl_kvm_dirty_log>.size == 16)
        #expect(MemoryLayout<fl_kvm_clear_dirty_log>.size == 24)
        #expect(MemoryLayout<fl_kvm_enable_cap>.size == 104)
        #expect(MemoryLayout<fl_kvm_regs>.size == 144)
        #expect(MemoryLayout<fl_kvm_segment>.size == 24)
        #expect(MemoryLayout<fl_kvm_dtable>.size == 16)
        #expect(MemoryLayout<fl_kvm_sregs>.size == 312)
        #expect(MemoryLayout<fl_kvm_run>.size == 2352)
        #expect(MemoryLayout<fl_uffdio_api>.size == 24)
        #expect(MemoryLayout<fl_uffdio_range>.size == 16)
        #expect(MemoryLayout<fl_uffdio_register>.size == 32)
        #expect(MemoryLayout<fl_uffdio_copy>.size == 40)
        #expect(MemoryLayout<fl_uffdio_zeropage>.size == 32)
        #expect(MemoryLayout<fl_uffdio_writeprotect>.size == 24)
        #expect(MemoryLayout<fl_uffdio_continue>.size == 32)
        #expect(MemoryLayout<fl_uffdio_poison>.size == 32)
        #expect(MemoryLayout<fl_uffdio_move>.size == 40)
        #expect(MemoryLayout<fl_uffd_msg>.size == 32)
    }

    @Test func memoryRegion2Offsets() {
        typealias T = fl_kvm_userspace_memory_region2
        #expect(MemoryLayout<T>.offset(of: \.slot) == 0)
        #expect(MemoryLayout<T>.offset(of: \.flags) == 4)
        #expect(MemoryLayout<T>.offset(of: \.guest_phys_addr) == 8)
        #expect(MemoryLayout<T>.offset(of: \.memory_size) == 16)
        #expect(MemoryLayout<T>.offset(of: \.userspace_addr) == 24)
        #expect(MemoryLayout<T>.offset(of: \.guest_memfd_offset) == 32)
        #expect(MemoryLayout<T>.offset(of: \.guest_memfd) == 40)
        #expect(MemoryLayout<T>.offset(of: \.pad1) == 44)
        #expect(MemoryLayout<T>.offset(of: \.pad2) == 48)
        typealias R1 = fl_kvm_userspace_memory_region
        #expect(MemoryLayout<R1>.offset(of: \.userspace_addr) == 24)
    }

    @Test func smallKVMStructOffsets() {
        #expect(MemoryLayout<fl_kvm_create_guest_memfd>.offset(of: \.flags) == 8)
        #expect(MemoryLayout<fl_kvm_create_guest_memfd>.offset(of: \.reserved) == 16)
        #expect(MemoryLayout<fl_kvm_memory_attributes>.offset(of: \.size) == 8)
        #expect(MemoryLayout<fl_kvm_memory_attributes>.offset(of: \.attributes) == 16)
        #expect(MemoryLayout<fl_kvm_memory_attributes>.offset(of: \.flags) == 24)
        #expect(MemoryLayout<fl_kvm_pre_fault_memory>.offset(of: \.size) == 8)
        #expect(MemoryLayout<fl_kvm_pre_fault_memory>.offset(of: \.flags) == 16)
        #expect(MemoryLayout<fl_kvm_pre_fault_memory>.offset(of: \.padding) == 24)
        #expect(MemoryLayout<fl_kvm_dirty_log>.offset(of: \.dirty_bitmap) == 8)
        #expect(MemoryLayout<fl_kvm_clear_dirty_log>.offset(of: \.num_pages) == 4)
        #expect(MemoryLayout<fl_kvm_clear_dirty_log>.offset(of: \.first_page) == 8)
        #expect(MemoryLayout<fl_kvm_clear_dirty_log>.offset(of: \.dirty_bitmap) == 16)
        #expect(MemoryLayout<fl_kvm_enable_cap>.offset(of: \.args) == 8)
        #expect(MemoryLayout<fl_kvm_enable_cap>.offset(of: \.pad) == 40)
    }

    @Test func registerOffsets() {
        #expect(MemoryLayout<fl_kvm_regs>.offset(of: \.rsi) == 32)
        #expect(MemoryLayout<fl_kvm_regs>.offset(of: \.r8) == 64)
        #expect(MemoryLayout<fl_kvm_regs>.offset(of: \.rip) == 128)
        #expect(MemoryLayout<fl_kvm_regs>.offset(of: \.rflags) == 136)
        typealias S = fl_kvm_segment
        #expect(MemoryLayout<S>.offset(of: \.limit) == 8)
        #expect(MemoryLayout<S>.offset(of: \.selector) == 12)
        #expect(MemoryLayout<S>.offset(of: \.type) == 14)
        #expect(MemoryLayout<S>.offset(of: \.present) == 15)
        #expect(MemoryLayout<S>.offset(of: \.db) == 17)
        #expect(MemoryLayout<S>.offset(of: \.g) == 20)
        #expect(MemoryLayout<S>.offset(of: \.unusable) == 22)
        #expect(MemoryLayout<fl_kvm_dtable>.offset(of: \.limit) == 8)
        typealias SR = fl_kvm_sregs
        let expected: [(PartialKeyPath<SR>, Int)] = [
            (\SR.cs, 0), (\SR.ds, 24), (\SR.es, 48), (\SR.fs, 72), (\SR.gs, 96), (\SR.ss, 120), (\SR.tr, 144),
            (\SR.ldt, 168), (\SR.gdt, 192), (\SR.idt, 208), (\SR.cr0, 224), (\SR.cr2, 232), (\SR.cr3, 240),
            (\SR.cr4, 248), (\SR.cr8, 256), (\SR.efer, 264), (\SR.apic_base, 272), (\SR.interrupt_bitmap, 280),
        ]
        for (path, offset) in expected {
            #expect(MemoryLayout<SR>.offset(of: path) == offset, "sregs field at \(offset)")
        }
    }

    @Test func kvmRunOffsets() {
        typealias R = fl_kvm_run
        #expect(MemoryLayout<R>.offset(of: \.immediate_exit) == 1)
        #expect(MemoryLayout<R>.offset(of: \.exit_reason) == 8)
        #expect(MemoryLayout<R>.offset(of: \.u) == 32)
        #expect(MemoryLayout<R>.offset(of: \.kvm_valid_regs) == 288)
        #expect(MemoryLayout<R>.offset(of: \.s) == 304)
        // Union members, relative to the union (which sits at 32).
        #expect(MemoryLayout<fl_kvm_run_io>.offset(of: \.size) == 1)
        #expect(MemoryLayout<fl_kvm_run_io>.offset(of: \.port) == 2)
        #expect(MemoryLayout<fl_kvm_run_io>.offset(of: \.count) == 4)
        #expect(MemoryLayout<fl_kvm_run_io>.offset(of: \.data_offset) == 8)
        #expect(MemoryLayout<fl_kvm_run_mmio>.offset(of: \.data) == 8)
        #expect(MemoryLayout<fl_kvm_run_mmio>.offset(of: \.len) == 16)
        #expect(MemoryLayout<fl_kvm_run_mmio>.offset(of: \.is_write) == 20)
        #expect(MemoryLayout<fl_kvm_run_memory_fault>.offset(of: \.gpa) == 8)
        #expect(MemoryLayout<fl_kvm_run_memory_fault>.offset(of: \.size) == 16)
        #expect(MemoryLayout<fl_kvm_run_internal>.offset(of: \.ndata) == 4)
        #expect(MemoryLayout<fl_kvm_run_internal>.offset(of: \.data) == 8)
        // The same fields read through raw bytes, as the kernel writes them.
        var run = fl_kvm_run()
        withUnsafeMutableBytes(of: &run) { raw in
            raw.storeBytes(of: UInt32(39), toByteOffset: 8, as: UInt32.self)
            raw.storeBytes(of: UInt64(0x1000_2000), toByteOffset: 40, as: UInt64.self)
            raw.storeBytes(of: UInt8(1), toByteOffset: 52, as: UInt8.self)
        }
        #expect(run.exit_reason == 39)
        #expect(run.u.memory_fault.gpa == 0x1000_2000)
        #expect(run.u.mmio.data.0 == 0x00 && run.u.mmio.is_write == 1)
    }

    @Test func uffdOffsets() {
        #expect(MemoryLayout<fl_uffdio_api>.offset(of: \.features) == 8)
        #expect(MemoryLayout<fl_uffdio_api>.offset(of: \.ioctls) == 16)
        #expect(MemoryLayout<fl_uffdio_register>.offset(of: \.mode) == 16)
        #expect(MemoryLayout<fl_uffdio_register>.offset(of: \.ioctls) == 24)
        #expect(MemoryLayout<fl_uffdio_copy>.offset(of: \.len) == 16)
        #expect(MemoryLayout<fl_uffdio_copy>.offset(of: \.mode) == 24)
        #expect(MemoryLayout<fl_uffdio_copy>.offset(of: \.copy) == 32)
        #expect(MemoryLayout<fl_uffdio_zeropage>.offset(of: \.zeropage) == 24)
        #expect(MemoryLayout<fl_uffdio_continue>.offset(of: \.mapped) == 24)
        #expect(MemoryLayout<fl_uffdio_poison>.offset(of: \.updated) == 24)
        #expect(MemoryLayout<fl_uffdio_move>.offset(of: \.move) == 32)
        #expect(MemoryLayout<fl_uffdio_writeprotect>.offset(of: \.mode) == 16)
        #expect(MemoryLayout<fl_uffd_msg>.offset(of: \.arg) == 8)
        // pagefault: 8 flags, 16 address, 24 ptid - checked through raw bytes.
        var m = fl_uffd_msg()
        withUnsafeMutableBytes(of: &m) { raw in
            raw.storeBytes(of: UInt8(0x12), toByteOffset: 0, as: UInt8.self)
            raw.storeBytes(of: UInt64(1), toByteOffset: 8, as: UInt64.self)
            raw.storeBytes(of: UInt64(0x7f00_0000_1000), toByteOffset: 16, as: UInt64.self)
            raw.storeBytes(of: UInt32(4242), toByteOffset: 24, as: UInt32.self)
        }
        #expect(m.event == 0x12)
        #expect(m.arg.pagefault.flags == 1)
        #expect(m.arg.pagefault.address == 0x7f00_0000_1000)
        #expect(m.arg.pagefault.ptid == 4242)
        #expect(m.arg.remap.to == 0x7f00_0000_1000)
        #expect(m.arg.remove.end == 0x7f00_0000_1000)
    }
}

@Suite("ioctl request numbers")
struct RequestNumberTests {
    @Test func kvmRequestsMatchFormulaAndTable() {
        let cases: [(UInt, UInt, String)] = [
            (FL_KVM_GET_API_VERSION, ioc(none, 0xAE, 0x00, 0), "0xAE00"),
            (FL_KVM_CREATE_VM, ioc(none, 0xAE, 0x01, 0), "0xAE01"),
            (FL_KVM_CHECK_EXTENSION, ioc(none, 0xAE, 0x03, 0), "0xAE03"),
            (FL_KVM_GET_VCPU_MMAP_SIZE, ioc(none, 0xAE, 0x04, 0), "0xAE04"),
            (FL_KVM_CREATE_VCPU, ioc(none, 0xAE, 0x41, 0), "0xAE41"),
            (FL_KVM_GET_DIRTY_LOG, ioc(write, 0xAE, 0x42, 16), "0x4010AE42"),
            (FL_KVM_SET_USER_MEMORY_REGION, ioc(write, 0xAE, 0x46, 32), "0x4020AE46"),
            (FL_KVM_SET_USER_MEMORY_REGION2, ioc(write, 0xAE, 0x49, 160), "0x40A0AE49"),
            (FL_KVM_RUN, ioc(none, 0xAE, 0x80, 0), "0xAE80"),
            (FL_KVM_GET_REGS, ioc(read, 0xAE, 0x81, 144), "0x8090AE81"),
            (FL_KVM_SET_REGS, ioc(write, 0xAE, 0x82, 144), "0x4090AE82"),
            (FL_KVM_GET_SREGS, ioc(read, 0xAE, 0x83, 312), "0x8138AE83"),
            (FL_KVM_SET_SREGS, ioc(write, 0xAE, 0x84, 312), "0x4138AE84"),
            (FL_KVM_ENABLE_CAP, ioc(write, 0xAE, 0xA3, 104), "0x4068AEA3"),
            (FL_KVM_CLEAR_DIRTY_LOG, ioc(read | write, 0xAE, 0xC0, 24), "0xC018AEC0"),
            (FL_KVM_SET_MEMORY_ATTRIBUTES, ioc(write, 0xAE, 0xD2, 32), "0x4020AED2"),
            (FL_KVM_CREATE_GUEST_MEMFD, ioc(read | write, 0xAE, 0xD4, 64), "0xC040AED4"),
            (FL_KVM_PRE_FAULT_MEMORY, ioc(read | write, 0xAE, 0xD5, 64), "0xC040AED5"),
        ]
        for (shim, formula, table) in cases {
            #expect(shim == formula, "\(table)")
            #expect(shim == UInt(table.dropFirst(2), radix: 16)!, "\(table)")
        }
    }

    @Test func uffdRequestsMatchFormulaAndTable() {
        let cases: [(UInt, UInt, String)] = [
            (FL_USERFAULTFD_IOC_NEW, ioc(none, 0xAA, 0x00, 0), "0xAA00"),
            (FL_UFFDIO_API, ioc(read | write, 0xAA, 0x3F, 24), "0xC018AA3F"),
            (FL_UFFDIO_REGISTER, ioc(read | write, 0xAA, 0x00, 32), "0xC020AA00"),
            (FL_UFFDIO_UNREGISTER, ioc(read, 0xAA, 0x01, 16), "0x8010AA01"),
            (FL_UFFDIO_WAKE, ioc(read, 0xAA, 0x02, 16), "0x8010AA02"),
            (FL_UFFDIO_COPY, ioc(read | write, 0xAA, 0x03, 40), "0xC028AA03"),
            (FL_UFFDIO_ZEROPAGE, ioc(read | write, 0xAA, 0x04, 32), "0xC020AA04"),
            (FL_UFFDIO_MOVE, ioc(read | write, 0xAA, 0x05, 40), "0xC028AA05"),
            (FL_UFFDIO_WRITEPROTECT, ioc(read | write, 0xAA, 0x06, 24), "0xC018AA06"),
            (FL_UFFDIO_CONTINUE, ioc(read | write, 0xAA, 0x07, 32), "0xC020AA07"),
            (FL_UFFDIO_POISON, ioc(read | write, 0xAA, 0x08, 32), "0xC020AA08"),
        ]
        for (shim, formula, table) in cases {
            #expect(shim == formula, "\(table)")
            #expect(shim == UInt(table.dropFirst(2), radix: 16)!, "\(table)")
        }
    }
}
