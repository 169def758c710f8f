import CFaultlineShim
import FaultlineCore
#if canImport(Glibc)
import Glibc
#endif

/// Userfaultfd messages read straight into memory the caller provides - memory shared with
/// another process, so that what a read took off the queue survives the reader's death.
///
/// The kernel completes an event (a REMOVE's madvise goes on) as the read takes it off the
/// queue, so a reader that dies before acting on it loses it for good unless the message was
/// already somewhere durable. read(2) copies each message into this buffer before returning,
/// and a process is only killed on its way back to user mode: once `read` returns, the
/// messages are in the shared bytes. A slot whose event byte is 0 is empty (every event the
/// kernel sends is non-zero); `clear` empties slots once they are acted on.
public struct UffdLandingBuffer: @unchecked Sendable {
    /// Bytes per message (struct uffd_msg).
    public static let messageSize = MemoryLayout<fl_uffd_msg>.stride
    @usableFromInline let messages: UnsafeMutablePointer<fl_uffd_msg>
    public let capacity: Int

    /// Over `capacity` messages at `base` (`capacity * messageSize` bytes, 8-byte aligned,
    /// populated: a read into a page that faults could fail and drop the events it took).
    public init(base: UnsafeMutableRawPointer, capacity: Int) {
        precondition(capacity > 0 && UInt(bitPattern: base) % 8 == 0, "landing buffer: capacity \(capacity) at \(base)")
        messages = base.bindMemory(to: fl_uffd_msg.self, capacity: capacity)
        self.capacity = capacity
    }

    /// One read(2) of up to `capacity` messages from `uffd` into the slots from 0; the count
    /// read (0 when none is pending).
    @inlinable
    public func read(from uffd: Userfaultfd) throws(SystemError) -> Int {
        try uffd.readEvents(into: UnsafeMutableBufferPointer(start: messages, count: capacity))
    }

    /// The event in slot `index`; nil when the slot is empty.
    @inlinable
    public subscript(index: Int) -> UffdEvent? {
        messages[index].event == 0 ? nil : UffdEvent(messages[index])
    }

    /// Empties slots 0..<count (after what they held has been acted on).
    @inlinable
    public func clear(count: Int) {
        for i in 0..<min(count, capacity) { messages[i].event = 0 }
    }
}
