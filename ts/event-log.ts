// A bounded log of what controllers reported (see ControllerEventMap), numbered so that a reader
// can ask for what happened since it last looked: the management RPC serves it, and the command
// line prints its entries as they are recorded.

import type { BlockDevice } from './block-device.js';
import type { Controller, ControllerEventMap } from './controller.js';
import type { Geometry } from './scan.js';

export interface LoggedEvent {
  /** Increases by one per event, from 1. */
  seq: number;
  /** Milliseconds since the epoch. */
  time: number;
  controller: string;
  event: keyof ControllerEventMap;
  /** The block device the event is about, when it is about one. */
  device?: string;
  detail?: Record<string, unknown>;
}

function geometry(g: Geometry): Record<string, unknown> {
  return { blockSize: g.blockSize, blocks: g.blockCount.toString() };
}

function deviceGeometry(d: BlockDevice): Record<string, unknown> {
  return { blockSize: d.blockSize, blocks: d.blockCount.toString() };
}

/** One line for a person: `VirtioScsi0 device-added VirtioScsi0t1 {...}`. */
export function describeEvent(e: LoggedEvent): string {
  const parts: string[] = [e.controller, e.event];
  if (e.device !== undefined) parts.push(e.device);
  if (e.detail !== undefined) parts.push(JSON.stringify(e.detail));
  return parts.join(' ');
}

export class EventLog {
  private readonly entries: LoggedEvent[] = [];
  private last = 0;
  private readonly unfollow = new Map<Controller, () => void>();

  /** `capacity`: entries kept; older ones are dropped (and counted as such by `since`). */
  constructor(
    private readonly capacity = 1024,
    private readonly onEvent?: (e: LoggedEvent) => void,
  ) {}

  /** Records what `ctrl` reports from now on. */
  follow(ctrl: Controller): void {
    if (this.unfollow.has(ctrl)) return;
    const name = ctrl.name;
    const record = (
      event: keyof ControllerEventMap,
      device?: BlockDevice | string,
      detail?: Record<string, unknown>,
    ): void => {
      const e: LoggedEvent = { seq: ++this.last, time: Date.now(), controller: name, event };
      if (device !== undefined) e.device = typeof device === 'string' ? device : device.name;
      if (detail !== undefined) e.detail = detail;
      this.entries.push(e);
      if (this.entries.length > this.capacity) this.entries.shift();
      this.onEvent?.(e);
    };
    const listeners: { [K in keyof ControllerEventMap]: (...args: ControllerEventMap[K]) => void } = {
      'device-added': (d) => record('device-added', d, deviceGeometry(d)),
      'device-removed': (d) => record('device-removed', d),
      'capacity-changed': (d, before) =>
        record('capacity-changed', d, { before: geometry(before), after: deviceGeometry(d) }),
      'media-changed': (d) => record('media-changed', d),
      rescanned: (result, targets) =>
        record('rescanned', undefined, { targets, luns: result.luns.length, problems: result.problems.length }),
      disconnected: (reason) => record('disconnected', undefined, { reason }),
      reconnected: (attempts) => record('reconnected', undefined, { attempts }),
      failed: (error) => record('failed', undefined, { reason: error.message }),
      'event-error': (error) => record('event-error', undefined, { reason: error.message }),
      recovery: (step) => {
        const { device, ...detail } = step;
        record('recovery', device, { ...detail });
      },
    };
    const names = Object.keys(listeners) as Array<keyof ControllerEventMap>;
    for (const n of names) ctrl.on(n, listeners[n] as never);
    this.unfollow.set(ctrl, () => {
      for (const n of names) ctrl.off(n, listeners[n] as never);
    });
  }

  /** Stops recording `ctrl`. */
  forget(ctrl: Controller): void {
    this.unfollow.get(ctrl)?.();
    this.unfollow.delete(ctrl);
  }

  /** The events after `cursor` (0: all kept), and how many of those were already dropped. */
  since(cursor: number): { cursor: number; dropped: number; events: LoggedEvent[] } {
    const events = this.entries.filter((e) => e.seq > cursor);
    const oldest = this.entries[0]?.seq ?? this.last + 1;
    return { cursor: this.last, dropped: Math.max(0, oldest - cursor - 1), events };
  }
}
