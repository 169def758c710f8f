/// The guest program of the private-memory run: it converts a bounce buffer between shared
/// and private over and over with KVM_HC_MAP_GPA_RANGE (as OVMF does with its DMA bounce
/// buffers) and checks the buffer's contents after every conversion; before and
/// after the loop it reads back which backing the kernel maps for every page, so the host
/// can compare its range map with the kernel's memory attributes.
///
/// 32-bit protected mode, flat segments, paging off. Everything the guest reports goes to
/// the mailbox page, which the host reads at each exit (no extra exits for reporting).
///
/// One phase (conversion j, to shared when j is odd, private when even):
/// 1. hypercall MAP_GPA_RANGE(buffer, pages, attributes); a non-zero result stops the guest
///    (status 3);
/// 2. read the buffer's first and last word: they must be equal, and either 0 (that backing
///    was discarded, or never written) or the value the guest itself last wrote in this
///    state; anything else (status 2) means the guest saw the other backing or stale data;
/// 3. write `tag | j` to both words (tag 0x53 shared, 0x50 private, in the top byte);
/// 4. publish observed/written/phase in the mailbox for the host's exact check.
///
/// A readback r: `out 0xF0` (eax = r) asks the host to write marker(r, page) at offset 8 of
/// every page's *shared* backing; the guest then reads offset 8 of every page into the
/// mailbox table and says `out 0xF1`. A page whose word is the marker is mapped shared by
/// KVM; a private page shows its guest_memfd contents there, which the guest never writes
/// (0). The host compares that with its ``SharingMap``.
public struct ConversionGuest: Sendable {
    public enum HypercallInstruction: String, Sendable {
        /// Intel VMX.
        case vmcall
        /// AMD SVM (the rig: QEMU TCG `-cpu max` offers SVM).
        case vmmcall
    }

    /// One conversion done before the loop (page offsets within the region).
    public struct Step: Equatable, Sendable {
        public var firstPage: UInt64
        public var pages: UInt64
        public var target: MemorySharing
        public init(firstPage: UInt64, pages: UInt64, target: MemorySharing) {
            self.firstPage = firstPage
            self.pages = pages
            self.target = target
        }
    }

    public struct Config: Equatable, Sendable {
        /// The private-capable region (guest_memfd slot).
        public var regionGPA: UInt64 = 0x10_0000
        public var regionPages: UInt64 = 16
        /// The bounce buffer: page offset within the region, and its length in pages (1 or 2 in OVMF).
        public var bufferPage: UInt64 = 12
        public var bufferPages: UInt64 = 1
        /// Conversions in the loop (each flips the buffer).
        public var conversions: Int = 1000
        /// Conversions before the loop (for example whole-range ones).
        public var prologue: [Step] = []
        /// Read back the kernel's view before and after the loop.
        public var readbacks = true
        public var hypercall: HypercallInstruction = .vmcall
        /// Baseline for the benchmark: every hypercall asks for the state the buffer is
        /// already in (private), so the host converts nothing and the guest only stores to
        /// the buffer - what is left is the hypercall's exit and re-entry. No content checks.
        public var baseline = false
        public init() {}
    }

    // Guest layout: code page and mailbox page in an ordinary (shared) memslot.
    public static let codeGPA: UInt64 = 0x1000
    public static let mailboxGPA: UInt64 = 0x8000
    public static let lowMemorySize: UInt64 = 0x10000

    /// Mailbox offsets (32-bit words).
    public enum Mailbox {
        public static let phase = 0x00
        public static let status = 0x04
        public static let lastResult = 0x08
        public static let observed = 0x0C
        public static let observedLast = 0x10
        public static let written = 0x14
        public static let expectShared = 0x18
        public static let expectPrivate = 0x1C
        /// Baseline loop: hypercalls done.
        public static let baselineCount = 0x20
        /// One word per region page, filled by a readback.
        public static let readback = 0x800
        public static let maxReadbackPages: UInt64 = 512
    }

