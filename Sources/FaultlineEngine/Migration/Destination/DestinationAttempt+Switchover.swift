import FaultlineCore
import FaultlineLinux

/// The switch-over on the destination: owed pages, the guest started, a commit awaited.
extension DestinationAttempt {
    // MARK: switch-over

    /// Everything but starting the vCPUs: drop stale copies, arm faults, start the fault path.
    func prepareSwitchover(owed: [Range<UInt64>]) throws {
        let ranges = try ramRanges(owed, named: "owed")
        switchPart("owed_set")
        for stale in table.switchOver(owed: ranges) { try mapper.discard(stale) }
        switchPart("drop_stale")
        // Pages that never arrived (none was sent, or a round was cut short) are owed too.
        report.postcopy = !table.isComplete
        // Write-tracked RAM (a guest_memfd VM) keeps its readers even when nothing is missing:
        // they serve the guest's write-protect faults until the digest is taken.
        let tracking = tracksWritesWithUserfaultfd
        if !report.postcopy && !tracking { mapper.disarmFaults() }  // armed early for pre-copy (MISSING modes); nothing is missing
        if report.postcopy || tracking {
            try mapper.armFaults()
            // uffd modes, and the userfaultfd behind KVM Userfault (non-vCPU accesses).
            if options.faultMode != .vcpuExit || vcpuExitMechanism == .kvmUserfault,
               let uffdMapper = mapper as? UffdPageMapper, let vm = machine as? MigratableVM {
                try requester.startReaders(uffdMapper.uffds, perUffd: options.readers, ramBase: vm.ram.hostAddress.rawValue,
                                           lowPages: layout.lowPages, mapper: mapper, writeLog: uffdMapper.writeLog,
                                           vcpuForThread: { [weak vm] in vm?.vcpu(forThread: $0) ?? -1 })
            }
        }
        try startFaultReceiver()
        if report.postcopy { cpuLatency.hold(microseconds: options.postcopyCPULatencyMicroseconds) }
        switchPart("fault_path")
        if options.preFault, let vm = machine as? MigratableVM {
            // The installed RAM pages, into KVM's page tables before the guest touches them.
            var installed: [Range<Int>] = []
            var runStart = -1
            for page in layout.lowPages...layout.totalPages {
                let present = page < layout.totalPages && table.installed.contains(page)
                if present && runStart < 0 { runStart = page }
                if !present && runStart >= 0 {
                    installed.append((runStart - layout.lowPages)..<(page - layout.lowPages))
                    runStart = -1
                }
            }
            report.preFaultAtSwitchover = vm.preFaultRAM(installed, through: vm.vcpus[0])
            switchPart("pre_fault")
        }
    }

    /// MINOR installs stay exclusive, so a fault on a page of a bulk run waits for the whole
    /// run (written into the file, then mapped): keep those runs short. In MISSING modes a
    /// run is one UFFDIO_COPY, which a fault-path thread woken on the same CPU waits out
    /// (a kernel without preemption does not interrupt a system call): 64 pages keep that
    /// wait well under a millisecond, for about 10% more total time than 256.
    var bulkRunPages: Int { options.faultMode == .uffdMinor ? 32 : 64 }

    /// While post-copy runs the vCPU threads are nice (the stream they wait for goes first)
    /// and keep off the fault path's CPU: a thread in guest mode there holds a woken
    /// fault-path thread off the CPU until the next scheduler tick.
    var postcopyVcpuScheduling: VcpuScheduling {
        VcpuScheduling(niceness: options.vcpuNicenessDuringPostcopy,
                       avoidedCPU: options.vcpusOffFaultCPU ? faultCPU : nil)
    }

    func startGuest() throws {
        phase = .postcopy
        awaitingCommit = false
        guestStarted = true
        destination.guestStarts.wrappingIncrement(ordering: .relaxed)
        try machine.startGuest(faultHandler: report.postcopy && options.faultMode == .vcpuExit ? self : nil,
                               scheduling: report.postcopy ? postcopyVcpuScheduling : .normal)
        guestRunningSince = MonotonicClock.nanoseconds()  // the vCPU threads run; the fill starts next
        if report.postcopy, options.localFill, let supplier = options.localPages, let pipeline {
            localFill = try LocalFill(supplier: supplier, pipeline: pipeline, table: table, first: options.localFillFirst,
                                      failures: failures, afterFirst: { [machine, installer] in
                                          machine?.setVcpuScheduling(.normal)
                                          // Its installer too, unless a vCPU may wait for one of its runs
                                          // (exclusive installs): a staged page a fault wants is mapped
                                          // by the faulting thread itself.
                                          if installer?.exclusiveInstalls == false { pipeline.setInstallerNiceness(LocalFill.restNiceness) }
                                      },
                                      stopping: { [stopping] in stopping.load(ordering: .relaxed) })
        }
    }

    /// After losing the connection between `ready` and `commit`.
    func awaitCommitAfterLoss(_ cause: Error) throws {
        closeChannels()
        let pair: SessionAcceptor.Pair
        do {
            pair = try sessions.acceptPair(timeout: options.reconnectSeconds, session: sessionID, orNewSession: true)
        } catch {
            throw AttemptAbandoned(cause: cause)
        }
        guard pair.hello.sessionID == sessionID else { throw AttemptAbandoned(cause: cause, next: pair) }
        FaultlineLog.note("destination: the source reconnected after the commit; starting the guest")
        try startGuest()
        try resume(pair)
    }
}
