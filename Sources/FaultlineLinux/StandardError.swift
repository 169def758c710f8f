#if canImport(Glibc)
import Glibc
#endif

/// The process's standard error (fd 2): progress shown to a person at a terminal.
public enum StandardError {
    /// Whether fd 2 is a terminal.
    public static var isTerminal: Bool { isatty(2) != 0 }

    /// Writes `text` as is (stderr is unbuffered: it appears at once).
    public static func write(_ text: String) { fputs(text, stderr) }
}
