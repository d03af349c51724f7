// Running one SCSI command to completion: retries for transient conditions (BUSY, TASK SET FULL,
// UNIT ATTENTION, a unit becoming ready) and typed errors for everything else.

import { setTimeout as sleep } from 'node:timers/promises';

import { VirtioResponse, VirtioResponseError } from './errors.js';
import { type CommandExecutor, type CommandResult, Rejected, type ScsiCommand } from './queue.js';
import { decodeSense, describeCdb, type DecodedSense, ScsiError, ScsiStatus, SenseKey, senseKeyOf } from './scsi/index.js';

export interface RetryPolicy {
  /** BUSY / TASK SET FULL status (and virtio BUSY / RESET responses) retried this many times. */
  busyRetries: number;
  /** UNIT ATTENTION retried this many times. */
  unitAttentionRetries: number;
  /** NOT READY, "in process of becoming ready" (04/01) retried this many times. */
  becomingReadyRetries: number;
  /** First backoff before a BUSY retry, doubled per retry up to `maxBackoffMs`. */
  backoffMs: number;
  maxBackoffMs: number;
  /** Wait between "becoming ready" retries. */
  becomingReadyWaitMs: number;
}

export const DEFAULT_RETRY_POLICY: Readonly<RetryPolicy> = Object.freeze({
  busyRetries: 5,
  unitAttentionRetries: 2,
  becomingReadyRetries: 20,
  backoffMs: 1,
  maxBackoffMs: 50,
  becomingReadyWaitMs: 50,
});

export interface RunOptions {
  /** Names the device in errors, e.g. "VirtioScsi0t1". */
  device: string;
  policy?: Readonly<RetryPolicy>;
  /** Called with each UNIT ATTENTION before the retry (e.g. to re-read a changed capacity). */
  onUnitAttention?: (sense: DecodedSense) => void | Promise<void>;
}

function decoded(sense: Uint8Array | undefined): DecodedSense | undefined {
  if (sense === undefined || sense.length === 0) return undefined;
  try {
    return decodeSense(sense);
  } catch {
    return undefined;
  }
}

/** GOOD, CONDITION MET, or CHECK CONDITION with RECOVERED ERROR (the command did succeed). */
export function succeeded(r: CommandResult): boolean {
  if (r.response !== VirtioResponse.OK) return false;
  if (r.status === ScsiStatus.GOOD || r.status === ScsiStatus.CONDITION_MET) return true;
  // The key is read in place: every UNIT ATTENTION and refusal passes through here.
  return r.status === ScsiStatus.CHECK_CONDITION && r.sense !== undefined && senseKeyOf(r.sense) === SenseKey.RECOVERED_ERROR;
}

/** Throws the typed error for a completion that did not succeed. */
export function throwForResult(r: CommandResult, cmd: ScsiCommand, device: string, note = ''): void {
  if (succeeded(r)) return;
  const context = `${describeCdb(cmd.cdb)} on ${device}${note}`;
  if (r.response !== VirtioResponse.OK) throw new VirtioResponseError(r.response, context);
  const init: ConstructorParameters<typeof ScsiError>[0] = { status: r.status, context };
  if (r.sense !== undefined) init.sense = r.sense;
  throw new ScsiError(init);
}

/**
 * Executes `cmd` and retries what SAM says is worth retrying, within the policy's bounds.
 * Resolves with a successful completion; rejects with VirtioResponseError or ScsiError (naming
 * the command and the device), or with whatever the queue rejected with (abort, close, failure).
 */
export async function runCommand(
  exec: CommandExecutor,
  cmd: ScsiCommand,
  opts: RunOptions,
  first?: CommandResult,
): Promise<CommandResult> {
  const policy = opts.policy ?? DEFAULT_RETRY_POLICY;
  let busy = 0;
  let unitAttention = 0;
  let becomingReady = 0;
  const backoff = async (): Promise<void> => {
    const ms = Math.min(policy.backoffMs * 2 ** (busy - 1), policy.maxBackoffMs);
    await sleep(ms, undefined, cmd.signal ? { signal: cmd.signal } : undefined);
  };
  for (let pending = first; ; pending = undefined) {
    const r = pending ?? (await exec.execute(cmd));
    if (succeeded(r)) return r;

    if (r.response !== VirtioResponse.OK) {
      // The transport asks for a retry: the command never reached the logical unit.
      const transient = r.response === VirtioResponse.BUSY || r.response === VirtioResponse.RESET;
      if (transient && busy < policy.busyRetries) {
        busy++;
        await backoff();
        continue;
      }
      throwForResult(r, cmd, opts.device, transient ? ` (after ${busy} retries)` : '');
    }

    if (r.status === ScsiStatus.BUSY || r.status === ScsiStatus.TASK_SET_FULL) {
      if (busy < policy.busyRetries) {
        busy++;
        await backoff();
        continue;
      }
      throwForResult(r, cmd, opts.device, ` (after ${busy} retries)`);
    }

    if (r.status === ScsiStatus.CHECK_CONDITION) {
      const sense = decoded(r.sense);
      if (sense?.key === SenseKey.UNIT_ATTENTION && unitAttention < policy.unitAttentionRetries) {
        unitAttention++;
        await opts.onUnitAttention?.(sense);
        continue;
      }
      if (
        sense?.key === SenseKey.NOT_READY &&
        sense.asc === 0x04 &&
        sense.ascq === 0x01 &&
        becomingReady < policy.becomingReadyRetries
      ) {
        becomingReady++;
        await sleep(policy.becomingReadyWaitMs, undefined, cmd.signal ? { signal: cmd.signal } : undefined);
        continue;
      }
    }
    throwForResult(r, cmd, opts.device);
  }
}

/** True for a ScsiError whose sense key is ILLEGAL REQUEST: "not implemented here". */
export function isIllegalRequest(e: unknown): e is ScsiError {
  return e instanceof ScsiError && e.key === SenseKey.ILLEGAL_REQUEST;
}

/** Runs commands together (`executeAll` where the executor has it, else one `execute` each). */
export function executeAll(exec: CommandExecutor, cmds: readonly ScsiCommand[]): Promise<Array<CommandResult | Rejected>> {
  if (exec.executeAll !== undefined) return exec.executeAll(cmds);
  return Promise.all(cmds.map((c) => exec.execute(c).then(undefined, (e: unknown) => new Rejected(e))));
}
