import FaultlineCore
import FaultlineLinux

/// The vcpu-exit fault path, shared by the benchmark and the migration destination: a guest
/// access to RAM that is not there yet came back from KVM_RUN (an MMIO exit at a RAM
/// address on an emulated vCPU, or a memory-fault exit). `resolve` makes the page(s)
/// present; then the access is completed here - the written bytes stored, or the read
/// answered - and the vCPU can re-enter. Returns false when `exit` is not such an access.
@inlinable
func completeRAMAccess(_ exit: VcpuExit, vcpu: Vcpu, ramBase: UInt64, ram: UnsafeMutableRawPointer, ramSize: UInt64,
                       resolve: (_ offset: UInt64) throws -> Void) rethrows -> Bool {
    switch exit {
    case .mmio(let address, let length, let isWrite, let data)
        where address.rawValue >= ramBase && address.rawValue - ramBase < ramSize:
        let offset = address.rawValue - ramBase
        try resolve(offset)
        let last = offset + UInt64(max(length, 1)) - 1
        if last >> 12 != offset >> 12 && last < ramSize { try resolve(last) }  // an access across two pages
        let host = ram + Int(offset)
        if isWrite {
            withUnsafeBytes(of: data.littleEndian) { host.copyMemory(from: $0.baseAddress!, byteCount: Int(min(length, 8))) }
        } else {
            vcpu.completeMMIORead(from: host, length: Int(length))
        }
        return true
    case .memoryFault(let address, _, _) where address.rawValue >= ramBase && address.rawValue - ramBase < ramSize:
        try resolve(address.rawValue - ramBase)
        return true
    default:
        return false
    }
}
