import FaultlineLinux
import FaultlineTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("PM QoS CPU latency requests")
struct CPULatencyRequestTests {
    @Test(.gate(.cpuLatencyRequest))
    func aRequestHoldsEveryCPUToItsLatencyWhileItLives() throws {
        // The device reads back the system-wide limit: the smallest request held. Other tests
        // may hold requests of their own at the same time, so only "at most" can be asserted.
        let request = try CPULatencyRequest(microseconds: 0)
        #expect(request.microseconds == 0)
        #expect(try CPULatencyRequest.current() == 0)
        withExtendedLifetime(request) {}
    }

    @Test func aMissingDeviceIsAnErrorThatNamesTheOperation() {
        #expect {
            _ = try CPULatencyRequest(microseconds: 0, path: "/nonexistent/cpu_dma_latency")
        } throws: { error in
            let e = error as? SystemError
            return e?.errno == ENOENT && e?.operation == "open /nonexistent/cpu_dma_latency"
        }
    }

    @Test func aNegativeLatencyIsRefusedBeforeAnythingIsOpened() {
        #expect {
            _ = try CPULatencyRequest(microseconds: -1, path: "/nonexistent/cpu_dma_latency")
        } throws: { error in (error as? SystemError)?.errno == EINVAL }
    }
}
