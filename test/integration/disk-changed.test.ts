// A disk written without ulobdev after a detach (newuser9 finding 1: a rescue boot, fstab finding
// the raw partition by UUID, `systemctl stop` then `mount /dev/sdb1`). The cache keeps a
// fingerprint of the regions filesystems rewrite at mount (src/cache/fingerprint.ts); the next
// attach that finds them changed starts cold when the cache holds no dirty data, and refuses,
// changing nothing, when it does. A flush cut by kill -9 leaves the fingerprint unknown: no false
// alarm. On /dev/loopN with ext4, each test in its own scratch directory and state directory.
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Metadata } from '../../src/cache/metadata.js';
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

const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

/** A GPT image on a loop device of its own (-P: its partitions show): p1 of `p1Size` at sector `p1Start`, p2 the rest. */
function partitionedDisk(size: string, p1Start: number, p1Size: string): string {
  const image = join(s.dir, 'disk.img');
  mustSh('truncate', ['-s', size, image]);
  mustSh('sgdisk', ['-n', `1:${p1Start}:+${p1Size}`, '-t', '1:8300', '-n', '2:0:0', image]);
  const loop = mustSh('losetup', ['-f', '--show', '-P', image]).trim();
  undo.push(() => sh('losetup', ['-d', loop]));
  if (!existsSync(`${loop}p1`)) mustSh('partx', ['-a', loop]);
  return loop;
}

function cacheArgs(): string[] {
  return ['--writeback', '-c', join(s.dir, 'flash', 'c.cache'), '--cache-size', '64M', '--run-dir', s.runDir, '--state-dir', s.stateDir];
}

/** Attaches `backing` on a free /dev/loopN (daemon); resolves with the device and the attach's stderr. */
async function attach(backing: string, env?: NodeJS.ProcessEnv): Promise<{ dev: string; stderr: string }> {
  mkdirSync(join(s.dir, 'flash'), { recursive: true });
  const { loop: dev, result } = await attachFreeLoop((loop) => ulobdev([...cacheArgs(), '--daemon', loop, backing], { env }));
  undo.push(async () => {
    const d = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
    if (d.code !== 0 && !/not attached|no ulobdev device/i.test(d.stderr)) killStrays(s.dir, s.runDir);
  });
  return { dev, stderr: result.stderr };
}

async function detach(dev: string): Promise<void> {
  const r = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
  expect(r.code, r.stderr).toBe(0);
  undo.pop();
}

async function flush(dev: string): Promise<void> {
  const r = await ulobdev(['flush', '--wait', dev, '--run-dir', s.runDir]);
  expect(r.code, r.stderr).toBe(0);
}

/** Mounts `dev` on the scratch mountpoint, runs `fn` with its path, unmounts. */
async function mounted<T>(dev: string, fn: (mnt: string) => T | Promise<T>, options: string[] = []): Promise<T> {
  const mnt = join(s.dir, 'mnt');
  mkdirSync(mnt, { recursive: true });
  mustSh('mount', [...options, dev, mnt]);
  try {
    return await fn(mnt);
  } finally {
    mustSh('umount', [mnt]);
  }
}

function fsckClean(dev: string): void {
  const r = sh('fsck.ext4', ['-fn', dev]);
  expect(r.status, `${r.stdout}${r.stderr}`).toBe(0);
}

/** Files f1 (8 MiB) and f2..f4 (64 KiB) through the cache; their contents. */
async function writeFiles(dev: string): Promise<Record<string, string>> {
  const files: Record<string, string> = {};
  await mounted(dev, (mnt) => {
    for (const [name, bytes] of [['f1', 8 << 20], ['f2', 64 << 10], ['f3', 64 << 10], ['f4', 64 << 10]] as const) {
      const data = randomBytes(bytes);
      writeFileSync(join(mnt, name), data);
      files[name] = sha(data);
    }
    mustSh('sync', ['-f', join(mnt, 'f1')]);
  });
  return files;
}

/** What newuser9 did on the raw partition: a new file z and f1 rewritten. */
async function changeDirectly(part: string): Promise<Record<string, string>> {
  const services = readFileSync('/etc/services');
  await mounted(part, (mnt) => {
    writeFileSync(join(mnt, 'z'), services);
    writeFileSync(join(mnt, 'f1'), 'direct\n');
    mustSh('sync', ['-f', join(mnt, 'z')]);
  });
  fsckClean(part);
  return { z: sha(services), f1: sha('direct\n') };
}

function contents(mnt: string, names: string[]): Record<string, string> {
  return Object.fromEntries(names.map((n) => [n, existsSync(join(mnt, n)) ? sha(readFileSync(join(mnt, n))) : 'missing']));
}

function events(kind: string): unknown[] {
  const meta = Metadata.open(join(s.dir, 'flash', 'c.cache.meta'));
  try {
    return meta.events(0, kind);
  } finally {
    meta.close();
  }
}

