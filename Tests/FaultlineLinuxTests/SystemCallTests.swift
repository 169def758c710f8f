import FaultlineLinux
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `systemCall`: one helper for every integer a system call returns, EINTR retried unless
/// asked not to, and errors that name the operation and the errno.
@Suite("The system call helper")
struct SystemCallTests {
    @Test func eintrRunsTheCallAgainUntilItAnswers() throws {
        var calls = 0
        let n: Int = try systemCall("read something") {
            calls += 1
            if calls < 3 { errno = EINTR; return -1 }
            return 42
        }
        #expect(n == 42 && calls == 3)
    }

    @Test func eintrIsAnErrorWhereTheCallerSaysSo() {
        var calls: Int32 = 0
        #expect(throws: SystemError("KVM_RUN vcpu 0", errno: EINTR)) {
            try systemCall("KVM_RUN vcpu 0", retryOnInterrupt: false) { () -> Int32 in
                calls += 1
                errno = EINTR
                return -1
            }
        }
        #expect(calls == 1)
    }

    @Test func aFailureNamesTheOperationAndTheErrno() {
        var byte: UInt8 = 0
        do {
            _ = try systemCall("read fd -1") { read(-1, &byte, 1) }  // ssize_t
            Issue.record("a read of fd -1 succeeded")
        } catch {
            #expect(error == SystemError("read fd -1", errno: EBADF))
            #expect(error.description == "read fd -1: EBADF (Bad file descriptor)")
        }
        #expect(throws: SystemError("close fd -1", errno: EBADF)) { try systemCall("close fd -1") { close(-1) } }  // int
    }
}
