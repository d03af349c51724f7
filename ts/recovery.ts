// Getting a device to give back requests the initiator gave up on (timed out, or aborted by the
// caller), escalating as Linux's SCSI error handler does: ABORT TASK for the request, then
// LOGICAL UNIT RESET, then I_T NEXUS RESET for its target, then a reset of the device and its
// bring-up from a clean state. A task management answer alone is not trusted: a step succeeds
// when the request has come back, which each step waits for, bounded. When none brings it back,
// the controller is failed. A device without task management (virtio-blk) goes straight to the
// reset.

import type { AbandonedRequest } from './queue.js';
import { lunName } from './scan.js';

/** virtio-scsi task management functions (VIRTIO_SCSI_T_TMF_*). */
export const TMF_ABORT_TASK = 0;
export const TMF_I_T_NEXUS_RESET = 4;
export const TMF_LOGICAL_UNIT_RESET = 5;

/** How long each step waits for the request to come back. */
export const RECOVERY_STEP_MS = 2000;

export type RecoveryAction = 'abort-task' | 'lun-reset' | 'target-reset' | 'device-reset';

/** One step of the recovery of a request, as the controller's `recovery` event reports it. */
export interface RecoveryStep {
  /** The LUN's device name (`VirtioScsi0t0`). */
  device: string;
  /** What the request was ("READ of 8 blocks at LBA 0"). */
  request: string;
  why: AbandonedRequest['why'];
  action: RecoveryAction;
  /** The virtio-scsi response to the task management function, when there was one (not for a device reset). */
  response?: number;
  /** Why the function could not be carried out, when it could not. */
  error?: string;
  /** Whether the device gave the request back within the step's bound. */
  returned: boolean;
}

export interface RecoveryContext {
  controllerName: string;
  /** Absent for a device without task management (virtio-blk). */
  taskManagement?(target: number, lun: number, fn: number, tag?: number): Promise<number>;
  report(step: RecoveryStep): void;
  /**
   * Resets the device and brings it up again, failing whatever is in flight (the request among
   * them); resolves with why it could not, or undefined.
   */
  resetDevice(reason: string): Promise<string | undefined>;
  /** No step brought the request back. */
  giveUp(reason: string): void;
}

const STEPS: ReadonlyArray<readonly [RecoveryAction, number]> = [
  ['abort-task', TMF_ABORT_TASK],
  ['lun-reset', TMF_LOGICAL_UNIT_RESET],
  ['target-reset', TMF_I_T_NEXUS_RESET],
];

/** Resolves true when `p` settles within `ms`, false otherwise (the timer keeps no process alive). */
function within(p: Promise<void>, ms: number): Promise<boolean> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), ms);
    timer.unref();
    void p.then(() => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

export class Recovery {
  /** Per LUN, the recovery under way: requests of one LUN are recovered one after another, so
   * that a reset that brought several back is not repeated for each. */
  private readonly running = new Map<string, Promise<void>>();

  constructor(private readonly ctx: RecoveryContext) {}

  /** Starts (or queues behind the LUN's current one) the recovery of `req`. */
  recover(req: AbandonedRequest): void {
    const key = `${req.target}:${req.lun}`;
    const run = (this.running.get(key) ?? Promise.resolve()).then(() => this.escalate(req));
    this.running.set(key, run);
    void run.finally(() => {
      if (this.running.get(key) === run) this.running.delete(key);
    });
  }

  private async escalate(req: AbandonedRequest): Promise<void> {
    let back = false;
    void req.returned.then(() => {
      back = true;
    });
    // A request that came back meanwhile (or was brought back by an earlier recovery of its
    // LUN) needs nothing.
    await Promise.resolve();
    const tmf = this.ctx.taskManagement?.bind(this.ctx);
    const device = tmf ? lunName(this.ctx.controllerName, req.target, req.lun) : this.ctx.controllerName;
    for (const [action, fn] of tmf ? STEPS : []) {
      if (back) return;
      const step: RecoveryStep = { device, request: req.what, why: req.why, action, returned: false };
      try {
        step.response = await tmf!(req.target, req.lun, fn, action === 'abort-task' ? req.tag : undefined);
      } catch (e) {
        step.error = e instanceof Error ? e.message : String(e);
      }
      step.returned = back || (await within(req.returned, RECOVERY_STEP_MS));
      this.ctx.report(step);
      if (step.returned) return;
    }
    if (back) return;
    const why = tmf
      ? `${device}: the device did not give back ${req.what} after ABORT TASK, LOGICAL UNIT RESET and I_T NEXUS RESET`
      : `${device}: the device did not give back ${req.what} (virtio-blk has no task management)`;
    const reset: RecoveryStep = { device, request: req.what, why: req.why, action: 'device-reset', returned: false };
    const error = await this.ctx.resetDevice(why);
    if (error !== undefined) reset.error = error;
    reset.returned = back || (await within(req.returned, RECOVERY_STEP_MS));
    this.ctx.report(reset);
    if (reset.returned && error === undefined) return;
    this.ctx.giveUp(`${why}, nor after a device reset${error === undefined ? '' : ` (${error})`}`);
  }
}
