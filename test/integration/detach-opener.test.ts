// Detach's busy check (assertReleasable, every frontend) and a process that has the device open
// only for a moment (`losetup -a` elsewhere on the machine, blkid, a monitoring tool): it waits for
// the opener to close instead of refusing. Session 13's clean-clone run had `ulohttp detach`
// refused by a parallel test's `losetup -a`. An opener that stays past the grace is refused
// (partitions.test checks the refusal's words through the CLI).
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { assertReleasable, OPENER_GRACE_MS } from '../../src/bdev/partitions.js';
import { DeviceBusyError } from '../../src/errors.js';
import { mustSh, scratch, sh } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
const undo: Array<() => unknown> = [];

afterEach(() => {
  for (const step of undo.splice(0).reverse()) step();
  s?.cleanup();
});

/** A process that opens `dev` and keeps it open for `seconds`; resolves once the open is done. */
async function holdOpen(dev: string, seconds: number): Promise<void> {
  const child = spawn('bash', ['-c', `exec 3<${dev}; echo open; sleep ${seconds}`], { stdio: ['ignore', 'pipe', 'inherit'] });
  undo.push(() => child.kill('SIGKILL'));
  await new Promise<void>((resolve, reject) => {
    child.stdout.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`the opener exited (${code}) before it opened ${dev}`)));
  });
}

describe('the busy check before a detach', () => {
  it('waits for a short-lived opener, and refuses one that stays past the grace', async () => {
    s = scratch('ulob-opener-');
    const image = join(s.dir, 'disk.img');
    mustSh('truncate', ['-s', '16M', image]);
    const dev = mustSh('losetup', ['-f', '--show', image]).trim();
    undo.push(() => sh('losetup', ['-d', dev]));
    const sys = `/sys/block/${dev.slice('/dev/'.length)}`;

    // Open for a moment (a quarter of the grace): the check waits and passes.
    await holdOpen(dev, OPENER_GRACE_MS / 4000);
    const t0 = Date.now();
    await assertReleasable(dev, sys);
    expect(Date.now() - t0).toBeLessThan(OPENER_GRACE_MS);

    // Open past the grace: refused after it, naming the opener.
    await holdOpen(dev, OPENER_GRACE_MS / 1000 + 5);
    const t1 = Date.now();
    const err = await assertReleasable(dev, sys).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DeviceBusyError);
    expect((err as Error).message).toMatch(new RegExp(`^${dev} stays attached: ${dev} is open by pid \\d+ \\((bash|sleep)\\); stop or close it first$`));
    expect(Date.now() - t1).toBeGreaterThanOrEqual(OPENER_GRACE_MS - 100);
  }, 60_000);
});
