// virtio-initiator: a userspace poll-mode virtio-scsi and virtio-blk initiator.

export {
  Controller,
  ControllerEventType,
  EVENTS_MISSED,
  type ControllerEvent,
  type ControllerEventMap,
  type ControllerHandle,
  type ControllerInfo,
  type ControllerOptions,
  type ReconnectOptions,
  type Transport,
} from './controller.js';
export { BlkStatus, type BlkConfig } from './blk.js';
export {
  BlockDevice,
  type BlkUnit,
  type BlockDeviceInfo,
  type BlockDeviceIostat,
  type BlockDeviceLimits,
  type BlockRange,
  type IoOptions,
  type PassthroughOptions,
  type PassthroughResult,
  type ReadOptions,
  type WriteOptions,
} from './block-device.js';
export { DEFAULT_RETRY_POLICY, type RetryPolicy } from './command.js';
export {
  BlkIoError,
  ClosedError,
  ConnectError,
  type ConnectErrno,
  ControllerFailedError,
  DeviceError,
  DeviceRemovedError,
  InitiatorError,
  NotSupportedError,
  RequestTimeoutError,
  TaskManagementError,
  VirtioResponse,
  VirtioResponseError,
  virtioResponseName,
  type InitiatorErrorCode,
} from './errors.js';
export { NativeLoadError } from './native.js';
export {
  AttachError,
  attachAll,
  CONFIG_SCHEMA,
  ConfigError,
  expandPciAll,
  loadConfig,
  parseConfig,
  validateConfig,
  type ConfigTransport,
  type ControllerConfig,
  type InitiatorConfig,
} from './config/index.js';
export { startRpcServer, type RpcServer, type StartRpcServerOptions } from './rpc/index.js';
export { LOG_LEVELS, logLevel, setLogLevel, type LogLevel } from './log.js';
export { bindVfioPci, listPciDevices, unbindVfioPci, type PciDeviceInfo } from './pci.js';
export {
  Rejected,
  RequestQueue,
  RequestRefusedError,
  type CommandExecutor,
  type BlockRequest,
  type CommandResult,
  type RequestQueueStats,
  type ScsiCommand,
} from './queue.js';
export {
  TMF_ABORT_TASK,
  TMF_I_T_NEXUS_RESET,
  TMF_LOGICAL_UNIT_RESET,
  type RecoveryAction,
  type RecoveryStep,
} from './recovery.js';
export { lunName, type Geometry, type ScannedLun, type ScanProblem, type ScanResult } from './scan.js';
export { ScsiError, type DecodedSense, type Lba } from './scsi/index.js';
export * as scsi from './scsi/index.js';
