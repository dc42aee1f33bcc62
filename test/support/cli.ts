// Running the built ulobdev CLI from tests, and the loop devices it binds.
import { execFile, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const CLI = join(ROOT, 'dist/cli/ulobdev.js');

export function assertBuilt(): void {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run 'make build' (make test does) first`);
}

/** For a test file's beforeAll: the CLI is built and the Debian tools the tests drive are installed. */
export function prepareCliTests(): void {
  assertBuilt();
  mustSh('bash', [join(ROOT, 'scripts/install-test-deps.sh')]);
}

/** Every file under `dir` with its size, mtime and sha256: equal snapshots mean nothing changed. */
export function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      const st = statSync(p);
      if (st.isDirectory()) walk(p);
      else out[p] = `${st.size}:${st.mtimeMs}:${st.isFile() ? createHash('sha256').update(readFileSync(p)).digest('hex') : 'special'}`;
    }
  };
  walk(dir);
  return out;
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * The environment of a ulobdev run from a test: with `--run-dir DIR` among the arguments (every
 * attach of a test has one), ULOBDEV_STATE_DIR is DIR's sibling `state` (scratch().stateDir), so
 * default caches and disk records stay in the test's scratch directory, never /var/lib/ulobdev.
 */
export function testEnv(args: string[], env?: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const out = { ...process.env, ...env };
  const i = args.indexOf('--run-dir');
  if (out.ULOBDEV_STATE_DIR === undefined && i >= 0 && args[i + 1]) out.ULOBDEV_STATE_DIR = join(dirname(args[i + 1]!), 'state');
  return out;
}

/** Runs ulobdev to completion (attach with --daemon returns once the device is ready). */
export function ulobdev(args: string[], options: { uid?: number; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
  const argv = options.uid === undefined ? [process.execPath, CLI, ...args] : ['setpriv', `--reuid=${options.uid}`, `--regid=${options.uid}`, '--clear-groups', process.execPath, CLI, ...args];
  return new Promise((resolvePromise) => {
    const env = testEnv(args, options.env);
    execFile(argv[0]!, argv.slice(1), { timeout: options.timeoutMs ?? 60_000, encoding: 'utf8', env }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? ((err as { code: number }).code) : 1) : 0;
      resolvePromise({ code, stdout, stderr });
    });
  });
}

export function sh(cmd: string, args: string[]): SpawnSyncReturns<string> {
  return spawnSync(cmd, args, { encoding: 'utf8' });
}

export function mustSh(cmd: string, args: string[]): string {
  const r = sh(cmd, args);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr || r.error?.message}`);
  return r.stdout;
}

/** A scratch directory with private run and state dirs, so tests never touch /run/ulobdev. */
export function scratch(prefix: string): { dir: string; runDir: string; stateDir: string; cleanup(): void } {
  const dir = mkdtempSync(join(process.env.ULOB_TEST_DIR ?? '/var/tmp', prefix));
  return {
    dir,
    runDir: join(dir, 'run'),
    stateDir: join(dir, 'state'),
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}

export function freeLoop(): string {
  return mustSh('losetup', ['-f']).trim();
}

/** What an attach on a free loop device refuses with when another test took the device first. */
const LOOP_TAKEN = /in use|Device or resource busy/;

/**
 * Attaches on a free /dev/loopN: `attach(loop)` runs the command (ulobdev or ulohttp, with that
 * device among its arguments). Another test on the machine may take the device between `losetup -f`
 * and the attach (refused with "in use" or EBUSY): then it tries the next free one, `attempts` times
 * in all. Resolves with the device and the attach's result; throws `failed` with the exit code and
 * stderr when an attempt fails for any other reason, or the last attempt fails.
 */
export async function attachFreeLoop(attach: (loop: string) => Promise<CliResult>, failed = 'attach failed', attempts = 4): Promise<{ loop: string; result: CliResult }> {
  for (let attempt = 1; ; attempt++) {
    const loop = freeLoop();
    const result = await attach(loop);
    if (result.code === 0) return { loop, result };
    if (!LOOP_TAKEN.test(result.stderr) || attempt >= attempts) throw new Error(`${failed} (${loop}, exit ${result.code}): ${result.stderr}`);
  }
}

/**
 * A /dev/loopN the kernel has not made (N from 256 up, at random): for attaches that must be
 * refused before any device is bound, so that no other test taking a free loop device meanwhile
 * can turn the expected refusal into "in use". ulobdev would make it with LOOP_CTL_ADD only when
 * it binds, which a refused attach never reaches. Also for a device a test detaches and binds again
 * with the same command: `losetup -f` (the lowest free number) in a test beside it never takes it.
 */
export function unusedLoop(): string {
  for (;;) {
    const n = 256 + Math.floor(Math.random() * 768);
    if (!existsSync(`/sys/block/loop${n}`)) return `/dev/loop${n}`;
  }
}

/** `losetup -a` lines of loop devices bound to anything under `dir` (other tests share the machine). */
export function loopsUnder(dir: string): string {
  return sh('losetup', ['-a']).stdout.split('\n').filter((l) => l.includes(dir)).join('\n');
}

export { tmpdir };

/**
 * Last-resort cleanup after a test whose daemon hung or was killed: SIGKILLs every process whose
 * command line names `dir` (daemons and nbdfuse started by that test only), then unbinds the loop
 * devices bound to files under `runDir` and lazily unmounts the FUSE mounts under it.
 */
export function killStrays(dir: string, runDir: string): void {
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    let cmdline = '';
    try {
      cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    } catch {
      continue;
    }
    if (Number(pid) !== process.pid && cmdline.includes(dir)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        // gone meanwhile
      }
    }
  }
  for (const name of readdirSync('/sys/block').filter((n) => /^loop\d+$/.test(n))) {
    let backing = '';
    try {
      backing = readFileSync(`/sys/block/${name}/loop/backing_file`, 'utf8').trim();
    } catch {
      continue;
    }
    if (backing.startsWith(runDir)) sh('losetup', ['-d', `/dev/${name}`]);
  }
  const mounts = readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .filter((l) => / - fuse /.test(l))
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m.startsWith(runDir))
    .sort((a, b) => b.length - a.length);
  for (const m of mounts) sh('umount', ['-l', m]);
}
