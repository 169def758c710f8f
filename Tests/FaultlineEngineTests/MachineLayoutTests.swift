import FaultlineCore
import FaultlineEngine
import Testing

/// Which CPU mode a migration guest gets, where its RAM goes, and how a destination
/// rebuilds the same machine from the layout on the wire.
@Suite("Machine layout and guest mode")
struct MachineLayoutTests {
    @Test func theModeFollowsTheSizeUnlessAsked() throws {
        let small = try MachineLayout(vcpus: 2, ramSize: 512 << 20)
        #expect(small.mode == .protected32 && small.ramBase == 0x1000_0000 && small.lowPages == 16)
        let largest32 = try MachineLayout(vcpus: 4, ramSize: 3584 << 20)
        #expect(largest32.mode == .protected32)
        let four = try MachineLayout(vcpus: 4, ramSize: 4 << 30)
        #expect(four.mode == .long64 && four.ramBase == 1 << 32 && four.lowPages == 256)
        #expect(four.chunkBase(vcpu: 3) == (1 << 32) + 3 << 30)
        let forced = try MachineLayout(vcpus: 1, ramSize: 4 << 20, mode: .long64)
        #expect(forced.mode == .long64 && forced.memory.regions[1].start.rawValue == 1 << 32)
        #expect(try MachineLayout(vcpus: 1, ramSize: 60 << 30).mode == .long64)
    }

    @Test func sizesNoGuestCanAddressAreRefusedWithTheLimit() {
        #expect(GuestMode.natural(forRAM: (3584 << 20) + 4096) == .long64)
        #expect(GuestMode(ramBase: 0x2000_0000) == nil)
        let tooBig = #expect(throws: MachineLayout.Invalid.self) { try MachineLayout(vcpus: 1, ramSize: (60 << 30) + 4096) }
        #expect(tooBig?.description.contains("at most 61440 MiB") == true, "\(tooBig?.description ?? "")")
        let protected = #expect(throws: MachineLayout.Invalid.self) { try MachineLayout(vcpus: 1, ramSize: 4 << 30, mode: .protected32) }
        #expect(protected?.description.contains("at most 3584 MiB") == true, "\(protected?.description ?? "")")
    }

    /// The destination's machine comes from the hello's layout alone: a long-mode layout
    /// crosses the wire and comes back long mode, with RAM at 4 GiB.
    @Test func aLongModeLayoutSurvivesTheHello() throws {
        for layout in [try MachineLayout(vcpus: 2, ramSize: 8 << 20, mode: .long64), try MachineLayout(vcpus: 4, ramSize: 6 << 30),
                       try MachineLayout(vcpus: 2, ramSize: 64 << 20)] {
            let hello = WireMessage.Hello(role: .bulk, sessionID: 7, layout: layout.memory, vcpuCount: UInt32(layout.vcpus),
                                          features: [])
            var decoder = WireDecoder()
            decoder.append(try WireEncoder.encode(.hello(hello)))
            guard case .hello(let received)? = try decoder.nextMessage() else {
                Issue.record("no hello decoded")
                continue
            }
            let rebuilt = try MachineLayout(vcpus: Int(received.vcpuCount), memory: try received.memoryLayout())
            #expect(rebuilt == layout)
        }
    }

    @Test func aLayoutOfNeitherModeIsRefused() throws {
        let longRAM = GuestMemoryRange(start: GuestPhysicalAddress(1 << 32), size: 8 << 20)!
        let wrongLow = try GuestMemoryLayout(regions: [GuestMemoryRange(start: GuestPhysicalAddress(0), size: 0x1_0000)!, longRAM])
        #expect(throws: MachineLayout.Invalid.self) { try MachineLayout(vcpus: 1, memory: wrongLow) }
        let elsewhere = try GuestMemoryLayout(regions: [GuestMemoryRange(start: GuestPhysicalAddress(0), size: 0x1_0000)!,
                                                        GuestMemoryRange(start: GuestPhysicalAddress(0x2000_0000), size: 8 << 20)!])
        #expect(throws: MachineLayout.Invalid.self) { try MachineLayout(vcpus: 1, memory: elsewhere) }
    }
}

@Suite("Settings the engine refuses name no CLI flag (no kernel)")
struct InvalidSettingTests {
    @Test func aRefusedSettingIsNamedByWhatItIsNotByAFlag() throws {
        let refused = #expect(throws: InvalidSetting.self) { try MachineLayout(vcpus: 0, ramSize: 1 << 20) }
        #expect(refused?.setting == .vcpus)
        #expect(refused.map { "\($0)".hasPrefix("the vCPU count must be between 1 and") } == true, "\(String(describing: refused))")
        for setting in InvalidSetting.Setting.allCases {
            #expect(!InvalidSetting(setting, "is wrong").description.contains("--"))
        }
    }
}
