// Errors of the initiator other than SCSI status (ScsiError lives with the sense decoder).

/** virtio-scsi request response codes (virtio 1.2, 5.6.6.1). */
export const VirtioResponse = {
  OK: 0,
  OVERRUN: 1,
  ABORTED: 2,
  BAD_TARGET: 3,
  RESET: 4,
  BUSY: 5,
  TRANSPORT_FAILURE: 6,
  TARGET_FAILURE: 7,
  NEXUS_FAILURE: 8,
  FAILURE: 9,
  FUNCTION_SUCCEEDED: 10,
  FUNCTION_REJECTED: 11,
  INCORRECT_LUN: 12,
} as const;

const RESPONSE_NAMES: readonly string[] = [
  'OK',
  'OVERRUN',
  'ABORTED',
  'BAD_TARGET',
  'RESET',
  'BUSY',
  'TRANSPORT_FAILURE',
  'TARGET_FAILURE',
  'NEXUS_FAILURE',
  'FAILURE',
  'FUNCTION_SUCCEEDED',
  'FUNCTION_REJECTED',
  'INCORRECT_LUN',
];

/** Name of a virtio-scsi response code, e.g. "BAD_TARGET"; unknown codes read "RESPONSE n". */
export function virtioResponseName(code: number): string {
  return RESPONSE_NAMES[code] ?? `RESPONSE ${code}`;
}

/** Error codes carried by `InitiatorError.code`. */
export type InitiatorErrorCode =
  | 'ERR_VIRTIO_CONNECT'
  | 'ERR_VIRTIO_CONTROLLER_FAILED'
  | 'ERR_VIRTIO_CLOSED'
  | 'ERR_VIRTIO_DEVICE_REMOVED'
  | 'ERR_VIRTIO_RESPONSE'
  | 'ERR_VIRTIO_NOT_SUPPORTED'
  | 'ERR_VIRTIO_DEVICE'
  | 'ERR_VIRTIO_TASK_MANAGEMENT'
  | 'ERR_VIRTIO_REQUEST_REFUSED'
  | 'ERR_VIRTIO_TIMEOUT'
  | 'ERR_VIRTIO_BLK_IOERR';

/** Base class of the initiator's own errors; `code` tells them apart without instanceof. */
export class InitiatorError extends Error {
  readonly code: InitiatorErrorCode;

  constructor(code: InitiatorErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'InitiatorError';
    this.code = code;
  }
}

/** The errno names a failed connection reports. */
export const CONNECT_ERRNOS = [
  'ENOENT',
  'ENOTSOCK',
  'ECONNREFUSED',
  'EACCES',
  'EPERM',
  'ETIMEDOUT',
  'ECONNRESET',
  'EAGAIN',
] as const;
export type ConnectErrno = (typeof CONNECT_ERRNOS)[number];

/** Opening a controller failed: no socket, not a vhost-user backend, negotiation refused. */
export class ConnectError extends InitiatorError {
  readonly transport: string;
  /**
   * Why the connection could not be made, where the system said: ENOENT (no such file),
   * ENOTSOCK (not a unix socket), ECONNREFUSED (nothing listening), EACCES, ...; undefined for
   * failures after connecting (the device did not come up).
   */
  readonly errno: ConnectErrno | undefined;

  constructor(transport: string, reason: string, options?: { cause?: unknown; errno?: ConnectErrno }) {
    super('ERR_VIRTIO_CONNECT', `cannot open ${transport}: ${reason}`, options);
    this.name = 'ConnectError';
    this.transport = transport;
    this.errno = options?.errno;
  }
}

/**
 * The controller stopped working (the target disconnected or broke the virtio protocol).
 * Every request that was queued or in flight fails with this error.
 */
export class ControllerFailedError extends InitiatorError {
  /** The reason the native layer gave. */
  readonly reason: string;

  constructor(controller: string, reason: string, options?: { cause?: unknown }) {
    super('ERR_VIRTIO_CONTROLLER_FAILED', `controller ${controller} failed: ${reason}`, options);
    this.name = 'ControllerFailedError';
    this.reason = reason;
  }
}

/** The request queue, device or controller was closed before the request completed. */
export class ClosedError extends InitiatorError {
  constructor(message: string) {
    super('ERR_VIRTIO_CLOSED', message);
    this.name = 'ClosedError';
  }
}

/** A request completed with a virtio response other than OK (the SCSI command did not run). */
/** The logical unit is gone from the target (a rescan or a hot-unplug event found it missing). */
export class DeviceRemovedError extends InitiatorError {
  readonly device: string;

  constructor(device: string, reason: string) {
    super('ERR_VIRTIO_DEVICE_REMOVED', `${device}: ${reason}`);
    this.name = 'DeviceRemovedError';
    this.device = device;
  }
}

export class VirtioResponseError extends InitiatorError {
  readonly response: number;
  readonly responseName: string;
  readonly context?: string;

  constructor(response: number, context?: string) {
    const name = virtioResponseName(response);
    const text = `virtio-scsi response ${name} (${response})`;
    super('ERR_VIRTIO_RESPONSE', context ? `${context}: ${text}` : text);
    this.name = 'VirtioResponseError';
    this.response = response;
    this.responseName = name;
    if (context !== undefined) this.context = context;
  }
}

/** The device does not offer what the call needs (e.g. UNMAP on a fully provisioned LUN). */
export class NotSupportedError extends InitiatorError {
  constructor(message: string) {
    super('ERR_VIRTIO_NOT_SUPPORTED', message);
    this.name = 'NotSupportedError';
  }
}

/** The device answered with data that breaks its own promises (short read, bad geometry). */
export class DeviceError extends InitiatorError {
  constructor(message: string) {
    super('ERR_VIRTIO_DEVICE', message);
    this.name = 'DeviceError';
  }
}

/** A virtio-blk device answered a request with VIRTIO_BLK_S_IOERR. */
export class BlkIoError extends InitiatorError {
  constructor(message: string) {
    super('ERR_VIRTIO_BLK_IOERR', message);
    this.name = 'BlkIoError';
  }
}

/** A task management function (ABORT TASK, LOGICAL UNIT RESET, ...) did not succeed. */
export class TaskManagementError extends InitiatorError {
  readonly response: number;
  readonly responseName: string;

  constructor(what: string, response: number) {
    const name = virtioResponseName(response);
    super('ERR_VIRTIO_TASK_MANAGEMENT', `${what}: virtio-scsi response ${name} (${response})`);
    this.name = 'TaskManagementError';
    this.response = response;
    this.responseName = name;
  }
}

/**
 * The device did not finish a request within its deadline. The request is given up on at once;
 * the controller then gets the device to give it back (ABORT TASK, then resets: its `recovery`
 * events tell how that went).
 */
export class RequestTimeoutError extends InitiatorError {
  readonly target: number;
  readonly lun: number;
  readonly timeoutMs: number;

  constructor(label: string, target: number, lun: number, what: string, timeoutMs: number) {
    super('ERR_VIRTIO_TIMEOUT', `${label}: ${what} on ${target}:${lun} timed out after ${timeoutMs} ms`);
    this.name = 'RequestTimeoutError';
    this.target = target;
    this.lun = lun;
    this.timeoutMs = timeoutMs;
  }
}
