// `virtio-initiator target ...`: the bundled vhost-user-scsi target, run with the arguments as
// given (its own --help describes them). Output goes straight to the terminal, SIGINT and
// SIGTERM are passed on, and its exit status becomes ours.

import { type ChildProcess, spawn } from 'node:child_process';
import { constants } from 'node:os';

import { defaultTargetBinary } from '../bundled-target.js';
import type { Subcommand } from './args.js';

const FORWARDED = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

export const target: Subcommand = {
  run(argv: string[]): Promise<number> {
    const binary = defaultTargetBinary();
    return new Promise<number>((resolve, reject) => {
      // A Ctrl-C reaches the target on its own (same process group); a signal sent to this
      // process alone must be passed on. A duplicate of a pending signal is merged by the kernel.
      // The handlers go in before the target starts: a signal sent as soon as the target
      // listens must not find this process without them (it would die and orphan the target).
      // Signals are handled on a later turn of the event loop, when `child` is set.
      let child: ChildProcess | undefined;
      const forward = (signal: NodeJS.Signals): void => {
        child?.kill(signal);
      };
      for (const s of FORWARDED) process.on(s, forward);
      child = spawn(binary, argv, { stdio: 'inherit' });
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
