// Diagnostics on stderr, one line per event: a level for the whole package (and the native core)
// from `setLogLevel` or the VIRTIO_INITIATOR_LOG environment variable, and the per-command trace
// a controller can be opened with (`trace: true`). Nothing of it runs on the I/O path when off.

import { loadNative } from './native.js';

export const LOG_LEVELS = ['off', 'error', 'warn', 'info', 'debug', 'trace'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export const LOG_ENV = 'VIRTIO_INITIATOR_LOG';

function parse(level: string | undefined): LogLevel | undefined {
  const l = level?.trim().toLowerCase();
  return (LOG_LEVELS as readonly string[]).includes(l ?? '') ? (l as LogLevel) : undefined;
}

let current: LogLevel = parse(process.env[LOG_ENV]) ?? 'warn';

/** The level for this package's own lines and the native core's. */
export function setLogLevel(level: LogLevel): void {
  const l = parse(level);
  if (l === undefined) throw new RangeError(`log level ${JSON.stringify(level)} is not one of ${LOG_LEVELS.join(', ')}`);
  current = l;
  loadNative().setLogLevel(l);
}

export function logLevel(): LogLevel {
  return current;
}

export function logEnabled(level: Exclude<LogLevel, 'off'>): boolean {
  return LOG_LEVELS.indexOf(level) <= LOG_LEVELS.indexOf(current);
}

/** One line on stderr, when the level lets it through. */
export function log(level: Exclude<LogLevel, 'off'>, component: string, message: string): void {
  if (!logEnabled(level)) return;
  const now = Date.now();
  process.stderr.write(`${Math.floor(now / 1000)}.${String(now % 1000).padStart(3, '0')} virtio-initiator ${level} ${component}: ${message}\n`);
}
