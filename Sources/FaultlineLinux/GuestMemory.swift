import CFaultlineShim
import FaultlineCore
#if canImport(Glibc)
import Glibc
#endif

/// What backs a region of guest RAM.
public enum MemoryBacking: String, CaseIterable, Sendable, CustomStringConvertible {
    /// Private anonymous memory (userfaultfd MISSING).
    case anonymous
    /// A memfd (shmem): has a page cache, so userfaultfd MINOR + write-then-CONTINUE works.
    case memfd
    /// hugetlbfs 2 MiB pages (needs reserved pages: /proc/sys/vm/nr_hugepages).
    case hugetlb
    /// KVM guest_memfd with the MMAP flag: fd-based guest memory (userfaultfd on its mapping
    /// needs a kernel with guest_memfd's userfaultfd operations).
    case guestMemfd = "guest-memfd"
    /// A regular file mapped private and writable (copy-on-write): pages never written are the
    /// file's page cache, shared with every other mapping of it; a written page becomes this
    /// mapping's own anonymous copy and the file never changes. Made only by
    /// ``GuestMemoryRegion/init(privateMappingOf:offset:size:label:)`` (it needs a file).
    case privateFile = "private-file"

    public var description: String { rawValue }

    public var pageSize: UInt64 { self == .hugetlb ? 2 << 20 : 4096 }
}

/// Reserved and free 2 MiB huge pages, from /proc/meminfo.
public func hugePagesFree() -> Int {
    guard let f = fopen("/proc/meminfo", "r") else { return 0 }
    defer { fclose(f) }
    var line = [CChar](repeating: 0, count: 256)
    while fgets(&line, 256, f) != nil {
        let s = String(cString: line)
        if s.hasPrefix("HugePages_Free:") {
            return Int(s.dropFirst("HugePages_Free:".count).trimmed(of: " \n\t")) ?? 0
        }
    }
    return 0
}

extension StringProtocol {
    public func trimmed(of set: String) -> String {
        var s = Substring(self)
        while let c = s.first, set.contains(c) { s = s.dropFirst() }
        while let c = s.last, set.contains(c) { s = s.dropLast() }
        return String(s)
    }
}

/// A region of guest RAM mapped into this process: owns the mapping (and the memfd or
/// guest_memfd behind it) and unmaps in deinit. It must outlive every memslot using it.
public final class GuestMemoryRegion: @unchecked Sendable {
    public let backing: MemoryBacking
    public let size: UInt64
    public let base: UnsafeMutableRawPointer
    /// The file behind the mapping (memfd, hugetlb memfd, guest_memfd), if any.
    public let file: FileDescriptor?
    public let guestMemfd: GuestMemfd?
    /// A second, unregistered mapping of the same file, where contents can be written before
    /// UFFDIO_CONTINUE maps them in the registered one. hugetlbfs has no write(); on shmem,
    /// write() takes the file's inode lock, so one writer preempted in the middle of a run
    /// holds up every other (see ``storeThroughAlias(at:from:length:)``).
    @usableFromInline let alias: UnsafeMutableRawPointer?

    public var hostAddress: HostAddress { HostAddress(base) }

    public enum RegionError: Error, CustomStringConvertible {
        case noHugePages(needed: Int, free: Int)
        case needsVM
        case needsFile
        case badSize(UInt64, pageSize: UInt64)
        public var description: String {
            switch self {
            case .noHugePages(let needed, let free):
                return "hugetlb backing needs \(needed) free 2 MiB huge pages, the system has \(free) (reserve some: echo N > /proc/sys/vm/nr_hugepages)"
            case .needsVM: return "guest-memfd backing needs a KVM VM (not available with the soft backend)"
            case .needsFile: return "private-file backing maps an existing file: it has no anonymous form"
            case .badSize(let s, let p): return "region size \(s) is not a positive multiple of the page size \(p)"
            }
        }
    }

