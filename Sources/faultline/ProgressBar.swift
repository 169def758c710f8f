import FaultlineEngine
import FaultlineLinux

/// Post-copy's progress as a bar on standard error (only ever set up when that is a terminal).
enum ProgressBar {
    @Sendable static func draw(_ progress: MigrationProgress) {
        let width = 40, total = progress.pagesTotal, have = min(progress.pagesDone, total)
        let filled = total > 0 ? have * width / total : width
        StandardError.write("\r[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
                            + "] \(have * 100 / max(total, 1))% of \(total) pages" + (progress.finished ? "\n" : ""))
    }
}