    public enum Status: UInt32, Sendable {
        case running = 0, done = 1, contentMismatch = 2, hypercallFailed = 3
    }

    public static let readbackRequestPort: UInt8 = 0xF0
    public static let readbackDonePort: UInt8 = 0xF1
    public static let markerOffset = 8
    public static let sharedTag: UInt32 = 0x5300_0000
    public static let privateTag: UInt32 = 0x5000_0000

    /// What the host writes at offset 8 of page `page`'s shared backing for readback `r`.
    public static func marker(readback r: UInt32, page: UInt64) -> UInt32 {
        0x4D00_0000 | (r & 0xF) << 20 | UInt32(truncatingIfNeeded: page) & 0xF_FFFF
    }

    /// The value the guest writes in phase `j` (its conversion number).
    public static func value(phase j: Int, state: MemorySharing) -> UInt32 {
        (state == .shared ? sharedTag : privateTag) | UInt32(truncatingIfNeeded: j) & 0xFF_FFFF
    }

    /// The state the buffer converts to in phase `j` (1-based): shared when odd.
    public static func target(ofPhase j: Int) -> MemorySharing { j % 2 == 1 ? .shared : .private }

    public enum ConfigError: Error, CustomStringConvertible, Equatable {
        case bad(String)
        public var description: String { switch self { case .bad(let s): "private-memory guest: \(s)" } }
    }

    public let config: Config
    public let code: [UInt8]

    public init(_ config: Config) throws {
        guard config.regionPages >= 1, config.regionPages <= Mailbox.maxReadbackPages else {
            throw ConfigError.bad("region of \(config.regionPages) pages (1...\(Mailbox.maxReadbackPages))")
        }
        guard config.bufferPages >= 1, config.bufferPage + config.bufferPages <= config.regionPages else {
            throw ConfigError.bad("buffer pages \(config.bufferPage)+\(config.bufferPages) outside the region of \(config.regionPages) pages")
        }
        guard config.conversions >= 0, config.conversions < 0xFF_FFFF else {
            throw ConfigError.bad("\(config.conversions) conversions (0..<16777215)")
        }
        guard config.regionGPA % 4096 == 0, config.regionGPA >= Self.lowMemorySize,
              config.regionGPA + config.regionPages * 4096 <= 0xFFFF_F000 else {
            throw ConfigError.bad("region at \(hexString(config.regionGPA)) must be page aligned, above the low 64 KiB and below 4 GiB")
        }
        for s in config.prologue where s.pages == 0 || s.firstPage + s.pages > config.regionPages {
            throw ConfigError.bad("prologue step \(s.firstPage)+\(s.pages) outside the region")
        }
        self.config = config
        self.code = try Self.assemble(config)
    }

    public var bufferGPA: UInt64 { config.regionGPA + config.bufferPage * 4096 }

    static func attributes(_ target: MemorySharing) -> UInt32 { target == .private ? UInt32(MapGPARange.encrypted) : 0 }

