import FaultlineCore
import FaultlineLinux
import Foundation
import Testing

/// ``GuestMemoryRegion/init(privateMappingOf:offset:size:label:)``: a file mapped private and
/// writable. No kernel feature beyond mmap, so no gate.
@Suite("Private file mappings")
struct PrivateFileMappingTests {
    /// A file of `pages` pages, page i filled with byte i + 1, removed when the test ends.
    final class PatternFile {
        let path = NSTemporaryDirectory() + "faultline-private-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        init(pages: Int) throws {
            let bytes = (0..<pages).flatMap { [UInt8](repeating: UInt8($0 + 1), count: 4096) }
            try Data(bytes).write(to: URL(fileURLWithPath: path))
        }
        deinit { unlink(path) }
        func bytes() throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }
    }

    @Test func writesStayInTheMappingAndTheFileNeverChanges() throws {
        let file = try PatternFile(pages: 4)
        let before = try file.bytes()
        let fd = try FileDescriptor.open(file.path, flags: O_RDONLY)  // read-only is enough for a private mapping
        let a = try GuestMemoryRegion(privateMappingOf: fd, offset: 4096, size: 2 * 4096, label: "a")
        let b = try GuestMemoryRegion(privateMappingOf: fd, offset: 4096, size: 2 * 4096, label: "b")
        #expect(a.backing == .privateFile && a.file === fd)
        #expect(a.base.load(as: UInt8.self) == 2 && (a.base + 4096).load(as: UInt8.self) == 3, "mapped from the offset")
        a.base.storeBytes(of: 0xEE, toByteOffset: 100, as: UInt8.self)
        #expect(a.base.load(fromByteOffset: 100, as: UInt8.self) == 0xEE)
        #expect(b.base.load(fromByteOffset: 100, as: UInt8.self) == 2, "the other mapping still reads the file")
        #expect(try file.bytes() == before, "the file never sees a write")
        // Dropping the written page maps the file's page again; nothing is punched out of the file.
        try a.discard(offset: 0, length: 4096)
        #expect(a.base.load(fromByteOffset: 100, as: UInt8.self) == 2)
        try a.allocateFile()
        #expect(try file.bytes() == before)
        var byte: UInt8 = 1
        #expect(throws: SystemError.self) { try a.writeFile(at: 0, from: &byte, length: 1) }
    }

    @Test func aRangePastTheEndOfTheFileIsRefused() throws {
        let file = try PatternFile(pages: 2)
        let fd = try FileDescriptor.open(file.path, flags: O_RDONLY)
        #expect { try GuestMemoryRegion(privateMappingOf: fd, offset: 4096, size: 2 * 4096) } throws: { error in
            guard let e = error as? SystemError else { return false }
            return e.errno == EINVAL && e.operation.contains("mmap") && e.operation.contains("the file has 8192 bytes")
        }
        #expect(throws: SystemError.self) { try GuestMemoryRegion(privateMappingOf: fd, offset: 100, size: 4096) }
        #expect(throws: GuestMemoryRegion.RegionError.self) { try GuestMemoryRegion(privateMappingOf: fd, offset: 0, size: 100) }
        #expect(throws: GuestMemoryRegion.RegionError.self) { try GuestMemoryRegion(backing: .privateFile, size: 4096) }
        let folder = try FileDescriptor.open(NSTemporaryDirectory(), flags: O_RDONLY | O_DIRECTORY)
        #expect { try GuestMemoryRegion(privateMappingOf: folder, offset: 0, size: 4096) } throws: {
            "\($0)".contains("not a regular file")
        }
    }
}
