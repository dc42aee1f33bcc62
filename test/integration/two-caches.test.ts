// newuser7 F4 end to end on /dev/loopN with ext4: two caches for one disk. Before disk records,
// the second cache attached (exit 0) while the first held dirty data, showed the old filesystem,
// and flushing the first afterwards silently overwrote files written and flushed through the
// second; the second, re-attached, served blocks older than the disk. Now each of those attaches
// is refused with one line (exit 1, nothing changed) and the way out works.
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { shaOf, useLoopFixture, type Scratch } from '../support/loop-fixture.js';
import { attachFreeLoop, loopsUnder, mustSh, prepareCliTests, sh, snapshot, ulobdev, unusedLoop } from '../support/cli.js';

const fx = useLoopFixture();
let s: Scratch;

beforeAll(() => {
  prepareCliTests();
});

const sha = shaOf;

function cacheArgs(name: string): string[] {
  return ['-c', join(s.dir, `${name}.cache`), '-b', join(s.dir, `${name}.bitmap`)];
}

async function attach(cache: string[]): Promise<string> {
  const { loop, result } = await attachFreeLoop((dev) => ulobdev([...cache, '--writeback', '--daemon', '--run-dir', s.runDir, dev, join(s.dir, 'disk.img')]));
  expect(result.stdout.trim()).toBe(loop);
  fx.attached(loop);
  return loop;
}

async function detach(loop: string): Promise<string> {
  const r = await ulobdev(['detach', loop, '--run-dir', s.runDir]);
  expect(r.code, r.stderr).toBe(0);
  fx.detached(loop);
  return r.stdout;
}

async function flush(loop: string): Promise<void> {
  const r = await ulobdev(['flush', '--wait', loop, '--run-dir', s.runDir]);
  expect(r.code, r.stderr).toBe(0);
}

function mount(dev: string): string {
  const dir = join(s.dir, 'mnt');
  fx.mount(dev, dir);
  return dir;
}

const umount = fx.umount;

/** The attach is refused: exit 1, one line matching `message`, no file changed, no loop device bound. */
async function expectRefused(cache: string[], message: RegExp): Promise<void> {
  const before = snapshot(s.dir);
  const loopsBefore = loopsUnder(s.dir);
  const r = await ulobdev([...cache, '--writeback', '--daemon', '--run-dir', s.runDir, unusedLoop(), join(s.dir, 'disk.img')]);
  if (r.code === 0) fx.attached(r.stdout.trim());
  expect(r.code, r.stdout + r.stderr).toBe(1);
  expect(r.stderr).toMatch(/^ulobdev: [^\n]+\n$/);
  expect(r.stderr).toMatch(message);
  expect(snapshot(s.dir)).toEqual(before);
  expect(loopsUnder(s.dir)).toBe(loopsBefore);
}

describe('two caches for one disk (newuser7 F4)', () => {
  it('a second cache is refused while the first holds dirty data, and a cache the disk was written past is refused as stale; flush, discard and re-attach bring the files back', async () => {
    s = fx.scratch('ulob-two-caches-');
    const disk = join(s.dir, 'disk.img');
    mustSh('truncate', ['-s', '64M', disk]);
    mustSh('mkfs.ext4', ['-q', '-E', 'lazy_itable_init=0,lazy_journal_init=0', disk]);
    const a = cacheArgs('a');
    const b = cacheArgs('b');

    // b.cache exists and is clean: the user's cache of an earlier day (the mount wrote the
    // superblock: flushed before detach, or a.cache below would be refused for it).
    let loop = await attach(b);
    let mnt = mount(loop);
    expect(existsSync(join(mnt, 'lost+found'))).toBe(true);
    umount(mnt);
    await flush(loop);
    await detach(loop);

    // Through a.cache: a file written and synced, left dirty by detach (no flush policy).
    loop = await attach(a);
    mnt = mount(loop);
    const data = randomBytes(1 << 20);
    writeFileSync(join(mnt, 'new2.bin'), data);
    umount(mnt);
    expect(await detach(loop)).toMatch(/stay dirty in the cache/);
    const diskBefore = sha(disk);

    // F4: b.cache, a new c.cache, and the state directory's default cache are all refused.
    const conflict = new RegExp(`^ulobdev: ${disk} has [0-9.]+ [KM]iB of dirty data in ${s.dir}/a\\.cache that .* would not show and a flush of either would undo: attach ${disk} with -c ${s.dir}/a\\.cache and flush it, or 'ulobdev discard --force -c ${s.dir}/a\\.cache ${disk}' to lose that data; nothing was changed\\n$`);
    await expectRefused(b, conflict);
    await expectRefused(cacheArgs('c'), conflict);
    await expectRefused([], conflict);
    expect(sha(disk)).toBe(diskBefore);

    // The way out: attach a.cache and flush it.
    loop = await attach(a);
    await flush(loop);
    await detach(loop);
    expect(sha(disk)).not.toBe(diskBefore);

    // b.cache saw the disk before that flush: its clean blocks (the old inode table) are stale.
    await expectRefused(
      b,
      new RegExp(`^ulobdev: ${s.dir}/b\\.cache may hold stale blocks of ${disk}: the disk was written through ${s.dir}/a\\.cache since this cache last saw it \\(generation 1, the disk is at 2\\); it holds no dirty data, so 'ulobdev discard -c ${s.dir}/b\\.cache ${disk}' and attach again`),
    );
    const d = await ulobdev(['discard', ...b, '--state-dir', s.stateDir, disk]);
    expect(d.code, d.stderr).toBe(0);
    loop = await attach(b);
    mnt = mount(loop);
    expect(readFileSync(join(mnt, 'new2.bin')).equals(data)).toBe(true);
    umount(mnt);
    await detach(loop);
    // And the raw disk has the file: fsck clean.
    expect(sh('fsck.ext4', ['-fn', disk]).status).toBe(0);
  });
});
