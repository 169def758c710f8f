import FaultlineTestSupport
import Foundation
import Testing

/// `--fault-mode` on the command line: the spellings, and the probe's verdict in `probe`.
@Suite("--fault-mode (CLI)", .serialized)
struct FaultModeCLITests {
    @Test("modes without a migration fault path are usage errors naming the choices",
          arguments: [["receive"], ["demo"]], ["none", "prefilled", "bogus"])
    func notAFaultMode(command: [String], mode: String) throws {
        let r = try run(command + ["--fault-mode", mode])
        #expect(r.status == 64, "\(command) \(mode): exit \(r.status)")
        #expect(r.stderr.contains("auto"), "\(r.stderr)")
        #expect(r.stderr.contains("uffd-missing"), "\(r.stderr)")
    }

    @Test("the help shows auto as the default", arguments: ["receive", "demo"])
    func helpShowsAuto(command: String) throws {
        let r = try run([command, "--help"])
        #expect(r.stdout.contains("default: auto"), "\(r.stdout)")
    }

    @Test("probe shows the vCPU fault verdict and what auto picks", .gate(.probeShowsTheFaultVerdict))
    func probeShowsTheVerdict() throws {
        let r = try run(["probe"])
        #expect(r.status == 0)
        #expect(r.stdout.contains("vCPU fault on missing RAM"), "\(r.stdout)")
        #expect(r.stdout.contains("Migration --fault-mode auto: "), "\(r.stdout)")
        let j = lastJSON(try run(["probe", "--json"]).stdout)
        let mode = j?["fault_mode_auto"] as? String ?? ""
        let reason = j?["fault_mode_auto_reason"] as? String ?? ""
        #expect(["vcpu-exit", "uffd-missing", "uffd-minor"].contains(mode), "\(mode)")
        #expect(reason.hasPrefix("auto: "), "\(reason)")
    }
}
