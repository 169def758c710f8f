import FaultlineTestSupport
import Foundation
import Testing

/// The gates against made-up measurements (no kernel is asked): hiding a capability, or its
/// absence, turns off every gate that needs it; and no test in Tests/ gates on the machine
/// except through the table.
@Suite("Test gates (no kernel)")
struct GatingTests {
    /// A machine where every probe found its capability.
    static func everything(hidden: Set<Capability> = []) -> Machine {
        Machine(hidden: hidden) { .present("made up: \($0.rawValue) works") }
    }

    /// A machine where only `absent` was not found.
    static func without(_ absent: Capability) -> Machine {
        Machine { $0 == absent ? .absent("made up: no \($0.rawValue)") : .present("made up") }
    }

    /// The capabilities `entry` cannot run without: its needs and their prerequisites.
    static func closure(_ entry: TestGate) -> Set<Capability> {
        var all = Set<Capability>(), todo = entry.needs
        while let c = todo.popLast() {
            if all.insert(c).inserted { todo += c.prerequisites }
        }
        return all
    }

    @Test func theHideListNamesCapabilitiesOrAll() {
        #expect(HideList(parsing: "guest_memfd,uffd_minor").hidden == [.guestMemfd, .uffdMinor])
        #expect(HideList(parsing: " kvm , ,uffd_kernel ").hidden == [.kvm, .uffdKernel])
        #expect(HideList(parsing: "all").hidden == Set(Capability.allCases))
        #expect(HideList(parsing: nil).hidden.isEmpty && HideList(parsing: "").hidden.isEmpty)
        let typo = HideList(parsing: "guest_memfd,guestmemfd")
        #expect(typo.hidden == [.guestMemfd] && typo.unknown == ["guestmemfd"])
        #expect(Set(Capability.allCases.map(\.rawValue)).count == Capability.allCases.count)
    }

    @Test func withEverythingPresentOnlyTheGatesNeedingAnAbsenceAreOff() {
        for entry in TestGate.allCases {
            let (enabled, reason) = entry.verdict(on: Self.everything())
            #expect(enabled == entry.lacking.isEmpty, "\(entry): \(reason)")
        }
    }

    @Test(arguments: Capability.allCases)
    func hidingACapabilityTurnsOffEveryGateThatNeedsIt(capability: Capability) {
        let machine = Self.everything(hidden: [capability])
        #expect(machine.missing(capability) == "\(capability.rawValue) (hidden by FAULTLINE_TEST_HIDE)")
        for entry in TestGate.allCases {
            let (enabled, reason) = entry.verdict(on: machine)
            if Self.closure(entry).contains(capability) {
                #expect(!enabled, "\(entry) stays enabled with \(capability.rawValue) hidden")
                #expect(reason.contains("hidden by FAULTLINE_TEST_HIDE") && reason.contains(capability.rawValue), "\(entry): \(reason)")
            } else if entry.lacking.contains(capability) {
                // Hidden but really there: a test of its absence must not run.
                #expect(!enabled && reason.contains("only hidden"), "\(entry): \(reason)")
            } else {
                #expect(enabled == entry.lacking.isEmpty, "\(entry): \(reason)")
            }
        }
    }

    @Test(arguments: Capability.allCases)
    func aMissingCapabilityTurnsOffEveryGateThatNeedsItAndSaysWhatTheProbeSaw(capability: Capability) {
        let machine = Self.without(capability)
        for entry in TestGate.allCases {
            let (enabled, reason) = entry.verdict(on: machine)
            if Self.closure(entry).contains(capability) {
                #expect(!enabled, "\(entry) stays enabled without \(capability.rawValue)")
                #expect(reason.contains("made up: no \(capability.rawValue)"), "\(entry): \(reason)")
            } else if entry.lacking.contains(capability) {
                #expect(enabled == (entry.lacking == [capability]), "\(entry): \(reason)")
            }
        }
    }

    @Test func hidingAllTurnsOffEveryGateWithANeed() {
        let machine = Self.everything(hidden: HideList(parsing: "all").hidden)
        for entry in TestGate.allCases where !entry.needs.isEmpty {
            #expect(!entry.verdict(on: machine).enabled, "\(entry)")
        }
    }

    @Test func aPrerequisiteHiddenIsNamedInTheReason() {
        let (enabled, reason) = TestGate.guestMemfdBaselines.verdict(on: Self.everything(hidden: [.guestMemfd]))
        #expect(!enabled)
        #expect(reason == "needs guest_memfd_init_shared (needs guest_memfd_mmap (needs guest_memfd (hidden by FAULTLINE_TEST_HIDE)))",
                "\(reason)")
    }
}

/// Reads the test sources: every condition on the machine goes through `.gate(...)`, and
/// every entry of the table gates exactly one test or suite.
@Suite("Test gates in the sources (no kernel)")
struct GatesInTheSourcesTests {
    /// Tests/, found from this file.
    static let testsFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()

    /// Conditions that are not about the machine's kernel, allowed as plain `.enabled(if:)`:
    /// the rig's own switches (the rig suites test kernels inside QEMU) and a CPU instruction.
    static let allowedConditions = [
        "Rig.requested && !Rig.insideRig", "Rig.hasKernel", "Rig.hasReleaseBinary", "Rig.releaseBinaryIsCurrent",
        "FileManager.default.fileExists(atPath: Rig.userfaultKernel.path)",
        "FileManager.default.fileExists(atPath: Rig.gmemUffdKernel.path)",
        #"ProcessInfo.processInfo.environment["FAULTLINE_INSIDE_RIG"] == "1""#,
        "CRC32C.usesHardware",
    ]

    /// Every test source but the gate module's own and this file's, with its text.
    static func sources() throws -> [(path: String, text: String)] {
        let fm = FileManager.default
        guard let files = fm.enumerator(atPath: testsFolder.path) else { return [] }
        var found: [(String, String)] = []
        for case let file as String in files where file.hasSuffix(".swift") {
            if file.hasPrefix("FaultlineTestSupport/") || file.hasPrefix("FaultlineTestSupportTests/") { continue }
            found.append((file, try String(contentsOf: testsFolder.appendingPathComponent(file), encoding: .utf8)))
        }
        return found
    }

    @Test func everyConditionOnTheMachineGoesThroughTheTable() throws {
        let sources = try Self.sources()
        #expect(sources.count > 20, "found only \(sources.count) test files under \(Self.testsFolder.path)")
        for (path, text) in sources {
            for (number, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
                for marker in [".enabled(if:", ".disabled(if:", ".enabled(\"", ".disabled(\"", ".enabled {", ".disabled {"] {
                    var rest = line[...]
                    while let r = rest.range(of: marker) {
                        rest = rest[r.upperBound...]
                        let condition = rest.trimmingCharacters(in: .whitespaces)
                        let allowed = marker.hasSuffix("if:") && Self.allowedConditions.contains { condition.hasPrefix($0 + ",") }
                        #expect(allowed, "\(path):\(number + 1) gates on the machine without the table (use .gate(...)): \(line)")
                    }
                }
            }
        }
    }

    @Test func everyEntryGatesExactlyOneTestOrSuite() throws {
        let text = try Self.sources().map(\.text).joined(separator: "\n")
        for entry in TestGate.allCases {
            let uses = text.components(separatedBy: ".gate(.\(entry.rawValue))").count - 1
            #expect(uses == 1, "TestGate.\(entry.rawValue) gates \(uses) declarations")
        }
    }
}
