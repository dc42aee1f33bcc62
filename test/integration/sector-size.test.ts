// 4K-sector disks: the cached device presents the backing disk's logical and physical sector
// sizes on every userspace frontend (the loop device: losetup --sector-size; the NBD export:
// NBD_INFO_BLOCK_SIZE), so a filesystem made through the cache mounts on the bare disk. The
// issue's replay: a disk of 4096-byte sectors showed 512 through the cache, and XFS made there
// then refused the bare disk ("device supports 4096 byte sectors (not 512)").
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { attachFreeLoop, killStrays, mustSh, prepareCliTests, scratch, sh, snapshot, ulobdev, unusedLoop } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
const undo: Array<() => Promise<unknown> | unknown> = [];

beforeAll(() => {
  prepareCliTests();
}, 900_000);

afterEach(async () => {
  for (const step of undo.splice(0).reverse()) await step();
  s?.cleanup();
});

/** A disk image bound to a loop device with `sector`-byte logical (and physical) sectors. */
function sectorDisk(name: string, size: string, sector: number): { image: string; dev: string } {
  const image = join(s.dir, name);
  mustSh('truncate', ['-s', size, image]);
  const dev = mustSh('losetup', ['-f', '--show', '--sector-size', String(sector), image]).trim();
  undo.push(() => sh('losetup', ['-d', dev]));
  return { image, dev };
}

async function attach(args: string[], backing: string): Promise<string> {
  const { loop: dev } = await attachFreeLoop((loop) => ulobdev([...args, '--daemon', '--run-dir', s.runDir, loop, backing]));
  undo.push(async () => {
    const d = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
    if (d.code !== 0) killStrays(s.dir, s.runDir);
  });
  return dev;
}

async function detach(dev: string): Promise<void> {
  const r = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
  expect(r.code, r.stderr).toBe(0);
  undo.pop();
}

function sectors(dev: string): string {
  return mustSh('blockdev', ['--getss', '--getpbsz', dev]).trim().replace(/\s+/g, ' ');
}

function mount(dev: string, dir: string): void {
  mkdirSync(dir, { recursive: true });
  mustSh('mount', [dev, dir]);
  undo.push(() => sh('umount', [dir]));
}

function umount(dir: string): void {
  mustSh('umount', [dir]);
  undo.pop();
}

describe('sector sizes of the backing disk', () => {
  it('a 4096-byte-sector disk is 4096 through /dev/loopN, and XFS made there mounts on the bare disk', async () => {
    s = scratch('ulob-4k-');
    const disk = sectorDisk('d.img', '1G', 4096);
    const dev = await attach(['--writeback', '-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap')], disk.dev);
    expect(sectors(`${disk.dev}`)).toBe('4096 4096');
    expect(sectors(dev)).toBe('4096 4096');
    const st = JSON.parse((await ulobdev(['status', dev, '--json', '--run-dir', s.runDir])).stdout);
    expect(st.sectorSize).toEqual({ logical: 4096, physical: 4096 });

    mustSh('mkfs.xfs', ['-q', '-f', dev]);
    const mnt = join(s.dir, 'mnt');
    mount(dev, mnt);
    const data = randomBytes(3 << 20);
    writeFileSync(join(mnt, 'f'), data);
    umount(mnt);
    const flushed = await ulobdev(['flush', dev, '--wait', '--run-dir', s.runDir]);
    expect(flushed.code, flushed.stderr).toBe(0);
    await detach(dev);

    // The bare disk: the filesystem is there, and the kernel takes it.
    mount(disk.dev, mnt);
    expect(createHash('sha256').update(readFileSync(join(mnt, 'f'))).digest('hex')).toBe(createHash('sha256').update(data).digest('hex'));
    umount(mnt);
  });

  it('a plain file is 512 through /dev/loopN', async () => {
    s = scratch('ulob-512-');
    mustSh('truncate', ['-s', '64M', join(s.dir, 'd.img')]);
    const dev = await attach(['-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap')], join(s.dir, 'd.img'));
    expect(sectors(dev)).toBe('512 512');
    await detach(dev);
  });

  it('the NBD export says the disk sector is its minimum block size', async () => {
    s = scratch('ulob-4k-nbd-');
    const disk = sectorDisk('d.img', '64M', 4096);
    mustSh('truncate', ['-s', '64M', join(s.dir, 'f.img')]);
    for (const [backing, min] of [
      [disk.dev, 4096],
      [join(s.dir, 'f.img'), 512],
    ] as const) {
      const sock = join(s.dir, `nbd-${min}.sock`);
      const url = `nbd+unix:///?socket=${sock}`;
      const name = `nbd${min}`;
      const r = await ulobdev(['-c', join(s.dir, `c${min}.cache`), '-b', join(s.dir, `c${min}.bitmap`), '--name', name, '--daemon', '--run-dir', s.runDir, url, backing]);
      expect(r.code, r.stderr).toBe(0);
      undo.push(() => ulobdev(['detach', name, '--run-dir', s.runDir]));
      const info = JSON.parse(mustSh('nbdinfo', ['--json', `nbd+unix:///ulobdev?socket=${sock}`]));
      const exp = info.exports[0];
      expect({ min: exp.block_size_minimum, preferred: exp.block_size_preferred }).toEqual({ min, preferred: 4096 });
    }
  });

  it('sectors larger than 4 KiB: a new cache gets one-sector blocks; a smaller --block-size is refused and changes nothing', async () => {
    s = scratch('ulob-8k-');
    const disk = sectorDisk('d.img', '64M', 8192);
    const cache = ['-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap')];
    const before = snapshot(s.dir);
    // Only this test's loop devices: other tests bind theirs meanwhile.
    const mine = () => sh('losetup', ['-a']).stdout.split('\n').filter((l) => l.includes(s.dir)).sort().join('\n');
    const loopsBefore = mine();
    const r = await ulobdev([...cache, '--block-size', '4K', '--run-dir', s.runDir, unusedLoop(), disk.dev]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^ulobdev: .* has 8192-byte sectors but the cache has 4096-byte blocks; .*--block-size 8K or more.*\n$/);
    expect(snapshot(s.dir)).toEqual(before);
    expect(mine()).toBe(loopsBefore);

    const dev = await attach(cache, disk.dev);
    const st = JSON.parse((await ulobdev(['status', dev, '--json', '--run-dir', s.runDir])).stdout);
    expect(st).toMatchObject({ blockSize: 8192, sectorSize: { logical: 8192, physical: 8192 } });
    expect(sectors(dev)).toBe('8192 8192');
    await detach(dev);
  });
});
