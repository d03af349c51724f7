// `virtio-initiator target ...`: the bundled vhost-user-scsi target, run with the arguments as
// given (its own --help describes them). Output goes straight to the terminal, SIGINT and
// SIGTERM are passed on, and its exit status becomes ours.

import { spawn } from 'node:child_process';
import { constants } from 'node:os';

import { defaultTargetBinary } from '../bundled-target.js';
import type { Subcommand } from './args.js';

const FORWARDED = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

export const target: Subcommand = {
  run(argv: string[]): Promise<number> {
    const binary = defaultTargetBinary();
    return new Promise<number>((resolve, reject) => {
      const child = spawn(binary, argv, { stdio: 'inherit' });
      // A Ctrl-C reaches the target on its own (same process group); a signal sent to this
      // process alone must be passed on. A duplicate of a pending signal is merged by the kernel.
      const forward = (signal: NodeJS.Signals): void => {
        child.kill(signal);
      };
      for (const s of FORWARDED) process.on(s, forward);
      const done = (): void => {
        for (const s of FORWARDED) process.off(s, forward);
      };
      child.once('error', (e) => {
        done();
        const hint = 'install the platform package, run npm run build in a checkout, or set VHOST_USER_SCSI_TARGET';
        reject(new Error(`cannot run ${binary}: ${e.message} (${hint})`));
      });
      child.once('exit', (code, signal) => {
        done();
        // Killed by a signal: the shell convention, 128 + its number.
        resolve(code ?? 128 + (signal ? constants.signals[signal] : 0));
      });
    });
  },
};
