import Logging

/// Faultline's operational messages (swift-log; stderr by default): what failed, what is
/// retried, what was discarded. Reports go to stdout; these never do.
public enum FaultlineLog {
    public static let logger = Logger(label: "faultline")

    public static func note(_ message: String) { logger.notice("\(message)") }
    public static func warn(_ message: String) { logger.warning("\(message)") }
}
