import FaultlineCore
import FaultlineEngine
import FaultlineLinux
import Foundation
#if canImport(Glibc)
import Glibc
#endif

extension Capability {
    /// What the probe saw on the running machine: measured on first use, then kept for the
    /// process. `FAULTLINE_TEST_HIDE` does not change it (see ``Machine``).
    public var measured: Measurement {
        if let known = measurements.withLock({ $0[self] }) { return known }
        // Measured under the lock: once per process even when tests are discovered in parallel.
        // A probe never asks for another capability's measurement, so this cannot recurse.
        return measurements.withLock { cache in
            if let known = cache[self] { return known }
            let m = Probes.measure(self)
            cache[self] = m
            return m
        }
    }
}

private let measurements = Locked<[Capability: Measurement]>([:])

/// The probes, one per capability, each through the FaultlineLinux types the code under test
/// uses; what they saw is kept in words for the skip reasons.
enum Probes {
    static func measure(_ capability: Capability) -> Measurement {
        switch capability {
        case .kvm: kvm()
        case .vcpuExit: vcpuExit()
        case .kvmUserfault: kvmUserfault()
        case .preFault:
            kvmCheck { kvm in
                let v = kvm.check(.preFaultMemory)
                return Measurement(present: v != 0, saw: "KVM_CAP_PRE_FAULT_MEMORY is \(v)")
            }
        case .guestMemfd: guestMemfd()
        case .guestMemfdMmap: guestMemfdMmap()
        case .guestMemfdInitShared: guestMemfdInitShared()
        case .guestMemfdUffdMissing: guestMemfdOnly(\.uffdMissing)
        case .guestMemfdUffdMinor: guestMemfdOnly(\.uffdMinor)
        case .guestMemfdWrite: guestMemfdOnly(\.write)
        case .swProtectedVM: swProtectedVM()
        case .memoryAttributes:
            kvmCheck { kvm in
                let v = kvm.check(.memoryAttributes)
                return Measurement(present: UInt64(v) & PrivateMemoryVM.attributePrivate != 0,
                                   saw: "KVM_CAP_MEMORY_ATTRIBUTES is \(v) (PRIVATE is 8)")
            }
        case .uffdUser: uffdOpens(flags: [.nonBlocking, .userModeOnly])
        case .uffdKernel: uffdOpens(flags: [.nonBlocking])
        case .devUserfaultfd: devUserfaultfd()
        case .uffdMissing:
            uffdRegisters(backing: .anonymous, features: [.threadID], mode: .missing, what: "MISSING on anonymous memory")
        case .uffdMinor:
            uffdRegisters(backing: .memfd, features: [.minorShmem, .missingShmem], mode: [.minor, .missing],
                          what: "MINOR|MISSING on shmem")
        case .uffdWP:
            uffdRegisters(backing: .anonymous, features: [.pagefaultFlagWP, .wpUnpopulated], mode: [.missing, .writeProtect],
                          what: "MISSING|WP on anonymous memory, with WP_UNPOPULATED")
        case .uffdHugetlbfs: uffdOffers([.missingHugetlbfs, .minorHugetlbfs])
        case .uffdMove: uffdOffers(.move)
        case .uffdSigbus: uffdOffers(.sigbus)
        case .uffdEventRemove: uffdOffers(.eventRemove)
        case .hugetlbReserved:
            Measurement(present: hugePagesFree() > 0, saw: "HugePages_Free is \(hugePagesFree())")
        case .hugetlbReservable: writable("/proc/sys/vm/nr_hugepages")
        case .schedFIFO: schedFIFO()
        case .cpuDMALatency: writable(CPULatencyRequest.defaultPath)
        case .twoCPUs:
            Measurement(present: (ThreadScheduling.lastAllowedCPU() ?? 0) > 0,
                        saw: "\(ThreadScheduling.allowedCPUCount()) allowed CPU(s), the last is "
                            + (ThreadScheduling.lastAllowedCPU().map { "CPU \($0)" } ?? "unknown"))
        case .root:
            Measurement(present: HostProcess.effectiveUserID == 0, saw: "euid \(HostProcess.effectiveUserID)")
        case .netNamespaces: netNamespaces()
        case .setpriv:
            Measurement(present: FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv"),
                        saw: "/usr/bin/setpriv " + (FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv")
                                                     ? "is executable" : "is missing or not executable"))
        }
    }

    // MARK: KVM

    static func kvm() -> Measurement {
        kvmCheck { kvm in
            let v2 = kvm.check(.userMemory2)
            return v2 > 0 ? .present("/dev/kvm: API 12, KVM_CAP_USER_MEMORY2 is \(v2)")
                : .absent("KVM_CAP_USER_MEMORY2 is 0: no KVM_SET_USER_MEMORY_REGION2")
        }
    }

