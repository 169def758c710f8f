import CFaultlineShim
import FaultlineCore
#if canImport(Glibc)
import Glibc
#endif

/// What one attempt to fill a page came to, for a resolver that also reads the events.
public enum UffdAttempt: Equatable, Sendable {
    /// This call mapped the page (and woke its waiters).
    case installed
    /// The page was already there (EEXIST); waiters were woken by whoever mapped it.
    case alreadyPresent
    /// EAGAIN: the mapping is changing - a REMOVE (or UNMAP) event is queued and not yet read,
    /// or its madvise has not finished. Read the events, then try again.
    case retryAfterEvents
    /// The memory is gone (ENOENT: no longer mapped or registered; ESRCH: its process exited).
    case memoryGone
}

extension Userfaultfd {
    // Single-attempt fills for a server that reads its own events. `install` (Userfaultfd.swift)
    // retries EAGAIN until it passes, which is right when another thread reads the events;
    // a single-threaded page server must instead go back and read the queued REMOVE, or it
    // would wait on itself. Each call fills one page, so there is no partial progress to
    // carry over.

    @inlinable
    func attempt(_ name: StaticString, at address: HostAddress, length: UInt64, _ body: () -> Int32) throws(SystemError) -> UffdAttempt {
        while true {
            if body() == 0 { return .installed }
            let code = fl_errno()
            switch code {
            case EEXIST: return .alreadyPresent
            case EAGAIN: return .retryAfterEvents
            case ENOENT, ESRCH: return .memoryGone
            case EINTR: continue
            default: throw SystemError("\(name) \(address)+\(length)", errno: code)
            }
        }
    }

    /// UFFDIO_COPY of one page (`length` = its size) from `source`, waking its waiters.
    @inlinable
    public func attemptCopy(to destination: HostAddress, from source: UnsafeRawPointer, length: UInt64) throws(SystemError) -> UffdAttempt {
        let src = UInt64(UInt(bitPattern: source))
        return try attempt("UFFDIO_COPY", at: destination, length: length) {
            var c = fl_uffdio_copy(dst: destination.rawValue, src: src, len: length, mode: 0, copy: 0)
            return fd.ioctl(FL_UFFDIO_COPY, &c)
        }
    }

    /// UFFDIO_ZEROPAGE of one page (not for hugetlb: copy zeros there), waking its waiters.
    @inlinable
    public func attemptZeroPage(at address: HostAddress, length: UInt64) throws(SystemError) -> UffdAttempt {
        try attempt("UFFDIO_ZEROPAGE", at: address, length: length) {
            var z = fl_uffdio_zeropage(range: fl_uffdio_range(start: address.rawValue, len: length), mode: 0, zeropage: 0)
            return fd.ioctl(FL_UFFDIO_ZEROPAGE, &z)
        }
    }

    /// UFFDIO_POISON of one page: its accesses get SIGBUS (a page with no content to give).
    public func attemptPoison(at address: HostAddress, length: UInt64) throws(SystemError) -> UffdAttempt {
        try attempt("UFFDIO_POISON", at: address, length: length) {
            var p = fl_uffdio_poison(range: fl_uffdio_range(start: address.rawValue, len: length), mode: 0, updated: 0)
            return fd.ioctl(FL_UFFDIO_POISON, &p)
        }
    }
}
