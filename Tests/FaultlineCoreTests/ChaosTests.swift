import FaultlineCore
import Testing

@Suite("Chaos schedules and the proxy's decisions")
struct ChaosTests {
    /// Encodes `message` as the frame the proxy would see.
    func frame(_ message: WireMessage) throws -> [UInt8] { try WireEncoder.encode(message) }

    func hello(session: UInt64, role: ConnectionRole = .bulk) -> WireMessage {
        .hello(WireMessage.Hello(role: role, sessionID: session, pageSize: 4096,
                                 layout: [MemoryRegionDescriptor(guestPhysicalAddress: 0, size: 1 << 20)],
                                 vcpuCount: 1, features: .supported))
    }

    func pages(_ indices: [UInt64], zero: Bool = false) -> WireMessage {
        .pages(PageBatch(pageSize: 4096, pages: indices.map { ($0, zero ? nil : [UInt8](repeating: 7, count: 4096)) }))
    }

    func decide(_ tracker: inout ChaosTracker, _ message: WireMessage, role: ConnectionRole = .bulk,
                direction: ChaosDirection = .toDestination) throws -> ChaosTracker.Decision {
        try frame(message).withUnsafeBytes { tracker.decide(role: role, direction: direction, frame: $0) }
    }

    @Test func theSameSeedGivesTheSameSchedule() {
        for seed in UInt64(0)..<200 {
            let a = ChaosSchedule.generate(seed: seed, vcpus: 2), b = ChaosSchedule.generate(seed: seed, vcpus: 2)
            #expect(a == b)
            #expect((1...3).contains(a.events.count))
            #expect((0...2).contains(a.retries))
        }
        #expect(ChaosSchedule.generate(seed: 1, vcpus: 2) != ChaosSchedule.generate(seed: 2, vcpus: 2))
    }

