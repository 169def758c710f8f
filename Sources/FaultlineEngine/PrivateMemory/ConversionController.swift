import FaultlineCore

/// What the conversion logic needs from the kernel: the protocol seam between the pure
/// decisions (range map, discard planner) and KVM. ``PrivateMemoryVM`` is the real one;
/// tests use a fake that models the two backings.
public protocol PrivateMemoryKernel: AnyObject {
    /// KVM_SET_MEMORY_ATTRIBUTES over `size` bytes at `gpa`.
    func setMemoryAttributes(gpa: UInt64, size: UInt64, private: Bool) throws
    /// Gives back the `backing` of `length` bytes at region offset `offset`.
    func discard(offset: UInt64, length: UInt64, backing: MemorySharing) throws
}

/// Counts and the time spent in each part of the conversions, nanoseconds.
public struct ConversionCosts: Sendable, Equatable {
    /// Conversions that changed state (one KVM_SET_MEMORY_ATTRIBUTES each).
    public var conversions = 0
    /// Requests for a range already in the asked state (no ioctl).
    public var unchanged = 0
    /// Requests refused (bad range or attributes): the guest got -KVM_EINVAL.
    public var refused = 0
    /// Conversions asked for by KVM_EXIT_MEMORY_FAULT rather than the hypercall.
    public var implicitConversions = 0
    public var attributeNanoseconds: UInt64 = 0
    public var discardCalls = 0
    public var discardNanoseconds: UInt64 = 0
    public var discardedPrivatePages: UInt64 = 0
    public var discardedSharedPages: UInt64 = 0
    public init() {}
}

/// A KVM_EXIT_MEMORY_FAULT that is not a conversion request Faultline can honour.
public struct MemoryFaultRefusal: Error, CustomStringConvertible {
    public let description: String
}

/// Applies conversions: validates them against the range map (clear errors for a range
/// outside memory, unaligned, empty), sets the kernel's attributes, updates the map, and
/// performs the discards the policy asks for. One owner (the vCPU thread) drives it.
public final class ConversionController {
    public private(set) var map: SharingMap
    public private(set) var planner: DiscardPlanner
    /// Every discard performed, for exact content expectations.
    public var ledger = ContentLedger()
    public private(set) var costs = ConversionCosts()
    /// The last refusal handed back to the guest, in words.
    public private(set) var lastRefusal: String?
    let kernel: PrivateMemoryKernel
    let clock: () -> UInt64

    public init(map: SharingMap, policy: DiscardPolicy, kernel: PrivateMemoryKernel, clock: @escaping () -> UInt64) {
        self.map = map
        self.planner = DiscardPlanner(policy: policy)
        self.kernel = kernel
        self.clock = clock
    }

    /// Converts `size` bytes at `gpa` to `target`. Throws ``ConversionError`` (nothing
    /// changed) or the kernel's error. Returns the page ranges that changed.
    @discardableResult
    public func convert(gpa: UInt64, size: UInt64, to target: MemorySharing) throws -> [Range<UInt64>] {
        let range = try map.pageRange(gpa: gpa, size: size)
        let changed = map.changes(in: range, to: target)
        guard !changed.isEmpty else {
            costs.unchanged += 1
            return []
        }
        let t0 = clock()
        try kernel.setMemoryAttributes(gpa: gpa, size: size, private: target == .private)
        costs.attributeNanoseconds += clock() &- t0
        try map.convert(gpa: gpa, size: size, to: target)
        costs.conversions += 1
        try perform(planner.converted(changed, to: target))
        return changed
    }

    /// Performs every pending (lazy) discard now.
    public func flush() throws { try perform(planner.flush()) }

    private func perform(_ ops: [DiscardOperation]) throws {
        for op in ops {
            let (gpa, size) = map.gpaRange(of: op.pages)
            let t0 = clock()
            try kernel.discard(offset: gpa - map.memory.start.rawValue, length: size, backing: op.backing)
            costs.discardNanoseconds += clock() &- t0
            costs.discardCalls += 1
            if op.backing == .private { costs.discardedPrivatePages += UInt64(op.pages.count) } else {
                costs.discardedSharedPages += UInt64(op.pages.count)
            }
            ledger.record(op)
        }
    }

    /// KVM_HC_MAP_GPA_RANGE from the guest: the value for kvm_run.hypercall.ret. A request
    /// Faultline refuses (outside memory, bad attributes) answers -KVM_EINVAL and is kept in
    /// ``lastRefusal``; a kernel failure throws (the run cannot go on honestly).
    public func mapGPARange(gpa: UInt64, pages: UInt64, attributes: UInt64) throws -> UInt64 {
        switch MapGPARange.decode(gpa: gpa, pages: pages, attributes: attributes) {
        case .failure(let error):
            return refuse(error)
        case .success(let request):
            do {
                try convert(gpa: request.gpa, size: request.size, to: request.target)
            } catch let error as ConversionError {
                return refuse(error)
            }
            return 0
        }
    }

    private func refuse(_ error: ConversionError) -> UInt64 {
        costs.refused += 1
        lastRefusal = "KVM_HC_MAP_GPA_RANGE refused: \(error)"
        return MapGPARange.returnValue(error)
    }

    /// KVM_EXIT_MEMORY_FAULT: the guest accessed `size` bytes at `gpa` as private (flag
    /// KVM_MEMORY_EXIT_FLAG_PRIVATE) or shared while the attributes said otherwise - an
    /// implicit conversion request (what SNP and TDX guests rely on). Converts the pages.
    /// Throws ``MemoryFaultRefusal`` when it is no such request: outside the private-capable
    /// memory, or already in the asked state (KVM could not map the page for another reason).
    public func memoryFault(gpa: UInt64, size: UInt64, flags: UInt64) throws {
        let target: MemorySharing = flags & Self.memoryFaultFlagPrivate != 0 ? .private : .shared
        let start = gpa & ~(SharingMap.pageSize - 1)
        let end = (gpa &+ max(size, 1) &+ SharingMap.pageSize - 1) & ~(SharingMap.pageSize - 1)
        let what = "KVM_EXIT_MEMORY_FAULT at gpa 0x\(String(gpa, radix: 16)) size 0x\(String(size, radix: 16)) (\(target) access)"
        let range: Range<UInt64>
        do {
            range = try map.pageRange(gpa: start, size: end &- start)
        } catch {
            throw MemoryFaultRefusal(description: "\(what): \(error)")
        }
        guard !map.changes(in: range, to: target).isEmpty else {
            throw MemoryFaultRefusal(description: "\(what): the range map already has it \(target), so this is no conversion request: "
                + "KVM could not map the page (a memslot without guest_memfd, or guest_memfd could not supply it)")
        }
        try convert(gpa: start, size: end &- start, to: target)
        costs.implicitConversions += 1
    }

    /// KVM_MEMORY_EXIT_FLAG_PRIVATE
    public static let memoryFaultFlagPrivate: UInt64 = 1 << 3
}
