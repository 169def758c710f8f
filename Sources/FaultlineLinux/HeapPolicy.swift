import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// How the C allocator gets and returns memory, for processes whose guest memory faults
/// are resolved by threads of their own.
///
/// Every `mmap`, `munmap`, `mprotect` and `brk` takes the process's mmap lock for writing.
/// A writer waits for every reader - among them a vCPU thread in the middle of a page fault
/// on guest memory, which during post-copy runs at the lowest priority and can sit preempted
/// for a scheduler tick - and every later reader, the other vCPUs' faults included, queues
/// behind the writer. A fault-path thread that frees a large buffer would be such a writer.
///
/// So, as real-time Linux programs do: no allocation is served by its own `mmap` (it would
/// be unmapped again on free), freed memory is kept, and the heap grows in large steps.
public enum HeapPolicy {
    /// Extra bytes the heap grows by whenever it must grow.
    public static let growthStep = 64 << 20

    /// Applies the policy to the whole process (call once, before threads start). Throws when
    /// the C library refuses it.
    public static func keepHeapForFaultPath() throws(SystemError) {
        if fl_malloc_keep_heap(growthStep) != 0 {
            throw SystemError("mallopt M_MMAP_MAX/M_TRIM_THRESHOLD/M_TOP_PAD", errno: EINVAL)
        }
    }

    /// Allocations now served by a mapping of their own (0 once the policy holds, for
    /// allocations made after it).
    public static var mappedChunks: Int { Int(fl_malloc_mapped_chunks()) }
}
