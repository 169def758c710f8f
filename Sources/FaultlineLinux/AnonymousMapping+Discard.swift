import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

extension AnonymousMapping {
    /// madvise(MADV_DONTNEED) over `length` bytes from `offset`: the pages are dropped and read
    /// back as zeros - or, in a range registered with a userfaultfd, fault again (a balloon
    /// inflating does this; with UFFD_FEATURE_EVENT_REMOVE the handler is told first, and this
    /// call waits until it has read the event).
    public func discard(offset: Int, length: Int) throws(SystemError) {
        try systemCall("madvise DONTNEED \(label) +\(offset) \(length)") { madvise(base + offset, length, MADV_DONTNEED) }
    }
}