    /// Opens /dev/kvm and asks `body`; an open that fails is the measurement.
    static func kvmCheck(_ body: (KVM) throws -> Measurement) -> Measurement {
        do { return try body(try KVM()) } catch { return .absent("\(error)") }
    }

    static func vcpuExit() -> Measurement {
        let probe = VcpuFaultProbe.current
        if let obstacle = FaultModeSelection.obstacle(to: .vcpuExit, probe: probe) { return .absent(obstacle) }
        return .present(probe.hasKVMUserfault ? "KVM Userfault: \(probe.kvmUserfault.map { "\($0)" } ?? "")"
                        : "a vCPU fault on missing RAM gave \(probe.sigbusFault)")
    }

    /// What vcpu-exit relies on is KVM Userfault (``VcpuFaultProbe/hasKVMUserfault``).
    static func kvmUserfault() -> Measurement {
        let probe = VcpuFaultProbe.current
        if probe.hasKVMUserfault { return .present("a marked page gave \(probe.kvmUserfault.map { "\($0)" } ?? "")") }
        if let outcome = probe.kvmUserfault { return .absent("a store to a marked page gave \(outcome)") }
        if probe.sigbusFault.namesFaultingPage {
            return .absent("not tried: a vCPU fault already gives \(probe.sigbusFault), which vcpu-exit uses instead")
        }
        return .absent("the KVM_MEM_USERFAULT memslot flag is refused (\(probe.sigbusFault))")
    }

    static func guestMemfd() -> Measurement {
        kvmCheck { kvm in
            let cap = kvm.check(.guestMemfd)
            do {
                _ = try kvm.createVM().createGuestMemfd(size: 2 << 20, flags: [])
                return .present("KVM_CREATE_GUEST_MEMFD on a default VM (KVM_CAP_GUEST_MEMFD is \(cap))")
            } catch let onDefault {
                guard kvm.check(.vmTypes) & (1 << Int32(VMType.swProtected.rawValue)) != 0 else {
                    return .absent("\(onDefault); KVM_CAP_GUEST_MEMFD is \(cap)")
                }
                do {
                    _ = try kvm.createVM(type: .swProtected).createGuestMemfd(size: 2 << 20, flags: [])
                    return .present("KVM_CREATE_GUEST_MEMFD on a SW-protected VM (a default VM answered \(onDefault))")
                } catch {
                    return .absent("\(error) (a default VM answered \(onDefault))")
                }
            }
        }
    }

