import FaultlineCore
import FaultlineLinux

extension PrivateMemoryVM: PrivateMemoryKernel {
    public func setMemoryAttributes(gpa: UInt64, size: UInt64, private: Bool) throws {
        guard let range = GuestMemoryRange(start: GuestPhysicalAddress(gpa), size: size) else {
            throw ConversionError.overflow(gpa: gpa, size: size)
        }
        try setAttributes(range, private: `private`)
    }

    public func discard(offset: UInt64, length: UInt64, backing: MemorySharing) throws {
        if backing == .private { try discardPrivate(offset: offset, length: length) } else {
            try discardShared(offset: offset, length: length)
        }
    }
}