describe('a disk written without ulobdev after a detach', () => {
  it("newuser9's repro: the next attach starts cold (one warning line, an event), z and the direct f1 survive the next flush, fsck clean", async () => {
    s = scratch('ulob-dchg-');
    const disk = partitionedDisk('512M', 2048, '300M');
    const part = `${disk}p1`;
    mustSh('mkfs.ext4', ['-q', '-E', 'nodiscard', part]);
    let { dev } = await attach(part);
    const files = await writeFiles(dev);
    await flush(dev);
    await detach(dev);

    const direct = await changeDirectly(part);
    const again = await attach(part);
    expect(again.stderr).toMatch(new RegExp(`^ulobdev: ${again.dev}: ${part} was written without ulobdev since .*c\\.cache last left it \\(mounted directly\\?\\): the cache held no dirty data, so its clean blocks were dropped and it starts cold\\n`, 'm'));
    dev = again.dev;
    fsckClean(dev);
    const w1 = randomBytes(3 << 20);
    await mounted(dev, (mnt) => {
      expect(contents(mnt, ['z', 'f1', 'f2', 'f3', 'f4'])).toEqual({ ...files, ...direct });
      writeFileSync(join(mnt, 'w1'), w1);
    });
    await flush(dev);
    await detach(dev);
    expect(events('disk-changed')).toHaveLength(1);
    fsckClean(part);
    await mounted(part, (mnt) => expect(contents(mnt, ['z', 'f1', 'f2', 'f3', 'f4', 'w1'])).toEqual({ ...files, ...direct, w1: sha(w1) }), ['-o', 'ro']);
  }, 180_000);

  it('with dirty data in the cache: refused in one line, exit 1, disk and cache files unchanged', async () => {
    s = scratch('ulob-dchg-');
    const disk = partitionedDisk('512M', 2048, '300M');
    const part = `${disk}p1`;
    mustSh('mkfs.ext4', ['-q', '-E', 'nodiscard', part]);
    const { dev } = await attach(part);
    await writeFiles(dev);
    await flush(dev);
    // Dirty again, and detached without a flush.
    await mounted(dev, (mnt) => {
      writeFileSync(join(mnt, 'f5'), randomBytes(1 << 20));
      mustSh('sync', ['-f', join(mnt, 'f5')]);
    });
    await detach(dev);
    await changeDirectly(part);

    const before = snapshot(s.dir);
    // A device no test takes meanwhile: the refusal comes before any is bound.
    const target = unusedLoop();
    const r = await ulobdev([...cacheArgs(), '--daemon', target, part]);
    if (r.code === 0) undo.push(() => ulobdev(['detach', target, '--run-dir', s.runDir]));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      new RegExp(
        `^ulobdev: ${part} was written without ulobdev \\(mounted directly\\?\\) since .*c\\.cache last left it, and the cache holds [0-9.]+ [KM]iB of dirty data that a flush would write over the newer data: ` +
          `to keep the disk as it is now, 'ulobdev discard --force -c .*c\\.cache ${part}' \\(losing the cache's changes\\); to keep the cache's, restore the disk as ulobdev left it; nothing was changed\\n$`,
      ),
    );
    expect(snapshot(s.dir)).toEqual(before);
  }, 180_000);

  it('kill -9 in the middle of a flush, then the same command: no false alarm, the flush completes, the data is right', async () => {
    s = scratch('ulob-dchg-');
    const disk = partitionedDisk('512M', 2048, '300M');
    const part = `${disk}p1`;
    mustSh('mkfs.ext4', ['-q', '-E', 'nodiscard', part]);
    // The first attach dies (SIGKILL) once the flush has written its first batch, unsynced.
    const { dev } = await attach(part, { ULOBDEV_CRASH_AT: 'flush:wrote' });
    const files = await writeFiles(dev);
    const pid = JSON.parse((await ulobdev(['status', dev, '--json', '--run-dir', s.runDir])).stdout).pid as number;
    await ulobdev(['flush', dev, '--run-dir', s.runDir]);
    for (let i = 0; existsSync(`/proc/${pid}`); i++) {
      if (i > 100) throw new Error('the daemon did not die at flush:wrote');
      await new Promise((r) => setTimeout(r, 100));
    }
    undo.pop();
    const r = await ulobdev([...cacheArgs(), '--daemon', dev, part]);
    expect(r.code, r.stderr).toBe(0);
    undo.push(() => ulobdev(['detach', dev, '--run-dir', s.runDir]));
    expect(r.stderr).not.toMatch(/written without ulobdev/);
    await flush(dev);
    fsckClean(dev);
    await detach(dev);
    expect(events('disk-changed')).toHaveLength(0);
    fsckClean(part);
    await mounted(part, (mnt) => expect(contents(mnt, Object.keys(files))).toEqual(files), ['-o', 'ro']);
  }, 180_000);

  it('a partition inside a partitioned whole-disk backing: a change there is found through its first MiB', async () => {
    s = scratch('ulob-dchg-');
    // p1 from 8 MiB: neither the disk's first nor its last MiB covers its superblock.
    const disk = partitionedDisk('256M', 16384, '128M');
    let { dev } = await attach(disk);
    mustSh('mkfs.ext4', ['-q', '-E', 'nodiscard', `${dev}p1`]);
    const files = await writeFiles(`${dev}p1`);
    await flush(dev);
    await detach(dev);

    const direct = await changeDirectly(`${disk}p1`);
    const again = await attach(disk);
    dev = again.dev;
    expect(again.stderr).toMatch(/was written without ulobdev since .* it starts cold/);
    await mounted(`${dev}p1`, (mnt) => expect(contents(mnt, ['z', 'f1', 'f2', 'f3', 'f4'])).toEqual({ ...files, ...direct }));
    await flush(dev);
    await detach(dev);
    fsckClean(`${disk}p1`);
    await mounted(`${disk}p1`, (mnt) => expect(contents(mnt, ['z', 'f1', 'f2', 'f3', 'f4'])).toEqual({ ...files, ...direct }), ['-o', 'ro']);
  }, 180_000);
});
