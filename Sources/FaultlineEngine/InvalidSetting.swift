/// A setting out of range, or not allowed with the others, named as the engine knows it. A
/// front end names it the way its users spell it (the CLI puts its flag in place of the name);
/// ``description`` reads well without one.
public struct InvalidSetting: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Setting: String, Sendable, CaseIterable {
        case faultAround = "the fault-around window"
        case postcopyVcpuNiceness = "the vCPUs' niceness during post-copy"
        case faultMode = "the fault mode"
        case vcpus = "the vCPU count"
        case vmType = "the VM type"
    }

    public let setting: Setting
    /// What is wrong, to follow the setting's name ("must be 1...256 pages (got 0)").
    public let problem: String

    public init(_ setting: Setting, _ problem: String) {
        self.setting = setting
        self.problem = problem
    }

    public var description: String { "\(setting.rawValue) \(problem)" }
}
