// Feedback on long work: `ulobdev hydrate --wait` (hydration started at run time) draws a
// cli-progress bar with size, rate and time left on a terminal (run under script(1) for a pty),
// prints only its result line off a terminal; `detach` says what it flushed.
import { spawnSync } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CLI, mustSh, prepareCliTests, scratch, ulobdev } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
let attached: string[] = [];

beforeAll(() => {
  prepareCliTests();
});

afterEach(async () => {
  for (const name of attached.splice(0)) await ulobdev(['detach', name, '--run-dir', s.runDir]);
  s?.cleanup();
});

async function serve(name: string, extra: string[] = [], env?: NodeJS.ProcessEnv): Promise<string> {
  const disk = join(s.dir, 'disk.img');
  mustSh('truncate', ['-s', '32M', disk]);
  const url = `nbd+unix:///?socket=${join(s.dir, `${name}.sock`)}`;
  const r = await ulobdev(['--writeback', '-c', join(s.dir, `${name}.cache`), '--name', name, '--daemon', '--run-dir', s.runDir, ...extra, url, disk], env ? { env } : {});
  expect(r.code, r.stderr).toBe(0);
  attached.push(name);
  return url;
}

describe('progress and results of long work', () => {
  it('hydrate --wait on a terminal: a progress bar with size, rate and time left, then the result', async () => {
    s = scratch('ulob-progress-');
    await serve('hy');
    const cmd = [process.execPath, CLI, 'hydrate', 'hy', '--wait', '--rate', '8M', '--run-dir', s.runDir].join(' ');
    const r = spawnSync('script', ['-qec', cmd, '/dev/null'], { encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stdout + r.stderr).toBe(0);
    const screen = r.stdout.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '');
    expect(screen).toMatch(/hydrating \[[=-]+\] \d+% \| [\d.]+ (KiB|MiB) of 32 MiB \| [\d.]+ (B|KiB|MiB)\/s \| \S+ left/);
    expect(screen).toMatch(/hy: the whole disk is in the cache \(32 MiB\); reads no longer reach it/);
  });

  it('hydrate off a terminal: no bar, the result line; without --wait it says how far it got', async () => {
    s = scratch('ulob-progress-');
    await serve('hz');
    const started = await ulobdev(['hydrate', 'hz', '--rate', '4M', '--run-dir', s.runDir]);
    expect(started.code, started.stderr).toBe(0);
    expect(started.stdout).toMatch(/^hz: hydrating, [\d.]+% cached \([\d.]+ (B|KiB|MiB) of 32 MiB\); ulobdev hydrate --wait hz to wait\n$/);
    const waited = await ulobdev(['hydrate', 'hz', '--wait', '--run-dir', s.runDir]);
    expect(waited.code, waited.stderr).toBe(0);
    expect(waited.stderr).toBe('');
    expect(waited.stdout).toBe('hz: the whole disk is in the cache (32 MiB); reads no longer reach it\n');
    const status = JSON.parse((await ulobdev(['status', 'hz', '--json', '--run-dir', s.runDir])).stdout);
    expect(status.cachedBytes).toBe(32 << 20);
  });

  it('hydrate on a cache with a budget smaller than the disk: one line, exit 1, nothing started', async () => {
    s = scratch('ulob-progress-');
    await serve('hb', ['--cache-size', '8M']);
    const r = await ulobdev(['hydrate', 'hb', '--run-dir', s.runDir]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^ulobdev: hydrate copies the whole disk \(32 MiB\) into the cache, but its budget is 8 MiB: it would evict what it copies; detach and attach again with --cache-size 100% to hydrate\n$/);
    const status = JSON.parse((await ulobdev(['status', 'hb', '--json', '--run-dir', s.runDir])).stdout);
    expect(status.hydration ?? null).toBeNull();
    expect(status.cachedBytes).toBe(0);
  });

  it('detach says what it flushed and what stays dirty', async () => {
    s = scratch('ulob-progress-');
    const url = await serve('dt', ['--flush', '0 3 * * *']);
    mustSh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 3M', '-c', 'flush', url.replace('///?', '///ulobdev?')]);
    const r = await ulobdev(['detach', 'dt', '--run-dir', s.runDir]);
    attached = [];
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^nbd\+unix:\S+ detached: wrote 3(\.0)? MiB back; nothing stays dirty\n$/);
  });

  it('detach right after a background flush says it waited for that flush, not "no flush" (newuser11 finding 6)', async () => {
    s = scratch('ulob-progress-');
    // The flush holds at its copy until the gate file exists: still running when the detach begins.
    const gate = join(s.dir, 'gate');
    const pauseFile = join(s.dir, 'pause');
    writeFileSync(pauseFile, `flush:copy ${gate}\n`);
    const url = await serve('dw', ['--flush', '0 3 * * *'], { ULOBDEV_PAUSE_FILE: pauseFile });
    mustSh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 3M', '-c', 'flush', url.replace('///?', '///ulobdev?')]);
    const started = await ulobdev(['flush', 'dw', '--run-dir', s.runDir]);
    expect(started.code, started.stderr).toBe(0);
    const detach = ulobdev(['detach', 'dw', '--run-dir', s.runDir]);
    // The detach has closed the NBD server (its socket is gone) before it waits for the flush.
    const sock = join(s.dir, 'dw.sock');
    for (let i = 0; i < 500 && existsSync(sock); i++) await new Promise((r) => setTimeout(r, 20));
    expect(existsSync(sock)).toBe(false);
    await new Promise((r) => setTimeout(r, 300));
    writeFileSync(gate, '');
    const r = await detach;
    attached = [];
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^nbd\+unix:\S+ detached: waited for a running flush that wrote 3(\.0)? MiB back; nothing stays dirty\n$/);
  });
});
