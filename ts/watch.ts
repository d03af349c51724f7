// The event watcher of a controller (design D7). The event queue stays armed while the
// controller is open: it is read from an unref'd timer, so an idle process neither stays alive
// nor spins, and the same tick notices a target that went away. What the events mean is decided
// here; the controller acts on it (rescans, capacity refreshes) and tells its listeners.

import type { ControllerEvent } from './controller.js';

/** How often the event queue and the connection are looked at. */
export const WATCH_INTERVAL_MS = 50;
/** Every this many looks, a device without an event queue (virtio-blk) has its capacity read. */
const CAPACITY_TICKS = 20;

/** TRANSPORT_RESET reasons (virtio 1.2, 5.6.6.3.1). */
const RESET_RESCAN = 1;
const RESET_REMOVED = 2;

/** What a batch of events asks for. */
export interface EventPlan {
  /** Targets to rescan, or 'all' (events were missed, or a target as a whole was reset). */
  rescan: 'all' | number[];
  /** Devices whose capacity to read again. */
  refresh: string[];
  /** Devices whose medium changed. */
  media: string[];
}

/** Sense codes a PARAM_CHANGE event carries (reason = asc | ascq << 8). */
function senseCode(reason: number): [number, number] {
  return [reason & 0xff, (reason >> 8) & 0xff];
}

export function planEvents(events: readonly ControllerEvent[]): EventPlan {
  const targets = new Set<number>();
  const refresh = new Set<string>();
  const media = new Set<string>();
  let all = false;
  for (const e of events) {
    if (e.eventsMissed) all = true;
    switch (e.type) {
      case 'transport-reset':
        if (e.reason === RESET_RESCAN || e.reason === RESET_REMOVED) targets.add(e.target);
        else all = true;
        break;
      case 'param-change': {
        const [asc, ascq] = senseCode(e.reason);
        // CAPACITY DATA HAS CHANGED; REPORTED LUNS DATA HAS CHANGED and INQUIRY DATA HAS
        // CHANGED ask for the target to be looked at again.
        if (asc === 0x2a && ascq === 0x09) refresh.add(e.device);
        else if (asc === 0x3f && (ascq === 0x0e || ascq === 0x03)) targets.add(e.target);
        break;
      }
      case 'async-notify':
        media.add(e.device);
        refresh.add(e.device);
        break;
      default:
        break;
    }
  }
  return { rescan: all ? 'all' : [...targets].sort((a, b) => a - b), refresh: [...refresh], media: [...media] };
}

/** What the watcher needs of its controller. */
export interface Watched {
  /** Events the device posted since the last call. */
  pollEvents(): ControllerEvent[];
  /** Why the device is gone, or null while it is there. */
  checkAlive(): string | null;
  /** Acts on a batch of events. */
  apply(plan: EventPlan): Promise<void>;
  /** The device went away. */
  lost(reason: string): void;
  /** Acting on events failed (the next events are still handled). */
  failedToApply(error: unknown): void;
  /**
   * A device that cannot announce a capacity change (virtio-blk): the devices whose capacity
   * differs from what they know, looked at every second.
   */
  changedCapacity?(): Promise<string[]>;
}

/** One plan that does what both do. */
export function mergePlans(a: EventPlan, b: EventPlan): EventPlan {
  const rescan =
    a.rescan === 'all' || b.rescan === 'all' ? 'all' : [...new Set([...a.rescan, ...b.rescan])].sort((x, y) => x - y);
  return { rescan, refresh: [...new Set([...a.refresh, ...b.refresh])], media: [...new Set([...a.media, ...b.media])] };
}

export class EventWatcher {
  private readonly timer: NodeJS.Timeout;
  /** What events taken while a plan was being applied ask for, merged: applied next. */
  private pending: EventPlan | undefined;
  private applying: Promise<void> | undefined;
  private stopped = false;
  private ticks = 0;
  private lookingAtCapacity = false;

  constructor(private readonly watched: Watched) {
    this.timer = setInterval(() => this.tick(), WATCH_INTERVAL_MS);
    this.timer.unref();
  }

  stop(): void {
    this.stopped = true;
    clearInterval(this.timer);
  }

  /** Resolves once the events taken so far are acted on. */
  async settled(): Promise<void> {
    while (this.applying) await this.applying;
  }

  private tick(): void {
    if (this.stopped) return;
    const failure = this.watched.checkAlive();
    if (failure !== null) {
      this.stop();
      this.watched.lost(failure);
      return;
    }
    let events: ControllerEvent[];
    try {
      events = this.watched.pollEvents();
    } catch (e) {
      this.stop();
      this.watched.lost(e instanceof Error ? e.message : String(e));
      return;
    }
    if (this.watched.changedCapacity && ++this.ticks % CAPACITY_TICKS === 0) this.lookAtCapacity();
    if (events.length === 0) return;
    this.plan(planEvents(events));
  }

  private plan(plan: EventPlan): void {
    this.pending = this.pending ? mergePlans(this.pending, plan) : plan;
    this.applying ??= this.drain();
  }

  private lookAtCapacity(): void {
    if (this.lookingAtCapacity) return;
    this.lookingAtCapacity = true;
    this.watched.changedCapacity!().then(
      (refresh) => {
        this.lookingAtCapacity = false;
        if (refresh.length > 0 && !this.stopped) this.plan({ rescan: [], refresh, media: [] });
      },
      (e: unknown) => {
        this.lookingAtCapacity = false;
        // A device that went away is noticed by the next look at the connection.
        if (!this.stopped) this.watched.failedToApply(e);
      },
    );
  }

  /** Applies pending plans one at a time until none is left. */
  private async drain(): Promise<void> {
    while (this.pending && !this.stopped) {
      const plan = this.pending;
      this.pending = undefined;
      try {
        await this.watched.apply(plan);
      } catch (e) {
        this.watched.failedToApply(e);
      }
    }
    this.applying = undefined;
  }
}
