/**
 * denovisor: a KVM hypervisor whose control plane is TypeScript and whose hot
 * path (vCPU threads, the VM-exit loop, guest memory, hot devices) is a Rust
 * library loaded through Deno's FFI.
 *
 * Two levels of API:
 * - {@link Vm}: configure, load an image, run, close.
 * - {@link Kvm} / {@link KvmVm} / {@link KvmVcpu}: the KVM objects themselves —
 *   create a VM, create a vCPU, get/set registers, run to an exit.
 *
 * @example
 * ```ts
 * import { defaultGuestImage, Vm } from "denovisor";
 * using vm = await Vm.create({ memoryMiB: 16 });
 * vm.load(await defaultGuestImage(), { mode: "user" });
 * const { console: output, exitCode } = await vm.run({ timeoutMs: 5000 });
 * console.log(output, exitCode);
 * ```
 *
 * @module
 */

export { DenovisorError, type ErrorCode } from "./src/errors.ts";
export {
  type BalloonDevice,
  type BlockDevice,
  type BusRange,
  DEVICE_KINDS,
  type DeviceConfig,
  deviceConfigJson,
  type DeviceListing,
  type DeviceState,
  type NetDevice,
  netHostProblem,
  type PciFunction,
  type PciFunctionState,
  type RngDevice,
  VSOCK_PATH_MAX,
  type VsockDevice,
} from "./src/devices.ts";
export {
  checkRateLimiter,
  MAX_REFILL_MS,
  type RateLimiter,
  type TokenBucket,
} from "./src/rate_limiter.ts";
export {
  type LoadedImage,
  type LoadOptions,
  type RunResult,
  type RunTimings,
  VCPU_STACK_BYTES,
  Vm,
  type VmConfig,
  type VmSettings,
  type VmState,
} from "./src/vm.ts";
export type { CloneIdentity, RestoreOptions } from "./src/vm.ts";
export {
  type ConsoleCounts,
  type ConsoleStats,
  type DirtyPages,
  type EntryMode,
  type GuestMemoryUsage,
  type HypercallCounts,
  Kvm,
  KvmVcpu,
  KvmVm,
  type PortCounts,
  type RunOptions,
  type RunOutcome,
  type UnhandledAccessPolicy,
  type VcpuMetrics,
} from "./src/kvm/kvm.ts";
export {
  type CrashRegisters,
  describeExit,
  type ExitReason,
  type VcpuExit,
} from "./src/kvm/exit.ts";
export type {
  DescriptorTable,
  FpuState,
  Registers,
  Segment,
  SpecialRegisters,
} from "./src/kvm/registers.ts";
export {
  type DeviceExits,
  type MetricsReport,
  metricsReport,
  sumMetrics,
  toPrometheus,
} from "./src/metrics.ts";
export {
  type KsmCounters,
  type KsmHostCounters,
  type KsmMetrics,
  ksmMetrics,
  type KsmProcessCounters,
} from "./src/ksm.ts";
export {
  checkDenyList,
  checkSeccompMode,
  configureSeccomp,
  type SeccompMode,
  type SeccompOptions,
  type SeccompStatus,
  seccompStatus,
  SECURITY_STOP_EXIT_STATUS,
} from "./src/kvm/seccomp.ts";
export { GuestVectors, IRQ_LINES, type IrqStats, msiAddress, SERIAL_IRQ_LINE } from "./src/irq.ts";
export {
  type AttachOptions,
  attachStdin,
  ConsoleEscape,
  type ConsoleSession,
  type ConsoleTarget,
  type EscapeResult,
} from "./src/console.ts";
export {
  type CpuFeature,
  CPUID_FEATURES,
  type CpuidBit,
  type CpuidPolicy,
  type MsrPolicy,
} from "./src/cpu/policy.ts";
export {
  type Address,
  type BzImageInfo,
  checkLinuxLoad,
  type ElfInfo,
  type ElfSegment,
  formatInspection,
  type ImageInspection,
  inspectImage,
  inspectionJson,
  type KernelPlacement,
  type SetupHeader,
} from "./src/linux/inspect.ts";
export {
  BOOT_CS,
  BOOT_DS,
  E820_RAM,
  E820_RESERVED,
  type E820Entry,
  type LinuxLayout,
  type LinuxLoadOptions,
  type MemoryRegion,
} from "./src/linux/layout.ts";
export { buildInitramfs, type InitramfsEntry } from "./src/linux/initramfs.ts";
export {
  ConsoleDriver,
  type ExecResult,
  lastLines,
  type WaitOptions,
} from "./src/console_driver.ts";
export {
  type BalloonControl,
  type BalloonStats,
  type GuestMemoryStats,
  parseBalloonStats,
  VmBalloon,
} from "./src/balloon.ts";
export {
  type ManagedGuest,
  type ManagedGuestView,
  type MemoryDecision,
  MemoryManager,
  type MemoryManagerMetrics,
  type MemoryManagerOptions,
} from "./src/memory_manager.ts";
export {
  DEFAULT_GUEST_LOAD_OPTIONS,
  DEFAULT_GUEST_SUCCESS_CODE,
  defaultGuestImage,
} from "./src/default_guest.ts";
export {
  type ApiErrorCode,
  type ApiHandlers,
  ApiServer,
  type ApiServerOptions,
  type ApiTarget,
  checkApiSocketPath,
  handleApiRequest,
  serveApi,
  type SnapshotCreateOptions,
  type SnapshotLoadOptions,
} from "./src/api/server.ts";
export {
  ApiClient,
  type ApiClientOptions,
  ApiError,
  type ApiMetrics,
  type VmInfo,
} from "./src/api/client.ts";
export {
  formatMigrationAddress,
  type MigrationAddress,
  parseMigrationAddress,
} from "./src/api/address.ts";