    /// Maps `size` bytes of `backing`. `vm` is needed for guest_memfd, created with
    /// `guestMemfdFlags` (MMAP is what lets it be mapped; INIT_SHARED, that its pages fault in).
    public init(backing: MemoryBacking, size: UInt64, vm: VirtualMachine? = nil, label: String = "guest-ram",
                guestMemfdFlags: GuestMemfdFlags = [.mmap, .initShared]) throws {
        guard size > 0, size % backing.pageSize == 0 else { throw RegionError.badSize(size, pageSize: backing.pageSize) }
        self.backing = backing
        self.size = size
        var file: FileDescriptor?
        var gmem: GuestMemfd?
        let mapping: UnsafeMutableRawPointer?
        switch backing {
        case .anonymous:
            mapping = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        case .memfd, .hugetlb:
            if backing == .hugetlb {
                let needed = Int(size / backing.pageSize), free = hugePagesFree()
                guard free >= needed else { throw RegionError.noHugePages(needed: needed, free: free) }
            }
            let flags: UInt32 = 1 /* MFD_CLOEXEC */ | (backing == .hugetlb ? 4 /* MFD_HUGETLB */ | (21 << 26) /* 2 MiB */ : 0)
            let fd = try systemCall("memfd_create \(label) (\(backing))") { fl_memfd_create(label, flags) }
            let owned = FileDescriptor(adopting: fd, label: "memfd \(label)")
            try systemCall("ftruncate \(owned) to \(size)") { ftruncate(fd, off_t(size)) }
            file = owned
            mapping = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        case .privateFile:
            throw RegionError.needsFile
        case .guestMemfd:
            guard let vm else { throw RegionError.needsVM }
            let g = try vm.createGuestMemfd(size: size, flags: guestMemfdFlags)
            gmem = g
            file = g.fd
            mapping = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, g.fd.rawValue, 0)
        }
        guard let mapping, mapping != MAP_FAILED else {
            throw SystemError("mmap \(size) bytes of \(backing) for \(label)", errno: fl_errno())
        }
        var alias: UnsafeMutableRawPointer?
        if backing == .hugetlb || backing == .memfd, let file {
            let a = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, file.rawValue, 0)
            guard let a, a != MAP_FAILED else {
                munmap(mapping, Int(size))
                throw SystemError("mmap alias of \(backing) for \(label)", errno: fl_errno())
            }
            alias = a
        }
        self.alias = alias
        self.base = mapping
        self.file = file
        self.guestMemfd = gmem
    }

    /// Takes over a mapping made elsewhere (``init(privateMappingOf:offset:size:label:)``).
    init(backing: MemoryBacking, size: UInt64, base: UnsafeMutableRawPointer, file: FileDescriptor?) {
        self.backing = backing
        self.size = size
        self.base = base
        self.file = file
        self.guestMemfd = nil
        self.alias = nil
    }

    deinit {
        munmap(base, Int(size))
        if let alias { munmap(alias, Int(size)) }
    }

    /// Allocates the page cache of the whole file (memfd/hugetlb): MINOR faults need pages
    /// to exist in the cache but not in this mapping's page tables.
    public func allocateFile() throws(SystemError) {
        guard let file, backing != .privateFile else { return }  // never grow or fill a file mapped privately
        try systemCall("fallocate \(file) \(size)") { fl_fallocate(file.rawValue, 0, 0, Int64(size)) }
    }

    /// Writes `length` bytes into the backing file at `offset` without touching this
    /// mapping (the first half of "write, then UFFDIO_CONTINUE").
    @inlinable
    public func writeFile(at offset: UInt64, from source: UnsafeRawPointer, length: Int) throws(SystemError) {
        guard let file, backing != .privateFile else {
            throw SystemError("pwrite: \(backing) memory has no file of its own to write", errno: EINVAL)
        }
        if backing == .hugetlb, let alias {
            (alias + Int(offset)).copyMemory(from: source, byteCount: length)
            return
        }
        var done = 0
        while done < length {
            let n = try systemCall("pwrite \(file) offset \(offset)") {
                pwrite(file.rawValue, source + done, length - done, off_t(offset) + off_t(done))
            }
            done += n
        }
    }

    /// Stores `length` bytes into the backing file at `offset` through the second mapping,
    /// without touching this one: no file-wide lock is taken (write() takes the inode lock),
    /// but each page new to the file costs a fault in that mapping.
    @inlinable
    public func storeThroughAlias(at offset: UInt64, from source: UnsafeRawPointer, length: Int) throws(SystemError) {
        guard let alias else { throw SystemError("store: \(backing) memory has no second mapping", errno: EINVAL) }
        (alias + Int(offset)).copyMemory(from: source, byteCount: length)
    }

    /// MADV_DONTNEED over a range: drops the pages so they fault again (a private file mapping's
    /// written pages go back to the file's contents).
    public func discard(offset: UInt64, length: UInt64) throws(SystemError) {
        try systemCall("madvise DONTNEED +\(offset) \(length)") { madvise(base + Int(offset), Int(length), MADV_DONTNEED) }
        if backing == .memfd || backing == .hugetlb, let file {
            // shmem keeps the page cache across DONTNEED; punch it out too.
            try systemCall("fallocate PUNCH_HOLE \(file)") {
                fl_fallocate(file.rawValue, 0x02 | 0x01 /* PUNCH_HOLE | KEEP_SIZE */, Int64(offset), Int64(length))
            }
        }
    }
}
