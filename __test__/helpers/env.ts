// Test environment: repository paths, prerequisite checks, and the rule for
// tests whose prerequisites are missing (skip locally, fail in CI).
import { accessSync, constants, existsSync, readFileSync, readdirSync } from 'node:fs';
import { homedir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ImplementationFn } from 'ava';
import { defaultTargetBinary } from '../../ts/bundled-target.js';

export const repoRoot: string = fileURLToPath(new URL('../../', import.meta.url));

/** CI sets CI=true: there a missing prerequisite is a failure, not a skip. */
export const isCI: boolean = process.env.CI === 'true';

/** A prerequisite: returns why it is not met, or undefined when it is. */
export type Requirement = () => string | undefined;

function executable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** Absolute path of `cmd` on $PATH, or undefined. */
export function which(cmd: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (dir !== '' && executable(join(dir, cmd))) return join(dir, cmd);
  }
  // root's tools, in case PATH is a user's
  for (const dir of ['/usr/sbin', '/sbin']) {
    if (executable(join(dir, cmd))) return join(dir, cmd);
  }
  return undefined;
}

/** Guest kernel cache prepared by scripts/setup-system.sh (same default). */
export function guestKernelDir(): string {
  return process.env.GUEST_KERNEL_DIR ?? join(homedir(), '.cache', 'virtio-initiator', 'guest-kernel');
}

/** The bundled target binary: $VHOST_USER_SCSI_TARGET, else the release build. */
export const targetBinary: () => string = defaultTargetBinary;

export const requireRoot: Requirement = () =>
  process.getuid?.() === 0 ? undefined : 'not root (QEMU guests need /dev access and hugepages)';

export function requireCommands(...cmds: string[]): Requirement {
  return () => {
    const missing = cmds.filter((c) => which(c) === undefined);
    return missing.length === 0
      ? undefined
      : `missing ${missing.join(', ')} (run scripts/setup-system.sh as root)`;
  };
}

export const requireGuestKernel: Requirement = () => {
  const dir = guestKernelDir();
  let version: string | undefined;
  try {
    version = readFileSync(join(dir, 'version'), 'utf8').trim();
  } catch {
    // older or hand-made caches: the single version under lib/modules
    try {
      const versions = readdirSync(join(dir, 'lib', 'modules'));
      if (versions.length === 1) version = versions[0];
    } catch {
      version = undefined;
    }
  }
  if (version === undefined || !existsSync(join(dir, 'boot', `vmlinuz-${version}`))) {
    return `no guest kernel in ${dir} (run scripts/setup-system.sh)`;
  }
  if (!existsSync(join(dir, 'lib', 'modules', version, 'modules.dep'))) {
    return `guest kernel ${version} in ${dir} has no modules.dep (run scripts/setup-system.sh)`;
  }
  return undefined;
};

export function requireFile(path: string, hint: string): Requirement {
  return () => (existsSync(path) ? undefined : `${path} is missing (${hint})`);
}

export const requireTargetBinary: Requirement = () => {
  const bin = targetBinary();
  if (!existsSync(bin)) {
    return `${bin} is missing (npm run build)`;
  }
  return executable(bin) ? undefined : `${bin} is not executable`;
};

/** Reasons why requirements are not met (empty when all are). */
export function unmet(requirements: Requirement[]): string[] {
  return requirements.map((r) => r()).filter((r): r is string => r !== undefined);
}

/**
 * Register `impl` as test `title` when all requirements hold.  Otherwise the
 * test fails with the reasons under CI=true, and is skipped elsewhere.  AVA
 * decides skipping at registration time, so the reason goes into the skipped
 * test's title (and to stderr).
 */
/** What testWhen needs of AVA's `test` (or `test.serial`). */
export interface Register {
  (title: string, impl: ImplementationFn<[]>): void;
  skip(title: string, impl: ImplementationFn<[]>): void;
}

export function testWhen(
  test: Register,
  title: string,
  requirements: Requirement[],
  impl: ImplementationFn<[]>,
): void {
  const reasons = unmet(requirements);
  if (reasons.length === 0) {
    test(title, impl);
  } else if (isCI) {
    test(title, (t) => {
      t.fail(`prerequisites missing under CI=true: ${reasons.join('; ')}`);
    });
  } else {
    const why = reasons.join('; ');
    process.stderr.write(`skipping "${title}": ${why}\n`);
    test.skip(`${title} [skipped: ${why}]`, impl);
  }
}
