// Output pieces shared by the subcommands: a live progress line on a terminal, aligned tables,
// the one-line JSON result, and what controllers report while a command runs.

import type { Controller } from '../controller.js';
import { describeEvent, EventLog, type LoggedEvent } from '../event-log.js';

/** A line rewritten in place on a terminal (stderr by default); does nothing elsewhere. */
export class ProgressLine {
  private shown = false;
  readonly enabled: boolean;

  constructor(private readonly stream: NodeJS.WriteStream = process.stderr) {
    this.enabled = stream.isTTY === true;
  }

  update(text: string): void {
    if (!this.enabled) return;
    const width = this.stream.columns > 1 ? this.stream.columns - 1 : 100;
    // \r and erase-to-end-of-line: a shorter line leaves nothing of the previous one behind.
    this.stream.write(`\r${text.slice(0, width)}\x1b[K`);
    this.shown = true;
  }

  clear(): void {
    if (!this.shown) return;
    this.stream.write('\r\x1b[K');
    this.shown = false;
  }
}

/** Rows as aligned columns; columns listed in `right` are right-aligned (numbers). */
export function table(rows: readonly (readonly string[])[], right: ReadonlySet<number> = new Set()): string {
  if (rows.length === 0) return '';
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows
    .map((r) =>
      r
        .map((c, i) => (right.has(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!)))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

/** 12345678 -> "12.3M"; for live figures where width matters more than digits. */
export function compact(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}G`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(1)}k`;
  return String(Math.round(n));
}

/** The machine-readable result: one JSON object on one line of stdout. */
export function writeJsonLine(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

/**
 * Prints what the controllers report from now on, one stderr line per event, except the kinds
 * in `except` (a scan's own results, which the command prints anyway).
 */
export function printEvents(
  command: string,
  controllers: readonly Controller[],
  except: ReadonlyArray<LoggedEvent['event']> = [],
): EventLog {
  const events = new EventLog(64, (e) => {
    if (!except.includes(e.event)) process.stderr.write(`virtio-initiator ${command}: event ${describeEvent(e)}\n`);
  });
  for (const c of controllers) events.follow(c);
  return events;
}
