// swift-tools-version: 6.0
import PackageDescription

// Layers, bottom to top (each may use only the ones before it):
//   CFaultlineShim  - C: the KVM/userfaultfd ABI structs and request numbers, defined here
//                     (system headers are older than the kernel); non-variadic ioctl and
//                     syscall wrappers; union accessors; the kick and SIGBUS signal handlers.
//   CFaultlineCRC   - C: the hardware CRC-32C instruction, nothing else.
//   FaultlineCore   - pure Swift, no syscalls: addresses, page bitmap, range map, x86
//                     encoder and guest workloads, wire codec, statistics.
//   FaultlineLinux  - owning types over the kernel: KVM, VirtualMachine (holds its memslots'
//                     memory), Vcpu (typed registers, state blob), Userfaultfd, GuestMemory,
//                     AnonymousMapping, DirtyLogBuffer, EventFD, OSThread (affinity, priority),
//                     KickSignal, SigbusResolver, MonotonicClock, locks; Errno names; one
//                     syscall wrapper and error type. The engine imports no libc or C shim.
//   FaultlineEngine - fault delivery (uffd single/per-vCPU, MINOR, vCPU exits), page
//                     sources, the demand-paging benchmark, migration.
//   faultline       - the command-line tool.
let package = Package(
    name: "faultline",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "faultline", targets: ["faultline"]),
        .library(name: "FaultlineEngine", targets: ["FaultlineEngine"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.2.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.0"),
    ],
    targets: [
        .target(name: "CFaultlineShim"),
        // The SSE4.2 CRC-32C instruction (no syscalls; used by the pure core's checksum).
        .target(name: "CFaultlineCRC"),
        .target(
            name: "FaultlineCore",
            dependencies: ["CFaultlineCRC", .product(name: "Atomics", package: "swift-atomics")]
        ),
        .target(
            name: "FaultlineLinux",
            dependencies: [
                "CFaultlineShim", "FaultlineCore",
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        .target(
            name: "FaultlineEngine",
            dependencies: [
                "FaultlineCore", "FaultlineLinux",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "faultline",
            dependencies: [
                "FaultlineEngine", "FaultlineLinux", "FaultlineCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Test-only (in no product): one probe per capability the tests gate on, measured once
        // on the running kernel, and the table of every kernel-dependent test's gate.
        .target(
            name: "FaultlineTestSupport",
            dependencies: ["FaultlineEngine", "FaultlineLinux", "FaultlineCore"],
            path: "Tests/FaultlineTestSupport"
        ),
        .testTarget(name: "FaultlineCoreTests", dependencies: ["FaultlineCore"]),
        .testTarget(name: "ABITests", dependencies: ["CFaultlineShim"]),
        .testTarget(name: "FaultlineLinuxTests", dependencies: ["FaultlineLinux", "FaultlineCore", "FaultlineTestSupport"]),
        .testTarget(
            name: "FaultlineEngineTests",
            dependencies: [
                "FaultlineEngine", "FaultlineLinux", "FaultlineCore", "FaultlineTestSupport",
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        // Runs the built `faultline` binary: exit codes and messages of the CLI.
        .testTarget(
            name: "FaultlineCLITests",
            dependencies: ["faultline", "FaultlineEngine", "FaultlineCore", "FaultlineLinux", "CFaultlineShim", "FaultlineTestSupport"]
        ),
        // The gates themselves, against made-up measurements: needs no kernel.
        .testTarget(name: "FaultlineTestSupportTests", dependencies: ["FaultlineTestSupport"]),
    ],
    swiftLanguageModes: [.v5]
)
