import CFaultlineShim

/// The SIGBUS handler of software vCPUs (userfaultfd with UFFD_FEATURE_SIGBUS): an access to
/// a missing page raises SIGBUS on the faulting thread, and the handler calls the resolver
/// registered for that thread with the fault address. When it returns true the page is
/// there and the access is retried; otherwise the default action (termination) runs.
///
/// A resolver runs inside a signal handler: it must not allocate or take locks.
public final class SigbusResolver: @unchecked Sendable {
    @usableFromInline let resolve: (UInt64) -> Bool

    /// `resolve` gets the faulting address; true = resolved.
    public init(_ resolve: @escaping (UInt64) -> Bool) { self.resolve = resolve }

    /// Installs the process-wide SIGBUS handler (SA_SIGINFO | SA_NODEFER).
    public static func installHandler() throws(SystemError) {
        try systemCall("sigaction SIGBUS") { fl_sigbus_install() }
    }

    /// Runs `body` with this resolver registered for the calling thread (it is unregistered
    /// afterwards, and kept alive until then).
    public func whileRegistered<T>(_ body: () throws -> T) rethrows -> T {
        fl_sigbus_set_thread_resolver({ context, address in
            let resolver = Unmanaged<SigbusResolver>.fromOpaque(context!).takeUnretainedValue()
            return resolver.resolve(address) ? 0 : -1
        }, Unmanaged.passUnretained(self).toOpaque())
        defer {
            fl_sigbus_set_thread_resolver(nil, nil)
            withExtendedLifetime(self) {}
        }
        return try body()
    }
}
