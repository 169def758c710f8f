// libFuzzer entry point for the wire decoder (built by fuzz/run.sh; see docs/fuzzing.md).
//
// Input: byte 0 chooses how the rest is fed (chunk sizes, append flavour, checksum
// repair; see `FeedPlan`), bytes 1... are the received stream. The stream is decoded
// twice - handed over whole, and in chunks as a socket delivers it - and both runs must
// yield the same messages and errors at the same stream offsets. Every decoded message
// must then survive `Invariants.check`. Thrown `WireError`s are fine; a trap is a finding.
import FaultlineCore

@_cdecl("LLVMFuzzerTestOneInput")
public func wireDecoderFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size > 0 else { return 0 }
    let plan = FeedPlan(data[0])
    var stream = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    if plan.repairsChecksums { ChecksumRepair.repair(&stream) }

    let whole = stream.withUnsafeBytes { DecodeRun.whole($0) }
    let chunked = stream.withUnsafeBytes { DecodeRun.chunked($0, plan: plan) }
    guard whole == chunked else {
        fatalError("whole-buffer and chunked decoding disagree:\n  whole:   \(whole)\n  chunked: \(chunked)")
    }
    stream.withUnsafeBytes { raw in
        for step in whole.steps {
            if case .success(let message) = step.result {
                Invariants.check(message, frame: UnsafeRawBufferPointer(rebasing: raw[step.frame]))
            } else if case .failure(let error) = step.result {
                _ = error.description
            }
        }
    }
    return 0
}