    private static func assemble(_ c: Config) throws -> [UInt8] {
        var a = X86Assembler()
        let hypercallFailed = a.makeLabel(), contentMismatch = a.makeLabel(), done = a.makeLabel()
        let mailbox = UInt32(mailboxGPA)
        func hypercall(gpa: UInt64, pages: UInt64, target: MemorySharing) {
            a.mov(.eax, imm: UInt32(MapGPARange.number))
            a.mov(.ebx, imm: UInt32(gpa))
            a.mov(.ecx, imm: UInt32(pages))
            a.mov(.edx, imm: attributes(target))
            if c.hypercall == .vmcall { a.vmcall() } else { a.vmmcall() }
            a.store(.eax, to: .esi, displacement: Int32(Mailbox.lastResult))
            a.cmp(.eax, imm: 0)
            a.jne(hypercallFailed)
        }
        func readback(_ r: UInt32) {
            guard c.readbacks else { return }
            let loop = a.makeLabel()
            a.mov(.eax, imm: r)
            a.out(port: readbackRequestPort)
            a.mov(.ebp, imm: UInt32(c.regionGPA))
            a.mov(.ebx, .esi)
            a.add(.ebx, imm: UInt32(Mailbox.readback))
            a.bind(loop)
            a.load(.eax, from: .ebp, displacement: Int32(markerOffset))
            a.store(.eax, to: .ebx)
            a.add(.ebx, imm: 4)
            a.add(.ebp, imm: 4096)
            a.cmp(.ebp, imm: UInt32(c.regionGPA + c.regionPages * 4096))
            a.jb(loop)
            a.mov(.eax, imm: r)
            a.out(port: readbackDonePort)
        }
        let buffer = c.regionGPA + c.bufferPage * 4096
        let lastWord = Int32(c.bufferPages * 4096 - 4)
        func phase(_ target: MemorySharing) {
            let ok = a.makeLabel()
            hypercall(gpa: buffer, pages: c.bufferPages, target: target)
            a.mov(.ebx, imm: UInt32(buffer))
            a.load(.eax, from: .ebx, displacement: 0)
            a.load(.ecx, from: .ebx, displacement: lastWord)
            a.store(.eax, to: .esi, displacement: Int32(Mailbox.observed))
            a.store(.ecx, to: .esi, displacement: Int32(Mailbox.observedLast))
            a.cmp(.eax, .ecx)
            a.jne(contentMismatch)
            a.cmp(.eax, imm: 0)
            a.je(ok)
            let expect = Int32(target == .shared ? Mailbox.expectShared : Mailbox.expectPrivate)
            a.load(.edx, from: .esi, displacement: expect)
            a.cmp(.eax, .edx)
            a.jne(contentMismatch)
            a.bind(ok)
            a.mov(.eax, .edi)
            a.or(.eax, imm: target == .shared ? sharedTag : privateTag)
            a.store(.eax, to: .ebx, displacement: 0)
            a.store(.eax, to: .ebx, displacement: lastWord)
            a.store(.eax, to: .esi, displacement: Int32(Mailbox.written))
            a.store(.eax, to: .esi, displacement: expect)
            a.store(.edi, to: .esi, displacement: Int32(Mailbox.phase))
        }

        a.mov(.esi, imm: mailbox)
        for s in c.prologue {
            hypercall(gpa: c.regionGPA + s.firstPage * 4096, pages: s.pages, target: s.target)
        }
        readback(0)
        if c.baseline && c.conversions > 0 {
            let loop = a.makeLabel()
            a.mov(.edi, imm: 1)
            a.bind(loop)
            hypercall(gpa: buffer, pages: c.bufferPages, target: .private)
            a.mov(.ebx, imm: UInt32(buffer))
            a.store(.edi, to: .ebx, displacement: 0)
            a.store(.edi, to: .esi, displacement: Int32(Mailbox.baselineCount))
            a.inc(.edi)
            a.cmp(.edi, imm: UInt32(c.conversions + 1))
            a.jb(loop)
        } else if c.conversions > 0 {
            let loop = a.makeLabel()
            a.mov(.edi, imm: 1)
            a.bind(loop)
            phase(.shared)
            a.inc(.edi)
            a.cmp(.edi, imm: UInt32(c.conversions + 1))
            a.jae(done)
            phase(.private)
            a.inc(.edi)
            a.cmp(.edi, imm: UInt32(c.conversions + 1))
            a.jb(loop)
        }
        a.bind(done)
        readback(1)
        a.mov(.eax, imm: Status.done.rawValue)
        a.store(.eax, to: .esi, displacement: Int32(Mailbox.status))
        a.hlt()
        a.bind(contentMismatch)
        a.mov(.eax, imm: Status.contentMismatch.rawValue)
        a.store(.eax, to: .esi, displacement: Int32(Mailbox.status))
        a.hlt()
        a.bind(hypercallFailed)
        a.mov(.eax, imm: Status.hypercallFailed.rawValue)
        a.store(.eax, to: .esi, displacement: Int32(Mailbox.status))
        a.hlt()
        return try a.assemble()
    }
}
