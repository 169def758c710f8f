import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import FaultlineTestSupport
import Foundation
import Testing

/// Clone restores on a real vCPU: two clones of one snapshot in this process, each RAM the
/// snapshot's memory file mapped private. What one clone writes neither the other clone nor
/// the file sees; what neither writes is one page-cache page mapped by both.
@Suite("Clone restores on KVM", .serialized, .gate(.cloneRestoreOnKVM))
struct CloneRestoreTests {
    /// A snapshot of a 2-vCPU, 16 MiB guest running `kind`, taken once every vCPU has done
    /// two passes (so every page holds data).
    func snapshot(_ kind: RunningWorkloadKind, workingSet: Int? = nil, mode: GuestMode = .protected32,
                  name: String = #function) throws -> SnapshotFolder {
        let folder = SnapshotFolder(name)
        let layout = try MachineLayout(vcpus: 2, ramSize: 16 << 20, mode: mode)
        let vm = try MigratableVM(layout: layout, backing: .anonymous)
        try vm.boot(workload: try RunningWorkload(kind: kind, pagesPerVcpu: layout.pagesPerVcpu, workingSetPages: workingSet,
                                                  mode: mode))
        try vm.start()
        defer { vm.stop() }
        try wait(for: "2 passes of the snapshot's guest", failure: { vm.error }) { (0..<2).allSatisfy { vm.counters.passes(of: $0) >= 2 } }
        vm.pause()
        _ = try SnapshotWriter.write(vm, to: folder.path, workload: kind.rawValue)
        #expect(vm.counters.mismatches.load(ordering: .relaxed) == 0)
        return folder
    }

    /// Waits (at most 30 s) until `done` holds; a failure reported meanwhile ends the wait.
    func wait(for what: String, failure: () -> String?, until done: () -> Bool) throws {
        let deadline = MonotonicClock.deadline(after: 30)
        while !done() {
            if let error = failure() { throw RanPastDeadline(description: "failed while waiting for \(what): \(error)") }
            guard MonotonicClock.nanoseconds() < deadline else { throw RanPastDeadline(description: "no \(what) within 30 s") }
            MonotonicClock.sleep(nanoseconds: 1_000_000)
        }
    }

    func started(_ folder: SnapshotFolder) throws -> SnapshotClone {
        let clone = try SnapshotClone(folder: folder.path, started: MonotonicClock.nanoseconds())
        try clone.start()
        #expect(clone.waitForPasses(2, timeoutSeconds: 30), "\(clone.vm.error ?? "no passes")")
        return clone
    }

    /// Clone A rewrites every page of a selfcheck guest with newer tags, then clone B starts
    /// from the same snapshot: B's guest checks every page against the snapshot's tags, so
    /// one of A's writes reaching B would turn B's check red. Afterwards the memory file still
    /// matches every chunk checksum and the digest of the manifest.
    @Test(arguments: [GuestMode.protected32, .long64])
    func aPageOneCloneWritesIsNotSeenByTheOtherNorByTheFile(mode: GuestMode) throws {
        let folder = try snapshot(.selfcheck, mode: mode, name: "selfcheck\(mode)")
        let a = try started(folder)
        try a.pause()
        let b = try started(folder)
        let reportB = try b.stop()
        a.vm.resume()
        #expect(a.waitForPasses(3, timeoutSeconds: 30))
        let reportA = try a.stop()
        for report in [reportA, reportB] {
            #expect(report.guestCheck, "\(report.firstMismatch ?? report.vcpuError ?? "")")
            #expect(report.fewestVcpuPasses >= 2)
            #expect(report.ram.anonymous == 16 << 10, "selfcheck writes every page: each its own copy")
            #expect(report.lowPagesCopied == Int(mode.lowSize / 4096) && report.chunksChecked > 0)
        }
        // The same page in A, B and the file: A and B wrote newer tags (their own), the file kept its own.
        let snapshot = try Snapshot(folder: folder.path)
        let page = 7, filePage = snapshot.pagePointer(snapshot.layout.lowPages + page)
        let pageA = a.vm.ram.base + page * 4096, pageB = b.vm.ram.base + page * 4096
        #expect(memcmp(pageA, filePage, 4096) != 0 && memcmp(pageB, filePage, 4096) != 0)
        pageA.storeBytes(of: 0xC10E_C10E as UInt32, toByteOffset: 8, as: UInt32.self)
        #expect(pageB.load(fromByteOffset: 8, as: UInt32.self) != 0xC10E_C10E)
        #expect(filePage.load(fromByteOffset: 8, as: UInt32.self) != 0xC10E_C10E)
        let verified = try snapshot.verify()  // every chunk's CRC32C and the whole-memory digest
        #expect(verified.pages == snapshot.manifest.totalPages)
    }

    /// A readmostly guest reads all 16 MiB and writes its working set: each clone owns
    /// exactly the working set; every other page is mapped by both clones (smaps counts it
    /// shared), and the file is unchanged.
    @Test func pagesNeitherCloneWritesAreShared() throws {
        let workingSet = 64  // pages per vCPU: 512 KiB per clone
        let folder = try snapshot(.readmostly, workingSet: workingSet)
        let a = try started(folder)
        try a.pause()
        let b = try started(folder)
        try b.pause()
        let (reportA, reportB) = (a.report, b.report)
        let written = UInt64(2 * workingSet * 4)  // KiB
        for report in [reportA, reportB] {
            #expect(report.guestCheck)
            #expect(report.ram.anonymous == written, "only the working set is the clone's own")
            #expect(report.ram.rss == 16 << 10, "every page was read")
        }
        let sharedNow = try ProcessMemory.mapping(startingAt: UInt(bitPattern: a.vm.ram.base))
        #expect(sharedNow.sharedClean >= (16 << 10) - written - 64, "\(sharedNow)")
        #expect(sharedNow.pss < (16 << 10) - (16 << 9) + written + 64, "a shared page counts half in each: \(sharedNow)")
        _ = try a.stop()
        _ = try b.stop()
        _ = try Snapshot(folder: folder.path).verify()
    }
}

/// A clone of a corrupt or truncated snapshot is refused before anything is mapped or a VM
/// made (no kernel needed: the checks come first).
@Suite("Clone restore refuses bad snapshots (no kernel)")
struct CloneRefusalTests {
    @Test func aCorruptChunkIsRefusedBeforeMapping() throws {
        let folder = SnapshotFolder()
        let machine = try patternedMachine()
        _ = try SnapshotWriter.write(machine, to: folder.path, workload: "test")
        let page = machine.layout.lowPages + 301
        try folder.flipByte(at: UInt64(page) * 4096 + 99)
        let chunk = try Snapshot(folder: folder.path).manifest.chunk(of: page)
        #expect { try SnapshotClone(folder: folder.path, started: 0) } throws: {
            guard case .corruptChunk(chunk, _, _, _)? = $0 as? SnapshotError else { return false }
            return true
        }
    }

    @Test func aTruncatedMemoryFileIsRefused() throws {
        let folder = SnapshotFolder()
        _ = try SnapshotWriter.write(try patternedMachine(), to: folder.path, workload: "test")
        let size = try Snapshot(folder: folder.path).memory.size
        #expect(truncate(folder.memory, off_t(size / 2)) == 0)
        #expect(throws: SnapshotError.truncated(expected: size, found: size / 2)) {
            try SnapshotClone(folder: folder.path, started: 0)
        }
    }
}
