import ArgumentParser
import Logging

extension Logger.Level: @retroactive ExpressibleByArgument {}

/// `--log-level`: the least severe operational message printed on standard error (reports go
/// to standard output and are not affected).
struct LoggingArguments: ParsableArguments {
    @Option(name: .customLong("log-level"),
            help: "Least severe log message printed on stderr: trace, debug, info, notice, warning, error or critical")
    var logLevel: Logger.Level = .notice

    /// Sets up logging for this process; call once, first thing in a command's `run`.
    func apply() {
        let level = logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
    }
}
