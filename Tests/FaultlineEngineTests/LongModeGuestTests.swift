import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Testing

/// Long-mode guests on a real vCPU, their RAM at 4 GiB: every store the guest makes is at a
/// GPA above 4 GiB, so a program that truncated an address to 32 bits would hit GPA
/// 0x0000_0000-0xFFFF_FFFF, where no memslot lies, and the VM would fail at once.
@Suite("Long-mode guests on KVM", .serialized, .gate(.longModeGuests))
struct LongModeGuestTests {
    static let pages = 256   // 1 MiB per vCPU

    /// Boots a 2-vCPU long-mode guest, lets every vCPU make 3 passes, pauses it, runs `body`
    /// on it, and stops it.
    func afterThreePasses(_ kind: RunningWorkloadKind, _ body: (MigratableVM) throws -> Void) throws {
        let layout = try MachineLayout(vcpus: 2, ramSize: UInt64(2 * Self.pages) * 4096, mode: .long64)
        let vm = try MigratableVM(layout: layout, backing: .anonymous)
        try vm.boot(workload: try RunningWorkload(kind: kind, pagesPerVcpu: layout.pagesPerVcpu, mode: .long64))
        try vm.start()
        defer { vm.stop() }
        try wait(vm, for: "3 passes of every vCPU") { (0..<2).allSatisfy { vm.counters.passes(of: $0) >= 3 } }
        vm.pause()
        #expect(vm.error == nil)
        try body(vm)
    }

    /// Waits (at most 20 s) until `done` holds, or the VM failed.
    func wait(_ vm: MigratableVM, for what: String, until done: () -> Bool) throws {
        let deadline = MonotonicClock.nanoseconds() + 20_000_000_000
        while !done() {
            if let error = vm.error { throw RanPastDeadline(description: "the guest failed while waiting for \(what): \(error)") }
            guard MonotonicClock.nanoseconds() < deadline else { throw RanPastDeadline(description: "no \(what) within 20 s") }
            MonotonicClock.sleep(nanoseconds: 1_000_000)
        }
    }

    func word(_ vm: MigratableVM, gpa: UInt64) -> UInt32 {
        (vm.ram.base + Int(gpa - vm.layout.ramBase)).load(as: UInt32.self)
    }

    /// The vCPU is in 64-bit mode, its chunk bounds are 64-bit, and its cursor inside them.
    func expectLongMode(_ vm: MigratableVM, vcpu id: Int) throws -> VcpuRegisters {
        let control = try vm.vcpus[id].controlRegisters()
        #expect(control.efer & 0x500 == 0x500, "EFER.LME|LMA")
        #expect(control.cr0 & 0x8000_0001 == 0x8000_0001 && control.cr4 & 0x20 != 0, "CR0.PG|PE, CR4.PAE")
        let r = try vm.vcpus[id].registers()
        #expect(r.rsi == vm.layout.chunkBase(vcpu: id) && r.rsi >= 1 << 32)
        #expect(r.rdi == r.rsi + vm.layout.bytesPerVcpu)
        #expect(r.rdx >= r.rsi && r.rdx <= r.rdi, "cursor 0x\(String(r.rdx, radix: 16))")
        return r
    }

    @Test func aDirtierWritesItsTagsAbove4GiB() throws { try afterThreePasses(.dirtier) { vm in
        for id in 0..<2 {
            let r = try expectLongMode(vm, vcpu: id)
            let pass = UInt32(truncatingIfNeeded: r.rbp)
            let recent = Set((pass - 1)...(pass + 1)).map { RunningWorkload.tag(vcpu: id, pass: $0) }
            for page in 0..<Self.pages {
                let gpa = vm.layout.chunkBase(vcpu: id) + UInt64(page) * 4096
                let first = word(vm, gpa: gpa)
                #expect(recent.contains(first), "vcpu \(id) GPA 0x\(String(gpa, radix: 16)): 0x\(String(first, radix: 16))")
            }
        }
        // Low memory above the page tables: nothing there was written by the guest.
        let tablesEnd = Int(try LongModePageTables(mapping: vm.layout.ramBase + vm.layout.ramSize).end)
        let low = UnsafeRawBufferPointer(start: vm.low.base + tablesEnd, count: Int(vm.layout.lowSize) - tablesEnd)
        #expect(low.allSatisfy { $0 == 0 })
        #expect(vm.counters.mismatches.load(ordering: .relaxed) == 0)
    } }

    @Test func aSelfcheckHoldsItsInvariantAndNamesACorruptWordByItsFullAddress() throws { try afterThreePasses(.selfcheck) { vm in
        let workload = try RunningWorkload(kind: .selfcheck, pagesPerVcpu: Self.pages, mode: .long64)
        var corruptAt: UInt64 = 0
        for id in 0..<2 {
            let r = try expectLongMode(vm, vcpu: id)
            // The invariant only needs the cursor relative to the chunk: 32-bit views suffice.
            let view = RunningWorkloadRegisters(ecx: UInt32(truncatingIfNeeded: r.rcx), edx: UInt32(truncatingIfNeeded: r.rdx),
                                                ebx: UInt32(truncatingIfNeeded: r.rbx), ebp: UInt32(truncatingIfNeeded: r.rbp),
                                                esi: UInt32(truncatingIfNeeded: r.rsi), edi: UInt32(truncatingIfNeeded: r.rdi))
            var checked = 0
            for page in 0..<Self.pages {
                guard let expected = workload.expectedSelfcheckWords(vcpu: id, registers: view, page: page) else { continue }
                let gpa = vm.layout.chunkBase(vcpu: id) + UInt64(page) * 4096
                #expect(word(vm, gpa: gpa) == expected.first && word(vm, gpa: gpa + 4092) == expected.last, "vcpu \(id) page \(page)")
                checked += 1
                if id == 1 { corruptAt = gpa }   // vCPU 1's last page the invariant pins down
            }
            #expect(checked >= Self.pages - 1)
        }
        #expect(vm.counters.mismatches.load(ordering: .relaxed) == 0)
        (vm.ram.base + Int(corruptAt - vm.layout.ramBase)).storeBytes(of: 0xDEAD_BEEF, as: UInt32.self)
        vm.resume()
        try wait(vm, for: "the guest's mismatch report") { vm.counters.mismatches.load(ordering: .relaxed) > 0 }
        #expect(vm.counters.firstMismatch == "vcpu 1: read 0xdeadbeef at GPA 0x\(String(corruptAt, radix: 16))")
        #expect(corruptAt > 1 << 32)
    } }
}
