// A cache smaller than the disk (issue 12), end to end on /dev/loopN through the real CLI: a 2 GiB
// ext4 disk behind --cache-size 256M takes 1.5 GiB of files written with fsyncs; the cache file
// never holds more than the budget plus slack while dirty data is flushed ('budget') to make room;
// everything reads back after dropping the page cache and after a re-attach; after a flush and a
// detach the disk equals what the device showed, and fsck finds it clean. And a punched hole on the
// device (issue 14, item 4a): the range reads zeros at once, costs no flash, and the disk holds
// zeros after the next flush.
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, fsyncSync, openSync, readFileSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { shaOf, useLoopFixture, type Scratch } from '../support/loop-fixture.js';
import { attachFreeLoop, mustSh, prepareCliTests, sh, ulobdev } from '../support/cli.js';

const MiB = 1 << 20;
const BUDGET = 256 * MiB;
/** What the flash filesystem may charge beyond the budget: a unit being punched, extent-tree blocks. */
const SLACK = 8 * MiB;

const fx = useLoopFixture();
let s: Scratch;

beforeAll(() => {
  prepareCliTests();
});

function sha(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

async function attach(args: string[], disk: string): Promise<string> {
  const { loop } = await attachFreeLoop((dev) => ulobdev([...args, '--daemon', '--run-dir', s.runDir, '--state-dir', s.stateDir, dev, disk], { timeoutMs: 120_000 }));
  fx.attached(loop);
  return loop;
}

async function detach(loop: string): Promise<void> {
  const r = await ulobdev(['detach', loop, '--run-dir', s.runDir], { timeoutMs: 600_000 });
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  fx.detached(loop);
}

async function status(loop: string): Promise<Record<string, any>> {
  const r = await ulobdev(['status', loop, '--json', '--run-dir', s.runDir]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

const mount = (dev: string, dir: string) => fx.mount(dev, dir);
const umount = fx.umount;

function dropCaches(): void {
  writeFileSync('/proc/sys/vm/drop_caches', '3');
}

describe('a cache budget on /dev/loopN', () => {
  it('holds 1.5 GiB of files on a 2 GiB disk in 256M of flash: within the budget, all read back, the disk equal to the device after flush and detach', async () => {
    s = fx.scratch('ulob-budget-');
    const disk = join(s.dir, 'disk.img');
    const cache = join(s.dir, 'c.cache');
    mustSh('truncate', ['-s', '2G', disk]);
    const args = ['-c', cache, '-b', join(s.dir, 'c.bitmap'), '--writeback'];
    const loop = await attach([...args, '--cache-size', '256M'], disk);
    const held = () => statSync(cache).blocks * 512;

    mustSh('mkfs.ext4', ['-q', loop]);
    const mnt = join(s.dir, 'mnt');
    mount(loop, mnt);
    const files = new Map<string, string>();
    let maxHeld = 0;
    // 1.5 GiB in 48 files of 32 MiB, each written and fsynced.
    for (let i = 0; i < 48; i++) {
      const data = randomBytes(32 * MiB);
      const fd = openSync(join(mnt, `f${i}`), 'w');
      for (let off = 0; off < data.byteLength; off += 4 * MiB) writeSync(fd, data, off, 4 * MiB);
      fsyncSync(fd);
      closeSync(fd);
      files.set(`f${i}`, sha(data));
      maxHeld = Math.max(maxHeld, held());
      expect(held(), `after file ${i}`).toBeLessThanOrEqual(BUDGET + SLACK);
    }
    const st = await status(loop);
    expect(st).toMatchObject({ budgetBytes: BUDGET, evictionUnit: 256 * 1024 });
    expect(st.usedBytes).toBeLessThanOrEqual(BUDGET);
    expect(st.allocatedBytes).toBeLessThanOrEqual(BUDGET + SLACK);
    // The budget filled with dirty data more than once: flushes made room (reason 'budget').
    const report = JSON.parse((await ulobdev(['report', loop, '--json', '--run-dir', s.runDir])).stdout);
    expect(report.flushes.filter((f: { reason: string }) => f.reason === 'budget').length).toBeGreaterThan(0);

    dropCaches();
    for (const [name, sum] of files) expect(sha(readFileSync(join(mnt, name))), name).toBe(sum);
    expect(held()).toBeLessThanOrEqual(BUDGET + SLACK);
    umount(mnt);
    await detach(loop);

    // Re-attached without --cache-size: the cache keeps its budget.
    const again = await attach(args, disk);
    expect((await status(again)).budgetBytes).toBe(BUDGET);
    mount(again, mnt);
    for (const [name, sum] of files) expect(sha(readFileSync(join(mnt, name))), name).toBe(sum);
    umount(mnt);
    const flushed = await ulobdev(['flush', again, '--wait', '--json', '--run-dir', s.runDir], { timeoutMs: 600_000 });
    expect(flushed.code, flushed.stderr).toBe(0);
    expect((await status(again)).dirtyBytes).toBe(0);
    const device = shaOf(again);
    expect(held()).toBeLessThanOrEqual(BUDGET + SLACK);
    await detach(again);
    expect(shaOf(disk)).toBe(device);
    const fsck = sh('fsck.ext4', ['-fn', disk]);
    expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
    expect(maxHeld).toBeGreaterThan(BUDGET / 2);
  }, 1_800_000);

  it('a punched hole on /dev/loopN reads zeros at once, frees its flash, and reaches the disk as zeros at the flush', async () => {
    s = fx.scratch('ulob-budget-');
    const disk = join(s.dir, 'disk.img');
    const cache = join(s.dir, 'c.cache');
    const content = randomBytes(64 * MiB);
    writeFileSync(disk, content);
    const loop = await attach(['-c', cache, '-b', join(s.dir, 'c.bitmap'), '--writeback', '--cache-size', '32M'], disk);
    const held = () => statSync(cache).blocks * 512;
    // 16M-20M read (clean, present), 24M-28M written (dirty).
    mustSh('dd', [`if=${loop}`, 'of=/dev/null', 'iflag=direct,skip_bytes,count_bytes', `skip=${16 * MiB}`, `count=${4 * MiB}`, 'bs=1M', 'status=none']);
    const written = randomBytes(4 * MiB);
    const src = join(s.dir, 'w.bin');
    writeFileSync(src, written);
    mustSh('dd', [`if=${src}`, `of=${loop}`, 'oflag=direct,seek_bytes', `seek=${24 * MiB}`, 'bs=1M', 'conv=fsync,notrunc', 'status=none']);
    const before = held();
    expect(before).toBeGreaterThanOrEqual(8 * MiB);
    // One hole over clean data, one over dirty data.
    mustSh('fallocate', ['--punch-hole', '-o', `${16 * MiB}`, '-l', `${4 * MiB}`, loop]);
    mustSh('fallocate', ['--punch-hole', '-o', `${24 * MiB}`, '-l', `${4 * MiB}`, loop]);
    const zeros = Buffer.alloc(4 * MiB);
    for (const at of [16 * MiB, 24 * MiB]) {
      const r = spawnSync('dd', [`if=${loop}`, 'iflag=direct,skip_bytes,count_bytes', `skip=${at}`, `count=${4 * MiB}`, 'bs=1M', 'status=none'], { maxBuffer: 16 * MiB });
      expect(r.status, String(r.stderr)).toBe(0);
      expect(Buffer.compare(r.stdout, zeros), `at ${at}`).toBe(0);
    }
    // The zeroed ranges take no flash.
    expect(held()).toBeLessThanOrEqual(before - 7 * MiB);
    const st = await status(loop);
    expect(st.zeroBytes).toBeGreaterThanOrEqual(8 * MiB);
    const flushed = await ulobdev(['flush', loop, '--wait', '--run-dir', s.runDir], { timeoutMs: 300_000 });
    expect(flushed.code, flushed.stderr).toBe(0);
    await detach(loop);
    const after = readFileSync(disk);
    const expected = Buffer.from(content);
    expected.fill(0, 16 * MiB, 20 * MiB);
    expected.fill(0, 24 * MiB, 28 * MiB);
    expect(Buffer.compare(after, expected)).toBe(0);
  }, 600_000);
});