    static func guestMemfdMmap() -> Measurement {
        kvmCheck { kvm in
            let flags = kvm.check(.guestMemfdFlags)
            let gmem = try kvm.createVM().createGuestMemfd(size: 4096, flags: .mmap)
            guard let p = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, gmem.fd.rawValue, 0), p != MAP_FAILED else {
                return .absent("mmap of a GUEST_MEMFD_FLAG_MMAP guest_memfd: \(SystemError.name(of: errno)) "
                               + "(KVM_CAP_GUEST_MEMFD_FLAGS is \(flags))")
            }
            munmap(p, 4096)
            return .present("a guest_memfd with GUEST_MEMFD_FLAG_MMAP maps (KVM_CAP_GUEST_MEMFD_FLAGS is \(flags))")
        }
    }

    /// Exactly what `MemoryBacking.guestMemfd` does: MMAP | INIT_SHARED, mapped, then a store.
    static func guestMemfdInitShared() -> Measurement {
        kvmCheck { kvm in
            let region = try GuestMemoryRegion(backing: .guestMemfd, size: 4096, vm: try kvm.createVM(), label: "probe")
            region.base.storeBytes(of: 0x5A, as: UInt8.self)
            return .present("a guest_memfd with MMAP|INIT_SHARED maps and takes a store "
                            + "(KVM_CAP_GUEST_MEMFD_FLAGS is \(kvm.check(.guestMemfdFlags)))")
        }
    }

    /// What `faultline probe` tried on a guest_memfd-only VM's memory (GuestMemfdOnlyProbe,
    /// run once for the three capabilities it answers).
    static func guestMemfdOnly(_ answer: KeyPath<GuestMemfdOnlyFeatures, ProbeOutcome>) -> Measurement {
        let outcome = guestMemfdOnlyFeatures[keyPath: answer]
        return Measurement(present: outcome.works, saw: outcome.detail)
    }

    static let guestMemfdOnlyFeatures = GuestMemfdOnlyProbe.collect()

    static func swProtectedVM() -> Measurement {
        kvmCheck { kvm in
            let types = kvm.check(.vmTypes)
            let offered = VMType.allCases.filter { types & (1 << Int32($0.rawValue)) != 0 }.map { "\($0)" }
            let saw = "KVM_CAP_VM_TYPES is 0x\(String(types, radix: 16)) (\(offered.joined(separator: ", ")))"
            guard types & (1 << Int32(VMType.swProtected.rawValue)) != 0 else { return .absent(saw) }
            _ = try kvm.createVM(type: .swProtected)
            return .present(saw)
        }
    }

    // MARK: userfaultfd

    static func uffdOpens(flags: Userfaultfd.OpenFlags) -> Measurement {
        do {
            let u = try Userfaultfd(required: [], flags: flags, label: "probe uffd")
            return .present("opened through \(u.origin.rawValue)")
        } catch {
            return .absent("\(error)")
        }
    }

    /// A userfaultfd with `features`, user-mode only where that opens (a feature is the
    /// kernel's, whatever the privilege; tests add uffd_user or uffd_kernel for that).
    static func featureUffd(_ features: UffdFeatures) throws -> Userfaultfd {
        do {
            return try Userfaultfd(required: features, flags: [.nonBlocking, .userModeOnly], label: "probe uffd")
        } catch {
            return try Userfaultfd(required: features, flags: [.nonBlocking], label: "probe uffd")
        }
    }

    static func uffdRegisters(backing: MemoryBacking, features: UffdFeatures, mode: UffdRegisterMode,
                              what: String) -> Measurement {
        do {
            let region = try GuestMemoryRegion(backing: backing, size: 4096, label: "probe")
            let u = try featureUffd(features)
            try u.register(start: region.hostAddress, length: 4096, mode: mode)
            return .present("a \(what) registration works (features \(features))")
        } catch {
            return .absent("\(error)")
        }
    }

    static func uffdOffers(_ features: UffdFeatures) -> Measurement {
        // With no feature asked for, UFFDIO_API answers every feature the kernel has.
        let available: UffdFeatures
        do { available = try featureUffd([]).features } catch { return .absent("\(error)") }
        let missing = features.subtracting(available)
        return missing.isEmpty ? .present("UFFDIO_API offers \(features)")
            : .absent("UFFDIO_API lacks UFFD_FEATURE_\(missing.names.joined(separator: ", UFFD_FEATURE_"))")
    }

    static func devUserfaultfd() -> Measurement {
        do {
            _ = try FileDescriptor.open("/dev/userfaultfd", flags: O_RDWR)
            let u = try Userfaultfd(required: [], flags: [.nonBlocking, .userModeOnly], label: "probe uffd")
            return u.origin == .devUserfaultfd ? .present("USERFAULTFD_IOC_NEW on /dev/userfaultfd")
                : .absent("/dev/userfaultfd opens, but USERFAULTFD_IOC_NEW failed (the fd came from userfaultfd(2))")
        } catch {
            return .absent("\(error)")
        }
    }

    // MARK: Host

    static func writable(_ path: String) -> Measurement {
        access(path, W_OK) == 0 ? .present("\(path) is writable")
            : .absent("\(path) is not writable: \(SystemError.name(of: errno))")
    }

    /// SCHED_FIFO asked for by a throwaway thread (it ends right after).
    static func schedFIFO() -> Measurement {
        let outcome = Locked<String?>(nil)
        do {
            let thread = try OSThread(name: "probe sched") {
                do { try ThreadScheduling.requestRealtimeFIFO() } catch { outcome.withLock { $0 = "\(error)" } }
            }
            thread.join()
        } catch {
            return .absent("\(error)")
        }
        if let error = outcome.withLock({ $0 }) { return .absent(error) }
        return .present("a thread got SCHED_FIFO 1")
    }

    /// Two namespaces and a veth pair between them, removed again.
    static func netNamespaces() -> Measurement {
        guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") else { return .absent("no /usr/sbin/ip") }
        let pid = getpid(), a = "flprobeA\(pid)", b = "flprobeB\(pid)", link = "flp\(pid % 100_000)"
        defer { _ = shell("ip netns del \(a); ip netns del \(b)") }
        let (status, output) = shell("ip netns add \(a) && ip netns add \(b) && "
                                     + "ip link add \(link)a netns \(a) type veth peer name \(link)b netns \(b)")
        return status == 0 ? .present("ip netns and a veth pair work")
            : .absent("ip netns / veth exited \(status): \(output.trimmingCharacters(in: .whitespacesAndNewlines))")
    }

    /// Runs `/bin/sh -c command`; its exit status and what it printed.
    static func shell(_ command: String) -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", command]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        do { try p.run() } catch { return (-1, "\(error)") }
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (p.terminationStatus, text)
    }
}
