import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The process harness itself: a hung child fails its test instead of hanging the suite.
@Suite("CLI test harness")
struct HarnessTests {
    /// Whether `pid` is gone (or a zombie waiting for a parent that is not us) within 2 s.
    func isDead(_ pid: pid_t) -> Bool {
        let end = ContinuousClock.now + .seconds(2)
        repeat {
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { return true }
            if stat[stat.index(close, offsetBy: 2)...].hasPrefix("Z") { return true }
            usleep(20_000)
        } while ContinuousClock.now < end
        return false
    }

    @Test func aChildPastItsTimeoutIsKilledWithWhatItStarted() throws {
        let started = ContinuousClock.now
        var result: CLIRun?
        // It ignores SIGTERM (and so does the grandchild it starts), so only SIGKILL ends them.
        try withKnownIssue {
            result = try run(executable: "/bin/sh", arguments: ["-c", "trap '' TERM; sleep 30 & echo $!; wait"], timeout: 1)
        } matching: { issue in
            issue.comments.contains { $0.rawValue.contains("ran past its 1 s timeout; killed") }
        }
        let elapsed = ContinuousClock.now - started
        let r = try #require(result)
        #expect(r.timedOut)
        #expect(elapsed < .seconds(4.5), "took \(elapsed)")
        #expect(r.status == 128 + SIGKILL)
        let grandchild = try #require(pid_t(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)), "\(r.stdout)")
        #expect(isDead(grandchild), "the grandchild \(grandchild) still runs")
    }

    @Test func aGrandchildInItsOwnProcessGroupIsKilledToo() throws {
        // `setsid` puts the sleeper in a new session, out of the child's process group (as
        // Foundation's Process does with `faultline receive` under `faultline demo`).
        var result: CLIRun?
        withKnownIssue {
            result = try run(executable: "/bin/sh", arguments: ["-c", "setsid sleep 30 & echo $!; wait"], timeout: 1)
        }
        let r = try #require(result)
        #expect(r.timedOut)
        let grandchild = try #require(pid_t(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)), "\(r.stdout)")
        #expect(isDead(grandchild), "the grandchild \(grandchild) still runs")
    }

    @Test func bothStreamsAreReadWhileTheChildRuns() throws {
        // 1 MiB to stderr before anything to stdout: reading stdout first would deadlock.
        let r = try run(executable: "/bin/sh", arguments: ["-c", "head -c 1048576 /dev/zero >&2; echo done; exit 3"], timeout: 30)
        #expect(!r.timedOut)
        #expect(r.status == 3)
        #expect(r.stdout == "done\n")
        #expect(r.stderr.utf8.count == 1 << 20)
    }

    @Test func aLongRunningChildIsReadLineByLineThenFinished() throws {
        let child = try Child(executable: "/bin/sh", arguments: ["-c", "echo first; sleep 0.2; echo second >&2; echo third"])
        #expect(child.readLine(timeout: 10) == "first")
        #expect(child.readLine(timeout: 10) == "third")
        #expect(child.readLine(timeout: 10) == nil, "end of output")
        let r = child.finish(timeout: 10)
        #expect(r.status == 0 && !r.timedOut)
        #expect(r.stdout == "first\nthird\n" && r.stderr == "second\n")
    }

    @Test func aChildThatPrintsNothingGivesNoLine() throws {
        let child = try Child(executable: "/bin/sh", arguments: ["-c", "exec sleep 30"])
        let started = ContinuousClock.now
        #expect(child.readLine(timeout: 0.5) == nil)
        #expect(ContinuousClock.now - started < .seconds(2))
        let pid = child.pid
        child.kill()
        #expect(isDead(pid))
    }

    @Test func killingAChildSparesTheChildrenOtherTestsAreStarting() throws {
        // A child being spawned holds every descriptor of this process until its exec closes
        // them, another test's output pipes included: it must not be taken for a process that
        // holds that test's output, and killed with its child (it died of SIGTERM before its exec,
        // having printed nothing).
        let done = DispatchSemaphore(value: 0)
        Thread {
            for _ in 0..<20 { (try? Child(executable: "/bin/sh", arguments: ["-c", "exec sleep 30"]))?.kill() }
            done.signal()
        }.start()
        var runs: [CLIRun] = []
        while done.wait(timeout: .now()) == .timedOut {
            runs.append(try run(executable: "/bin/sh", arguments: ["-c", "echo ok"], timeout: 30))
        }
        let hurt = runs.filter { $0.status != 0 || $0.stdout != "ok\n" }
        #expect(hurt.isEmpty, "\(hurt.count) of \(runs.count) children ended \(hurt.map(\.status))")
    }

    @Test func aMissingExecutableIsAnError() {
        #expect(throws: HarnessError.self) { _ = try run(executable: "/nonexistent/faultline", arguments: [], timeout: 5) }
    }
}
