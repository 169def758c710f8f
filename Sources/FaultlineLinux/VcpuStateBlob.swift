import CFaultlineShim
#if canImport(Glibc)
import Glibc
#endif

/// A vCPU's architectural state as opaque bytes, to move it to another host running the
/// same kernel ABI: kvm_regs then kvm_sregs, as the kernel lays them out.
extension Vcpu {
    /// Bytes in a state blob.
    public static let stateBlobSize = MemoryLayout<fl_kvm_regs>.size + MemoryLayout<fl_kvm_sregs>.size

    /// The registers and special registers (KVM_GET_REGS, KVM_GET_SREGS).
    public func stateBlob() throws(SystemError) -> [UInt8] {
        var regs = try abiRegisters()
        var sregs = try specialRegisters()
        var blob = [UInt8]()
        blob.reserveCapacity(Self.stateBlobSize)
        withUnsafeBytes(of: &regs) { blob.append(contentsOf: $0) }
        withUnsafeBytes(of: &sregs) { blob.append(contentsOf: $0) }
        return blob
    }

    /// Loads a blob from `stateBlob()` (special registers first, then registers).
    public func loadStateBlob(_ blob: [UInt8]) throws(SystemError) {
        let split = MemoryLayout<fl_kvm_regs>.size
        guard blob.count == Self.stateBlobSize else {
            throw SystemError("vCPU \(id) state of \(blob.count) bytes (expected \(Self.stateBlobSize))", errno: EINVAL)
        }
        var regs = fl_kvm_regs()
        var sregs = fl_kvm_sregs()
        blob.withUnsafeBytes { raw in
            withUnsafeMutableBytes(of: &regs) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[0..<split])) }
            withUnsafeMutableBytes(of: &sregs) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[split...])) }
        }
        try setSpecialRegisters(sregs)
        try setABIRegisters(regs)
    }
}
