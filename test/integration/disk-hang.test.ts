// A backing disk that stops answering (invariant 8): nbdkit's pause filter under a FUSE file (the
// daemon's backing file) holds every request sent to it after 'p' until 'r'. A flush started then
// has its copies stuck in writes that never return; `ulobdev status` must still answer at once and
// say the disk is not answering, and hits (blocks in the cache) must still be served. Resumed, the
// flush completes and the device detaches clean.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { killStrays, mustSh, prepareCliTests, scratch, sh, ulobdev } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
const undo: Array<() => Promise<unknown> | unknown> = [];

beforeAll(() => {
  prepareCliTests();
}, 900_000);

afterEach(async () => {
  for (const step of undo.splice(0).reverse()) await step();
  killStrays(s.dir, s.runDir);
  s?.cleanup();
});

async function waitFor(what: string, ok: () => boolean): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (ok()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** Sends one pause-filter command ('p' or 'r') and waits for its echo ('P' or 'R'). */
function pauseControl(sock: string, cmd: 'p' | 'r'): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = net.connect(sock, () => c.write(cmd));
    const timer = setTimeout(() => (c.destroy(), reject(new Error(`no '${cmd.toUpperCase()}' from nbdkit's pause filter`))), 10_000);
    c.on('data', (d) => {
      if (d.toString().includes(cmd.toUpperCase())) {
        clearTimeout(timer);
        c.end();
        resolve();
      }
    });
    c.on('error', reject);
  });
}

/** A 64 MiB disk (nbdkit memory plugin) behind the pause filter, exported as one file by nbdfuse. */
async function pausableDisk(): Promise<{ file: string; release: () => Promise<void>; pause: () => Promise<void>; resume: () => Promise<void> }> {
  const sock = join(s.dir, 'nbdkit.sock');
  const ctl = join(s.dir, 'pause.sock');
  const pidfile = join(s.dir, 'nbdkit.pid');
  mustSh('nbdkit', ['-U', sock, '-P', pidfile, '--filter=pause', 'memory', '64M', `pause-control=${ctl}`]);
  undo.push(() => {
    if (existsSync(pidfile)) sh('kill', [readFileSync(pidfile, 'utf8').trim()]);
  });
  const mnt = join(s.dir, 'fuse');
  mkdirSync(mnt);
  const fuse: ChildProcess = spawn('nbdfuse', [join(mnt, 'disk'), '--unix', sock], { stdio: 'ignore' });
  undo.push(() => {
    sh('fusermount3', ['-u', '-z', mnt]);
    fuse.kill('SIGKILL');
  });
  await waitFor('nbdfuse', () => existsSync(join(mnt, 'disk')));
  let paused = false;
  const release = async () => {
    if (paused) await pauseControl(ctl, 'r').catch(() => undefined);
    paused = false;
  };
  undo.push(release);
  return {
    file: join(mnt, 'disk'),
    release,
    pause: async () => {
      await pauseControl(ctl, 'p');
      paused = true;
    },
    resume: async () => {
      await pauseControl(ctl, 'r');
      paused = false;
    },
  };
}

describe('a backing disk that does not answer', () => {
  it('status answers at once and says so; hits are still served; the flush completes once it answers', async () => {
    s = scratch('ulob-disk-hang-');
    const disk = await pausableDisk();
    const sock = join(s.dir, 'dev.sock');
    const r = await ulobdev(['--writeback', '-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap'), '--name', 'h', '--daemon', '--run-dir', s.runDir, `nbd+unix:///?socket=${sock}`, disk.file]);
    expect(r.code, r.stderr).toBe(0);
    // Whatever the test did, the disk answers again before the detach (which flushes nothing but
    // waits for a flush in progress).
    undo.push(async () => {
      await disk.release();
      await ulobdev(['detach', 'h', '--run-dir', s.runDir], { timeoutMs: 120_000 });
    });
    const url = `nbd+unix:///ulobdev?socket=${sock}`;
    // 32 MiB dirty: more copy batches (4 MiB each) than the flusher keeps in flight.
    expect(sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 32M', '-c', 'flush', url]).status).toBe(0);

    await disk.pause();
    const flush = await ulobdev(['flush', 'h', '--run-dir', s.runDir]);
    expect(flush.code, flush.stderr).toBe(0);

    // Every status answers while the copies hang (the CLI gives up after 10 s with "no answer from
    // the daemon": what it did before; no bound on speed here, a loaded machine starts node slowly);
    // within 30 s the disk shows as not answering.
    let text = '';
    const until = Date.now() + 30_000;
    for (;;) {
      const st = await ulobdev(['status', 'h', '--run-dir', s.runDir], { timeoutMs: 20_000 });
      expect(st.stderr).toBe('');
      expect(st.code).toBe(0);
      text = st.stdout;
      if (/backing disk NOT ANSWERING/.test(text) || Date.now() > until) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
    expect(text).toMatch(/\n {2}backing disk NOT ANSWERING \(an I\/O has waited \d+ s\)/);
    expect(text).toMatch(/\n {2}flushing \(manual\)/);
    const json = JSON.parse((await ulobdev(['status', 'h', '--json', '--run-dir', s.runDir])).stdout);
    expect(json.disk.state).toBe('stuck');
    expect(json.disk.waitingSeconds).toBeGreaterThanOrEqual(10);

    // Hits: blocks in the cache are read without the disk, while it hangs (it is paused for certain:
    // without the fix this read never ends, and `timeout` stops it after 20 s).
    const hit = sh('timeout', ['20', 'qemu-io', '-f', 'raw', '-c', 'read -P 0x5a 0 8M', '-c', 'read -P 0x5a 24M 8M', url]);
    expect(hit.status, hit.stdout + hit.stderr).toBe(0);

    await disk.resume();
    const done = await ulobdev(['flush', 'h', '--wait', '--run-dir', s.runDir], { timeoutMs: 60_000 });
    expect(done.code, done.stderr).toBe(0);
    const after = JSON.parse((await ulobdev(['status', 'h', '--json', '--run-dir', s.runDir])).stdout);
    expect(after.dirtyBytes).toBe(0);
    expect(after.disk.state).toBe('ok');
  });
});
