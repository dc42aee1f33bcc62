// The disk can sleep: with the backing disk a loop device over a file and the cache hydrated, a
// mixed workload on a mounted ext4 in write-back mode causes no read and no write on the backing
// device (/sys/block/loopX/stat); a flush then writes, and afterwards the backing file equals the
// device byte for byte.
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { attachFreeLoop, mustSh, prepareCliTests, scratch, sh, ulobdev } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
const undo: Array<() => Promise<unknown> | unknown> = [];

beforeAll(() => {
  prepareCliTests();
});

afterEach(async () => {
  for (const step of undo.splice(0).reverse()) await step();
  s?.cleanup();
});

/** [reads completed, writes completed, sectors (512 bytes) read] of a block device. */
function ioCounts(dev: string): [number, number, number] {
  const f = readFileSync(`/sys/block/${basename(dev)}/stat`, 'utf8').trim().split(/\s+/).map(Number);
  return [f[0]!, f[4]!, f[2]!];
}

function sha(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

describe('zero backing I/O between flushes', () => {
  it('a hydrated write-back cache keeps the backing disk idle until the flush, which makes it equal', async () => {
    s = scratch('ulob-zeroio-');
    const file = join(s.dir, 'backing.img');
    mustSh('truncate', ['-s', '96M', file]);
    mustSh('mkfs.ext4', ['-q', '-E', 'lazy_itable_init=0,lazy_journal_init=0', file]);
    const backing = mustSh('losetup', ['-f', '--show', file]).trim();
    undo.push(() => sh('losetup', ['-d', backing]));

    const { loop: front } = await attachFreeLoop((dev) =>
      ulobdev(['--writeback', '--hydrate', '-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap'), '--name', 'z', '--daemon', '--run-dir', s.runDir, dev, backing]),
    );
    undo.push(() => ulobdev(['detach', 'z', '--run-dir', s.runDir]));
    const status = async () => JSON.parse((await ulobdev(['status', 'z', '--json', '--run-dir', s.runDir])).stdout);
    for (let i = 0; ; i++) {
      const st = await status();
      if (st.hydration.done) break;
      if (i > 300) throw new Error('hydration did not finish');
      await new Promise((r) => setTimeout(r, 100));
    }
    expect((await status()).cacheFillPercent).toBe(100);

    const before = ioCounts(backing);
    const mnt = join(s.dir, 'mnt');
    mkdirSync(mnt);
    mustSh('mount', [front, mnt]);
    undo.push(() => sh('umount', [mnt]));
    // Mixed: create, overwrite, read back, list, delete, sync.
    const sums = new Map<string, string>();
    for (let i = 0; i < 20; i++) {
      const data = randomBytes(4096 * (1 + ((i * 37) % 200)));
      writeFileSync(join(mnt, `f${i}`), data);
      sums.set(`f${i}`, createHash('sha256').update(data).digest('hex'));
    }
    mustSh('sync', ['-f', mnt]); // this filesystem: a machine-wide sync waits for every other test's writeback
    for (let i = 0; i < 20; i += 3) {
      const data = randomBytes(8192);
      writeFileSync(join(mnt, `f${i}`), data);
      sums.set(`f${i}`, createHash('sha256').update(data).digest('hex'));
    }
    for (let i = 1; i < 20; i += 5) {
      unlinkSync(join(mnt, `f${i}`));
      sums.delete(`f${i}`);
    }
    mustSh('sync', ['-f', mnt]);
    mustSh('sh', ['-c', 'echo 3 > /proc/sys/vm/drop_caches']);
    for (const [name, sum] of sums) expect(sha(join(mnt, name)), name).toBe(sum);
    mustSh('umount', [mnt]);
    undo.pop();
    expect(ioCounts(backing)).toEqual(before);

    const f = await ulobdev(['flush', 'z', '--wait', '--run-dir', s.runDir]);
    expect(f.code, f.stderr).toBe(0);
    const after = ioCounts(backing);
    // The flush reads only the disk fingerprint once the disk is synced (docs/design.md, "A disk
    // written without ulobdev"): the first and the last MiB of this disk without partitions, and
    // the four 4 KiB container probes (1, 2, 16 and 17 MiB), which the disk's page cache reads
    // ahead (3 MiB in all here): nothing else.
    const read = (after[2] - before[2]) * 512;
    expect(read).toBeGreaterThanOrEqual((2 << 20) + 4 * 4096);
    expect(read).toBeLessThanOrEqual((2 << 20) + 4 * (512 << 10));
    expect(after[1]).toBeGreaterThan(before[1]);
    // Idle again after the flush window.
    await new Promise((r) => setTimeout(r, 1500));
    expect(ioCounts(backing)).toEqual(after);

    // The device (through the cache) and the backing file, byte for byte.
    const image = join(s.dir, 'device.img');
    mustSh('dd', [`if=${front}`, `of=${image}`, 'bs=1M', 'iflag=direct', 'status=none']);
    expect(sha(image)).toBe(sha(file));
    rmSync(image);
    const fsck = sh('fsck.ext4', ['-fn', backing]);
    expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
  });
});
