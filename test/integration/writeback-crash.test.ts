// kill -9 of the daemon in the middle of a flush: after a restart the flush completes on its own
// (the schedule), nothing is lost, and the backing file equals the device.
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { mustSh, prepareCliTests, scratch, sh, ulobdev } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
const undo: Array<() => Promise<unknown> | unknown> = [];

beforeAll(() => {
  prepareCliTests();
});

afterEach(async () => {
  for (const step of undo.splice(0).reverse()) await step();
  s?.cleanup();
});

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

describe('crash during a flush', () => {
  it('resumes after kill -9: the next flush completes and the disk equals the device', async () => {
    s = scratch('ulob-crashflush-');
    const SIZE = 192 << 20;
    const disk = join(s.dir, 'disk.img');
    mustSh('truncate', ['-s', String(SIZE), disk]);
    const sock = join(s.dir, 'nbd.sock');
    const url = `nbd+unix:///?socket=${sock}`;
    const client = `nbd+unix:///ulobdev?socket=${sock}`;
    const base = ['--writeback', '-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap'), '--name', 'k', '--run-dir', s.runDir];
    const attach = async (extra: string[]) => {
      const r = await ulobdev([...base, ...extra, '--daemon', url, disk]);
      expect(r.code, r.stderr).toBe(0);
      undo.push(() => ulobdev(['detach', 'k', '--run-dir', s.runDir]));
    };
    const status = async () => JSON.parse((await ulobdev(['status', 'k', '--json', '--run-dir', s.runDir])).stdout);

    await attach([]);
    // 160 MiB of dirty data in 5 extents, so the flush takes a while.
    const expected = Buffer.alloc(SIZE);
    for (let i = 0; i < 5; i++) {
      const data = randomBytes(32 << 20);
      const off = i * (36 << 20);
      const f = join(s.dir, `d${i}`);
      writeFileSync(f, data);
      const r = sh('qemu-io', ['-f', 'raw', '-c', `write -s ${f} ${off} ${data.byteLength}`, '-c', 'flush', client]);
      expect(r.status, r.stderr).toBe(0);
      data.copy(expected, off);
    }
    const pid = (await status()).pid as number;
    const started = await ulobdev(['flush', 'k', '--run-dir', s.runDir]);
    expect(started.stdout).toMatch(/flushing 160 MiB/);
    // Kill as soon as the flush has written something.
    for (let i = 0; i < 200; i++) {
      const st = await status().catch(() => null);
      if (!st || (st.writeback.progress?.doneBytes ?? 0) > 0 || st.dirtyBytes === 0) break;
    }
    process.kill(pid, 'SIGKILL');
    undo.pop();
    await new Promise((r) => setTimeout(r, 300));
    const midway = readFileSync(disk);
    const interrupted = !midway.equals(expected);

    const attachedAt = Date.now();
    await attach(['--flush', '*/1 * * * * *']);
    const st0 = await status();
    if (interrupted) {
      // All 160 MiB are dirty again after the crash. The schedule (every second) may already have
      // written them back before this status answered (seen at load 4 in the clean-clone run): then
      // that flush, the restarted daemon's, wrote all 160 MiB.
      if (st0.dirtyBytes !== 160 << 20) {
        expect(st0.dirtyBytes, 'dirty right after the restart: all of it, or none once flushed').toBe(0);
        expect(st0.writeback.lastFlushBytes).toBe(160 << 20);
        expect(st0.writeback.lastFlushAt).toBeGreaterThanOrEqual(attachedAt - 1000);
      }
    }
    for (let i = 0; ; i++) {
      if ((await status()).dirtyBytes === 0) break;
      if (i > 150) throw new Error('the flush did not complete after the restart');
      await new Promise((r) => setTimeout(r, 200));
    }
    expect(sha(readFileSync(disk))).toBe(sha(expected));
    console.log(`kill -9 landed ${interrupted ? 'mid-flush' : 'after the flush completed'}`);
  }, 120_000);
});
