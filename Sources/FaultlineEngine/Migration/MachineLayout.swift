import FaultlineCore

/// The machine layout every Faultline VM shares, so source and destination agree on it:
/// low memory at GPA 0 (the guest program at 0x1000; in long mode also the GDT and the page
/// tables) and RAM at the ``GuestMode``'s base, split evenly between the vCPUs.
///
/// | mode | low memory | RAM | most RAM |
/// | --- | --- | --- | --- |
/// | protected (32-bit, paging off) | 64 KiB | 0x1000_0000 | 3584 MiB |
/// | long (64-bit, identity-mapped) | 1 MiB | 0x1_0000_0000 (4 GiB) | 60 GiB |
///
/// A layout takes protected mode while its RAM fits (every existing layout stays as it was)
/// and long mode above that, unless a mode is asked for. A layout received from a peer gets
/// its mode from where its RAM starts, so both sides agree without a protocol field.
public struct MachineLayout: Sendable, Equatable {
    public static let pageSize: UInt64 = 4096

    public let vcpus: Int
    public let ramSize: UInt64
    public let mode: GuestMode
    public let memory: GuestMemoryLayout

    public struct Invalid: Error, CustomStringConvertible { public let description: String }

    /// - Parameter mode: nil = ``GuestMode/natural(forRAM:)``.
    public init(vcpus: Int, ramSize: UInt64, mode: GuestMode? = nil) throws {
        guard vcpus >= 1, vcpus <= DemandPagingConfig.maxVcpus else {
            throw InvalidSetting(.vcpus, "must be between 1 and \(DemandPagingConfig.maxVcpus) (got \(vcpus))")
        }
        guard ramSize > 0, ramSize % (UInt64(vcpus) * Self.pageSize) == 0 else {
            throw Invalid(description: "memory size \(ramSize) must be a positive multiple of \(vcpus) x 4096 bytes")
        }
        let mode = mode ?? GuestMode.natural(forRAM: ramSize)
        guard ramSize <= mode.maxRAM else {
            throw Invalid(description: mode == .protected32
                ? "memory of \(ramSize >> 20) MiB does not fit below 0xF0000000 in the 32-bit guest "
                  + "(at most \(mode.maxRAM >> 20) MiB; a long-mode guest takes up to \(GuestMode.long64.maxRAM >> 20) MiB)"
                : "memory of \(ramSize >> 20) MiB is more than the long-mode guest can address: RAM from 4 GiB must end "
                  + "at 64 GiB (at most \(mode.maxRAM >> 20) MiB)")
        }
        self.vcpus = vcpus
        self.ramSize = ramSize
        self.mode = mode
        self.memory = try GuestMemoryLayout(regions: [
            GuestMemoryRange(start: GuestPhysicalAddress(0), size: mode.lowSize)!,
            GuestMemoryRange(start: GuestPhysicalAddress(mode.ramBase), size: ramSize)!,
        ])
    }

    /// Rebuilds (and checks) a layout received from a peer; its RAM's address gives the mode.
    public init(vcpus: Int, memory: GuestMemoryLayout) throws {
        guard memory.pageSize == Self.pageSize, memory.regions.count == 2,
              let mode = GuestMode(ramBase: memory.regions[1].start.rawValue),
              memory.regions[0] == GuestMemoryRange(start: GuestPhysicalAddress(0), size: mode.lowSize) else {
            throw Invalid(description: "the peer's memory layout is not a Faultline machine layout: \(memory.regions)")
        }
        try self.init(vcpus: vcpus, ramSize: memory.regions[1].size, mode: mode)
    }

    /// Guest-physical address of RAM.
    public var ramBase: UInt64 { mode.ramBase }
    /// Bytes of low memory at GPA 0.
    public var lowSize: UInt64 { mode.lowSize }
    public var lowPages: Int { Int(lowSize / Self.pageSize) }
    public var ramPages: Int { Int(ramSize / Self.pageSize) }
    public var totalPages: Int { lowPages + ramPages }
    public var bytesPerVcpu: UInt64 { ramSize / UInt64(vcpus) }
    public var pagesPerVcpu: Int { Int(bytesPerVcpu / Self.pageSize) }
    /// Guest-physical address of vCPU `id`'s chunk.
    public func chunkBase(vcpu id: Int) -> UInt64 { ramBase + UInt64(id) * bytesPerVcpu }
}