    @Test func fiftySchedulesReachEveryPhaseDirectionAndAction() {
        let events = (UInt64(1)...50).flatMap { ChaosSchedule.generate(seed: $0, vcpus: 2).events }
        for phase in [MigrationPhase.precopy, .switchover, .postcopy, .completion] {
            #expect(events.contains { $0.phase == phase }, "no event in \(phase)")
        }
        for direction in ChaosDirection.allCases { #expect(events.contains { $0.direction == direction }) }
        for action in ChaosAction.allCases { #expect(events.contains { $0.action == action }, "no \(action)") }
        #expect(events.contains { $0.role == .fault })
    }

    @Test func eventSpecsRoundTrip() throws {
        let e = ChaosEvent(phase: .postcopy, role: .fault, direction: .toSource, frame: 3, action: .flipHeaderBit, bit: 77)
        #expect(ChaosEvent(spec: e.spec) == e)
        #expect(ChaosEvent(spec: "completion:bulk:to_source:0:cut") ==
                ChaosEvent(phase: .completion, role: .bulk, direction: .toSource, frame: 0, action: .cut))
        for bad in ["", "precopy:bulk:to_source:0", "later:bulk:to_source:0:cut", "precopy:disk:to_source:0:cut",
                    "precopy:bulk:sideways:0:cut", "precopy:bulk:to_source:-1:cut", "precopy:bulk:to_source:0:explode",
                    "precopy:bulk:to_source:0:cut:x"] {
            #expect(ChaosEvent(spec: bad) == nil, "accepted \(bad)")
        }
    }

    @Test func phasesFollowTheBulkStreamAndTheCommitCountsAsAfter() throws {
        var t = ChaosTracker(schedule: ChaosSchedule(seed: 0, events: [], retries: 0))
        _ = try decide(&t, hello(session: 9))
        #expect(t.phase == .handshake && t.attempts == 1)
        _ = try decide(&t, pages([20]))
        #expect(t.phase == .precopy)
        _ = try decide(&t, .vcpuState(id: 0, blob: [1, 2]))
        #expect(t.phase == .switchover)
        _ = try decide(&t, .ack(SessionAck.ready), direction: .toSource)
        #expect(t.phase == .switchover)
        _ = try decide(&t, .ack(SessionAck.commit))
        #expect(t.phase == .postcopy)
        _ = try decide(&t, hello(session: 9))  // a reconnect of the same session
        #expect(t.phase == .postcopy && t.attempts == 1)
        _ = try decide(&t, .digest(algorithm: .pageCRC32CXor, bytes: [UInt8](repeating: 0, count: 8)))
        #expect(t.phase == .completion)
        _ = try decide(&t, hello(session: 10))  // a new attempt
        #expect(t.phase == .handshake && t.attempts == 2)
    }

    @Test func anEventFiresOnceOnItsFrameAndCountsItsAttempt() throws {
        let cut = ChaosEvent(phase: .precopy, role: .bulk, direction: .toDestination, frame: 2, action: .cut)
        var t = ChaosTracker(schedule: ChaosSchedule(seed: 0, events: [cut], retries: 1))
        _ = try decide(&t, hello(session: 1))
        #expect(try decide(&t, pages([20])) == .forward)
        #expect(try decide(&t, pages([21])) == .forward)
        #expect(try decide(&t, pages([22])) == .cut(both: false))
        #expect(try decide(&t, pages([23])) == .forward)
        #expect(t.fired.map(\.attempt) == [1])
        #expect(t.disturbedAttemptsBeforeCommit == 1)
        #expect(t.unfired.isEmpty)
    }

    @Test func pageDataFlipsLandInPageBytesAndWaitForADataPage() throws {
        let flip = ChaosEvent(phase: .precopy, role: .bulk, direction: .toDestination, frame: 0, action: .flipPageDataBit, bit: 12345)
        var t = ChaosTracker(schedule: ChaosSchedule(seed: 0, events: [flip], retries: 0))
        _ = try decide(&t, hello(session: 1))
        #expect(try decide(&t, pages([20, 21], zero: true)) == .forward)  // zero markers carry no data
        let bytes = try frame(pages([30, 31]))
        let decision = bytes.withUnsafeBytes { t.decide(role: .bulk, direction: .toDestination, frame: $0) }
        guard case .flip(let offset, let mask) = decision else { Issue.record("no flip: \(decision)"); return }
        #expect(mask.nonzeroBitCount == 1)
        // Header 20, page size 4, descriptor 16: page 30's data is 40..<4136, page 31's 4152..<8248.
        #expect((40..<4136).contains(offset) || (4152..<8248).contains(offset))
        var damaged = bytes
        damaged[offset] ^= mask
        var decoder = WireDecoder()
        decoder.append(damaged)
        #expect(throws: WireError.self) { _ = try decoder.nextMessage() }
    }

    @Test func controlFlipsAvoidPageDataAndHeaderFlipsStayInTheHeader() throws {
        let p = try frame(pages([30]))
        let control = p.withUnsafeBytes { raw in
            ChaosFrameLayout.controlRanges(type: WireProtocol.MessageType.pages.rawValue,
                                           payload: UnsafeRawBufferPointer(rebasing: raw[WireProtocol.headerSize...]))
        }
        #expect(control == [0..<4, 4..<20])
        for bit in UInt64(0)..<400 {
            guard case .flip(let offset, _) = ChaosTracker.flip(bit: bit, in: 0..<WireProtocol.headerSize) else {
                Issue.record("no flip"); return
            }
            #expect(offset < WireProtocol.headerSize)
        }
        // Any single flipped bit of any frame is detected by the decoder.
        for (i, message) in [pages([30]), .ack(SessionAck.commit), .complete, hello(session: 3)].enumerated() {
            let bytes = try frame(message)
            for bit in stride(from: UInt64(i), to: UInt64(bytes.count * 8), by: 97) {
                var damaged = bytes
                damaged[Int(bit / 8)] ^= UInt8(1) << (bit % 8)
                var decoder = WireDecoder()
                decoder.append(damaged)
                #expect(throws: WireError.self, "bit \(bit) of \(message.type)") { _ = try decoder.nextMessage() }
            }
        }
    }
}
