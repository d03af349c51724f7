// Runs the virtio-initiator command line from its TypeScript sources (no dist build needed) and
// collects its exit status and output, for the CLI specs.
import { spawn } from 'node:child_process';
import { join } from 'node:path';

import { repoRoot } from './env.js';

export interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs the CLI from its TypeScript sources (no dist build needed). */
export function cli(args: string[], opts: { timeoutMs?: number; onSpawn?: (pid: number) => void } = {}): Promise<Run> {
  // A process group of its own: on timeout the whole group goes, the processes the CLI started
  // too (one left behind would hold the output pipes open, and the run would never end).
  const child = spawn(process.execPath, ['--import', 'tsx', join(repoRoot, 'ts', 'cli', 'main.ts'), ...args], {
    cwd: repoRoot,
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  if (child.pid !== undefined) opts.onSpawn?.(child.pid);
  const timer = setTimeout(() => {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      child.kill('SIGKILL');
    }
  }, opts.timeoutMs ?? 120_000);
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}
