// virtio-initiator/testing: the bundled vhost-user-scsi target as a child process, for tests and
// benchmarks of code built on the initiator. Start it on a socket, connect a Controller to that
// socket, and inject faults, hot-plug LUNs or cut the connection through its control socket.

export {
  ControlClient,
  ControlError,
  defaultTargetBinary,
  startTarget,
  TargetProcess,
  type ControlResponse,
  type ExitStatus,
  type Fault,
  type LunInfo,
  type TargetOptions,
  type TargetQuirk,
} from './bundled-target.js';
