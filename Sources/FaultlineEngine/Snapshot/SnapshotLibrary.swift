import FaultlineCore
import FaultlineLinux

/// The snapshots a server offers: its folder (a request without a name) and the snapshot
/// folders inside it (a request naming one). Each snapshot is verified in full - every
/// chunk's CRC32C and the memory digest - the first time it is asked for, so that a corrupt
/// one is refused before any guest is built, and the opened, verified snapshot is kept for
/// later requests as long as its files are the same (``FileIdentity``: device, inode, size,
/// modification time). A snapshot whose files changed is opened and verified again.
final class SnapshotLibrary: @unchecked Sendable {
    let folder: String

    private struct Entry {
        let snapshot: Snapshot
        let identity: [FileIdentity?]
    }

    private let entries = Locked<[String: Entry]>([:])
    /// One verification at a time: two requests for one new snapshot read it once.
    private let verifying = Locked(())

    init(folder: String) { self.folder = folder }

    /// The path a request's name stands for (the name is checked: one folder name, no path).
    func path(for name: String?) throws -> String {
        guard let name else { return folder }
        try RestoreRequest.checkName(name)
        return folder + "/" + name
    }

    /// The verified snapshot at `path`; throws why it cannot be served (missing, foreign,
    /// truncated, corrupt ...).
    func snapshot(at path: String) throws -> Snapshot {
        if let ready = current(path) { return ready }
        return try verifying.withLock { _ in
            if let ready = current(path) { return ready }
            let identity = Self.identity(of: path)
            let snapshot = try Snapshot(folder: path)
            _ = try snapshot.verify()
            // Identity taken before the open: a change during the check makes the next request look again.
            entries.withLock { $0[path] = Entry(snapshot: snapshot, identity: identity) }
            return snapshot
        }
    }

    /// Forgets `path` (its files were found different).
    func forget(_ path: String) { _ = entries.withLock { $0.removeValue(forKey: path) } }

    private func current(_ path: String) -> Snapshot? {
        guard let entry = entries.withLock({ $0[path] }) else { return nil }
        let now = Self.identity(of: path)
        guard now == entry.identity, !now.contains(nil) else {
            forget(path)
            return nil
        }
        return entry.snapshot
    }

    private static func identity(of path: String) -> [FileIdentity?] {
        [FileIdentity(path: path + "/" + SnapshotManifest.manifestFileName),
         FileIdentity(path: path + "/" + SnapshotManifest.memoryFileName)]
    }
}
