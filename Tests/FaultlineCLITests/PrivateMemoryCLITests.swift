import FaultlineTestSupport
import Testing

@Suite("faultline private / bench conversions (CLI)", .serialized)
struct PrivateMemoryCLITests {
    @Test(arguments: [
        (["private", "--discard", "sometimes"], "unknown --discard 'sometimes'"),
        (["private", "--pages", "16"], "--pages 16 and --region-pages 16"),
        (["private", "--discard", "lazy", "--batch", "0"], "--batch must be at least 1"),
        (["bench", "conversions", "--shared-backing", "hugetlb"], "unknown --shared-backing 'hugetlb'"),
        (["private", "--conversions=-1"], "--conversions must be >= 0"),
    ])
    func badOptionsAreRefusedClearly(args: [String], message: String) throws {
        let r = try run(args)
        #expect(r.status == 2, "\(args): exit \(r.status)")
        #expect(r.stderr.contains(message), "\(args): \(r.stderr)")
    }

    /// Only where /dev/kvm has no private memory (run inside the rig for the real thing).
    @Test(.gate(.privateMemoryCLIRefusedWithoutIt))
    func refusesWithoutMemoryAttributes() throws {
        for args in [["private"], ["bench", "conversions", "--discard", "eager"]] {
            let r = try run(args)
            #expect(r.status == 2)
            #expect(r.stderr.contains("private memory needs KVM_X86_SW_PROTECTED_VM"), "\(r.stderr)")
            #expect(r.stderr.contains("KVM_CAP_MEMORY_ATTRIBUTES with KVM_MEMORY_ATTRIBUTE_PRIVATE (here: 0)"), "\(r.stderr)")
            #expect(r.stdout.isEmpty)
        }
    }
}