export { inspectSnapshot, type SnapshotInfo, type SnapshotSection } from "./src/snapshot.ts";
export type { SnapshotWriteStats } from "./src/kvm/kvm.ts";
export type { MigrationSendStats } from "./src/kvm/kvm.ts";
export type { MigrationReceived } from "./src/ffi.ts";
export {
  type MigrateOptions,
  migrateVm,
  MIGRATION_PROTOCOL_VERSION,
  type MigrationPhases,
  type MigrationRound,
  type MigrationStats,
  receiveMigration,
  type ReceiveOptions,
  type TargetPhases,
} from "./src/migration/migrate.ts";
export {
  answerOf,
  type InvocationAnswer,
  type ServedFunctionInfo,
  Service,
  type ServiceOptions,
} from "./src/serverless/service.ts";
export {
  DEFAULT_LIMITS,
  type FunctionLimits,
  type FunctionSpec,
  type LoadedFunction,
  loadFunction,
  parseFunctionArg,
} from "./src/serverless/function.ts";
export {
  type FunctionMetricsSnapshot,
  type HistogramSnapshot,
  type OverheadModel,
  type PoolGauges,
} from "./src/serverless/metrics.ts";
export { DEFAULT_POOL_POLICY, type PoolPolicy } from "./src/serverless/policy.ts";
export type {
  BundleFile,
  FunctionBackend,
  FunctionReady,
  FunctionStartOptions,
  FunctionVm,
  InvokeOptions,
  InvokeResult,
  StartFunctionVm,
} from "./src/serverless/backend.ts";
export { buildFunction, KVM_BACKEND } from "./src/serverless/backend.ts";
export { type BundleSpec, encodeBundle } from "./src/serverless/bundle.ts";
export { runRequest, startFunctionVm } from "./src/serverless/runtime_vm.ts";
export {
  CGROUP_KEYS,
  type CgroupKey,
  type JailFile,
  type JailLimits,
  type JailOptions,
  type JailVm,
  validateJailOptions,
} from "./src/jail/policy.ts";
export { type JailedRun, runJailed, type RunJailedOptions } from "./src/jail/run_jailed.ts";
