// Invariant 6 at the command line: each bad input gets one line on stderr, a non-zero exit, and
// changes nothing (no file created or modified, no loop device bound).
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loopsUnder, mustSh, prepareCliTests, scratch, sh, snapshot, ulobdev, unusedLoop } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
const undo: Array<() => void> = [];

beforeAll(() => {
  prepareCliTests();
});

afterEach(() => {
  for (const step of undo.splice(0).reverse()) step();
  s?.cleanup();
});

function loops(): string {
  return loopsUnder(s.dir);
}

async function expectRefused(args: string[], message: RegExp, options: { uid?: number; env?: NodeJS.ProcessEnv } = {}): Promise<void> {
  const before = snapshot(s.dir);
  const loopsBefore = loops();
  const r = await ulobdev([...args, '--run-dir', s.runDir], options);
  expect(r.code, r.stderr).toBe(1);
  expect(r.stdout).toBe('');
  expect(r.stderr).toMatch(/^ulobdev: [^\n]+\n$/);
  expect(r.stderr).toMatch(message);
  expect(snapshot(s.dir)).toEqual(before);
  expect(loops()).toBe(loopsBefore);
}

/** `ulobdev discard ARGS` refused: one line, exit 1, nothing in the scratch dir changed. */
async function expectDiscardRefused(args: string[], message: RegExp): Promise<void> {
  const before = snapshot(s.dir);
  const r = await ulobdev(['discard', ...args]);
  expect(r.code, r.stderr).toBe(1);
  expect(r.stdout).toBe('');
  expect(r.stderr).toMatch(/^ulobdev: [^\n]+\n$/);
  expect(r.stderr).toMatch(message);
  expect(snapshot(s.dir)).toEqual(before);
}

function makeDisk(name: string, size = '16M'): string {
  const p = join(s.dir, name);
  mustSh('truncate', ['-s', size, p]);
  return p;
}

function cacheArgs(name = 'c'): string[] {
  return ['-c', join(s.dir, `${name}.cache`), '-b', join(s.dir, `${name}.bitmap`)];
}

/** Creates a cache for `disk` through a serve-only attach, then detaches. */
async function makeCache(disk: string, name = 'c'): Promise<void> {
  const url = `nbd+unix:///?socket=${join(s.dir, 'make.sock')}`;
  const r = await ulobdev([...cacheArgs(name), '--writeback', '--daemon', '--run-dir', s.runDir, url, disk]);
  expect(r.code, r.stderr).toBe(0);
  expect((await ulobdev(['detach', url, '--run-dir', s.runDir])).code).toBe(0);
}

describe('ulobdev refuses bad input with one line and changes nothing', () => {
  it('a DEVICE that is not a device name', async () => {
    s = scratch('ulob-cli-');
    await expectRefused([...cacheArgs(), '/dev/sda', makeDisk('disk.img')], /DEVICE must be \/dev\/loopN/);
  });

  it('a refusal after a schedule worth a warning: the refusal alone, the warning only for an accepted attach (newuser12)', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('disk.img');
    const url = `nbd+unix:///?socket=${join(s.dir, 'nbd.sock')}`;
    await expectRefused([...cacheArgs(), '--flush', '* * * * *', url, disk], /^ulobdev: --flush, --dirty-max, --max-dirty-age and --on-ac need --writeback\n$/);
    // Refused by Daemon.start, in the foreground and in the --daemon child.
    for (const daemon of [[], ['--daemon']]) {
      await expectRefused(['-c', join(s.dir, 'nodir', 'c.cache'), '--writeback', '--flush', '* * * * *', ...daemon, url, disk], /^ulobdev: -c \S+\/nodir\/c\.cache: the directory \S+ does not exist/);
    }
  });

  it('a BACKEND that does not exist, or is a directory', async () => {
    s = scratch('ulob-cli-');
    // Not an errno (newuser7 item 8: "cannot open backing device /dev/nosuchdisk: ENOENT (stat)").
    await expectRefused([...cacheArgs(), unusedLoop(), join(s.dir, 'missing.img')], new RegExp(`^ulobdev: BACKEND ${s.dir}/missing\\.img does not exist \\(a typo, or the disk not plugged in\\?\\); 'lsblk' lists the disks\n$`));
    mkdirSync(join(s.dir, 'adir'));
    await expectRefused([...cacheArgs(), unusedLoop(), join(s.dir, 'adir')], /neither a block device nor a regular file/);
  });

  it('an empty -c, -b or --metadata (an empty CACHE= in NAME.conf; newuser11 finding 9): says it is empty, not "/ is a directory"', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('disk.img');
    await expectRefused(['-c', '', unusedLoop(), disk], /^ulobdev: -c\/--cache is empty \(CACHE= in \/etc\/ulobdev\/NAME\.conf\?\): give the file's path/);
    await expectRefused([...cacheArgs(), '-b', ' ', unusedLoop(), disk], /^ulobdev: -b\/--bitmap is empty/);
    await expectRefused([...cacheArgs(), '--metadata', '', unusedLoop(), disk], /^ulobdev: --metadata is empty/);
  });

  it('an empty BACKEND (BACKEND= left empty in NAME.conf; newuser13): says it is empty, not the working directory', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('disk.img');
    await expectRefused([...cacheArgs(), unusedLoop(), ''], /^ulobdev: BACKEND is empty \(BACKEND= in \/etc\/ulobdev\/NAME\.conf\?\): give the disk/);
  });

  it('a loop DEVICE that is in use', async () => {
    s = scratch('ulob-cli-');
    const other = makeDisk('other.img', '1M');
    const loop = mustSh('losetup', ['-f', '--show', other]).trim();
    undo.push(() => sh('losetup', ['-d', loop]));
    await expectRefused([...cacheArgs(), loop, makeDisk('disk.img')], new RegExp(`${loop} is in use`));
  });

  it('a BACKEND file that a loop device is bound to', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('disk.img', '1M');
    const loop = mustSh('losetup', ['-f', '--show', disk]).trim();
    undo.push(() => sh('losetup', ['-d', loop]));
    await expectRefused([...cacheArgs(), unusedLoop(), disk], new RegExp(`attached to ${loop}: give ${loop} \\(or its partition\\) as BACKEND, or detach it first \\(losetup -d ${loop}\\)$`, 'm'));
  });

  it('a BACKEND block device that is mounted', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('disk.img', '16M');
    mustSh('mkfs.ext4', ['-q', disk]);
    const loop = mustSh('losetup', ['-f', '--show', disk]).trim();
    undo.push(() => sh('losetup', ['-d', loop]));
    const mnt = join(s.dir, 'mnt');
    mkdirSync(mnt);
    // Read-only: a read-write ext4 writes to disk.img on its own (the mount's superblock update at
    // the journal's commit, lazy init) while the refusal runs, and the snapshot would see it
    // (seen in a clean-clone run). A read-only mount is just as mounted.
    mustSh('mount', ['-o', 'ro', loop, mnt]);
    undo.push(() => sh('umount', [mnt]));
    await expectRefused([...cacheArgs(), unusedLoop(), loop], new RegExp(`${loop} is mounted on ${mnt}`));
  });

  it('the cache of another disk', async () => {
    s = scratch('ulob-cli-');
    const a = makeDisk('a.img');
    await makeCache(a);
    const b = makeDisk('b.img');
    // Named by the path it was made for (newuser8: an id like file:254:0:5513997), and what to do.
    await expectRefused(
      [...cacheArgs(), '--writeback', unusedLoop(), b],
      new RegExp(`^ulobdev: ${s.dir}/c\\.cache\\.meta is the cache of another disk \\(${a}\\), not of ${b}: give -c the cache of ${b}, or a path where no cache is yet for a new one; this cache goes with ${a}\n$`),
    );
  });

  it('discard of the cache of another disk (newuser7 F18): refused, nothing removed', async () => {
    s = scratch('ulob-cli-');
    await makeCache(makeDisk('a.img'));
    await expectDiscardRefused([...cacheArgs(), '--force', makeDisk('b.img')], /c\.cache is the cache of another disk \(.*\), not of \S*b\.img \(.*\); discard removes nothing: name the disk it was made for\n$/);
  });

  it('discard of a cache that is not there (a typo, no default cache; newuser8 item 3): one line, exit 1, nothing removed', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('a.img');
    await makeCache(disk);
    for (const force of [[], ['--force']]) {
      await expectDiscardRefused(['-c', join(s.dir, 'typo.cache'), ...force, '--state-dir', join(s.dir, 'state'), disk], new RegExp(`^ulobdev: no cache at ${s.dir}/typo\\.cache \\(no ${s.dir}/typo\\.cache\\.meta\\); discard removes nothing: give the -c path the disk was attached with\n$`));
      await expectDiscardRefused([...force, '--state-dir', join(s.dir, 'state'), disk], /^ulobdev: no cache at \S+\.cache \(no \S+\.cache\.meta\); discard removes nothing/);
    }
  });

  it('report -c of a cache that is not there (newuser7 F29): one plain line, exit 1', async () => {
    s = scratch('ulob-cli-');
    await expectRefused(['report', 'nosuch', '--json', '-c', join(s.dir, 'nosuch.cache')], new RegExp(`^ulobdev: no cache at ${s.dir}/nosuch\\.cache \\(no ${s.dir}/nosuch\\.cache\\.meta\\); give the -c path the device was attached with\n$`));
  });

  it('report --svg into a directory that does not exist (newuser9 finding 2): one line, exit 1, not a raw ENOENT and exit 74', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('a.img');
    await makeCache(disk);
    await expectRefused(
      ['report', 'x', '--svg', join(s.dir, 'nodir', 'r.svg'), '-c', join(s.dir, 'c.cache')],
      new RegExp(`^ulobdev: --svg ${s.dir}/nodir/r\\.svg: the directory ${s.dir}/nodir does not exist; create it or pick another\n$`),
    );
  });

  it('report --svg to a directory or a place no file can be made (newuser9b): one line, exit 1', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('a.img');
    await makeCache(disk);
    await expectRefused(
      ['report', 'x', '--svg', s.dir, '-c', join(s.dir, 'c.cache')],
      new RegExp(`^ulobdev: --svg ${s.dir} is a directory; give a file name in it, e\\.g\\. ${s.dir}/x\\.svg\n$`),
    );
    await expectRefused(['report', 'x', '--svg', '/proc/r.svg', '-c', join(s.dir, 'c.cache')], /^ulobdev: --svg \/proc\/r\.svg: cannot write it \(E[A-Z]+\); pick a file you can write\n$/);
  });

  it('status --json of a device nobody serves (newuser9): the error as JSON on stdout too, one line on stderr, exit 1', async () => {
    s = scratch('ulob-cli-');
    const r = await ulobdev(['status', 'nosuch', '--json', '--run-dir', s.runDir]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^ulobdev: [^\n]*nosuch[^\n]*\n$/);
    expect(JSON.parse(r.stdout)).toEqual({ error: { code: 'ULOB_E_NOT_ATTACHED', message: r.stderr.slice('ulobdev: '.length, -1) } });
  });

  it('a disk whose size changed since the cache was made', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('disk.img');
    await makeCache(disk);
    mustSh('truncate', ['-s', '32M', disk]);
    await expectRefused(
      [...cacheArgs(), unusedLoop(), disk],
      new RegExp(`but its cache was made for 16777216 bytes \\(the disk grew\\); it holds no dirty data: 'ulobdev discard -c ${s.dir}/c\\.cache ${s.dir}/disk\\.img', then attach`),
    );
  });

  it('a disk whose size changed under a cache holding dirty data (newuser10): the way out keeps the data', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('disk.img');
    const url = `nbd+unix:///?socket=${join(s.dir, 'dirty.sock')}`;
    const r = await ulobdev([...cacheArgs(), '--writeback', '--daemon', '--run-dir', s.runDir, url, disk]);
    expect(r.code, r.stderr).toBe(0);
    mustSh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 64k', url]);
    const st = await ulobdev(['status', url, '--json', '--run-dir', s.runDir]);
    const pid = JSON.parse(st.stdout).pid as number;
    process.kill(pid, 'SIGKILL');
    await new Promise((done) => setTimeout(done, 300));
    mustSh('truncate', ['-s', '8M', disk]);
    // The first attempt after the kill recovers the dead daemon's leftovers (its socket, the WAL
    // folded into the metadata); the refusal under test is the second, which changes nothing.
    expect((await ulobdev([...cacheArgs(), unusedLoop(), disk, '--run-dir', s.runDir])).code).toBe(1);
    await expectRefused([...cacheArgs(), unusedLoop(), disk], /made for 16777216 bytes \(the disk shrank\); it still holds 64 KiB of dirty data for the old size: give the disk its old size back/);
  });

  it('corrupt metadata', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('disk.img');
    await makeCache(disk);
    writeFileSync(join(s.dir, 'c.cache.meta'), Buffer.alloc(8192, 0x5a));
    await expectRefused([...cacheArgs(), unusedLoop(), disk], /is not valid ulobdev metadata/);
  });

  it('discard of an attached cache names the daemon holding it, even with --force (newuser7 item 28)', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('disk.img');
    const url = `nbd+unix:///?socket=${join(s.dir, 'held.sock')}`;
    const r = await ulobdev([...cacheArgs(), '--writeback', '--daemon', '--run-dir', s.runDir, '--name', 'held', url, disk]);
    expect(r.code, r.stderr).toBe(0);
    const re = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    try {
      for (const force of [[], ['--force']]) {
        const d = await ulobdev(['discard', ...cacheArgs(), ...force, '--run-dir', s.runDir, disk]);
        expect(d.code, d.stderr).toBe(1);
        expect(d.stdout).toBe('');
        // Was: "... is in use (mounted, or held by another program or device-mapper)" for a disk.
        expect(d.stderr).toMatch(
          new RegExp(`^ulobdev: ${re(disk)} is attached as ${re(url)} \\(pid \\d+, name held\\) with the cache ${re(s.dir)}/c\\.cache; detach it first \\(ulobdev detach ${re(url)}\\), then discard\\n$`),
        );
        for (const f of ['c.cache', 'c.bitmap', 'c.cache.meta']) expect(existsSync(join(s.dir, f)), f).toBe(true);
      }
    } finally {
      expect((await ulobdev(['detach', 'held', '--run-dir', s.runDir])).code).toBe(0);
    }
  });

  it('a cache file without its metadata', async () => {
    s = scratch('ulob-cli-');
    writeFileSync(join(s.dir, 'c.cache'), 'precious data of some other program');
    // Not a cache we know: the line must not point at 'discard', which would remove it.
    await expectRefused(
      [...cacheArgs(), unusedLoop(), makeDisk('disk.img')],
      /exists but its metadata .* does not, so it is not a ulobdev cache; give -c and -b paths that do not exist yet \(a new cache is made there\)\n$/,
    );
  });

  it('the disk itself as the cache (-c disk.img ... disk.img, a block device too): attach and discard refuse, the disk stays', async () => {
    s = scratch('ulob-cli-');
    const disk = makeDisk('disk.img');
    writeFileSync(disk, 'an ext4 filesystem, say', { flag: 'r+' });
    await expectRefused(['-c', disk, '--writeback', unusedLoop(), disk], /the cache \S*disk\.img is the disk itself \(BACKEND \S*disk\.img\); give -c a file on flash/);
    // `ulobdev discard -c disk.img --force disk.img` deleted the disk image.
    await expectDiscardRefused(['-c', disk, '--force', disk], /the cache \S*disk\.img is the disk itself/);
    const loop = mustSh('losetup', ['-f', '--show', makeDisk('disk2.img')]).trim();
    undo.push(() => sh('losetup', ['-d', loop]));
    await expectRefused(['-c', loop, '--writeback', unusedLoop(), loop], new RegExp(`the cache ${loop} is the disk itself`));
    await expectDiscardRefused(['-c', loop, '--force', loop], new RegExp(`the cache ${loop} is the disk itself`));
    // A block device that is not the disk is no cache file either.
    await expectRefused(['-c', loop, '--writeback', unusedLoop(), disk], new RegExp(`the cache ${loop} is a block device, not a ulobdev cache file`));
    await expectDiscardRefused(['-c', loop, '--force', disk], new RegExp(`the cache ${loop} is a block device`));
    // Any file with no metadata next to it is not a cache: discard leaves it alone.
    const other = join(s.dir, 'other.img');
    writeFileSync(other, 'precious data of some other program');
    await expectDiscardRefused(['-c', other, '--force', disk], /other\.img is not a ulobdev cache \(its metadata \S+ does not exist\); discard removes nothing/);
    expect(existsSync(disk) && existsSync(other)).toBe(true);
  });

  it('a cache on a filesystem of a partition of the disk (BACKEND /dev/loopN or its sibling partition /dev/loopNp2, -c under a mount of /dev/loopNp1): attach refuses, the disk stays', async () => {
    s = scratch('ulob-cli-');
    const image = makeDisk('parted.img', '24M');
    mustSh('sgdisk', ['-n', '1:2048:+8M', '-n', '2:0:0', image]);
    const loop = mustSh('losetup', ['-f', '--show', '--partscan', image]).trim();
    undo.push(() => sh('losetup', ['-d', loop]));
    // No udev here: make the partition's node from sysfs if it is not there.
    const part = `${loop}p1`;
    if (!existsSync(`/sys/class/block/${part.slice(5)}`)) mustSh('partx', ['-a', loop]); // --partscan may not scan in a container
    if (!existsSync(part)) {
      const [major, minor] = readFileSync(`/sys/class/block/${part.slice(5)}/dev`, 'utf8').trim().split(':');
      mustSh('mknod', [part, 'b', major!, minor!]);
      undo.push(() => sh('rm', ['-f', part]));
    }
    // Without lazy init: ext4lazyinit would zero inode tables in the background after the mount and
    // touch the image's mtime while the refusal is checked ("changes nothing").
    mustSh('mkfs.ext4', ['-q', '-E', 'lazy_itable_init=0,lazy_journal_init=0', part]);
    const mnt = join(s.dir, 'flash');
    mkdirSync(mnt);
    // noatime: the refused attach looks up the cache's directory, and relatime's first access
    // after a mount writes the directory's atime, which reaches the image at the next journal
    // commit (the clean-clone run cc7a, load 10, failed "changes nothing" even after the sync -f).
    mustSh('mount', ['-o', 'noatime', `${loop}p1`, mnt]);
    undo.push(() => sh('umount', [mnt]));
    // The mount's own superblock update reaches the image through the loop device at ext4's next
    // journal commit (5 s) or writeback: on a loaded machine that landed inside the refused attach
    // below and changed parted.img ("changes nothing" failed, make test of 2026-12-01 at load 10-16).
    // Written now, before the snapshot; an attach that writes anything still changes the image.
    mustSh('sync', ['-f', mnt]);
    await expectRefused(['-c', join(mnt, 'c.cache'), '--writeback', unusedLoop(), loop], new RegExp(`^ulobdev: the cache ${mnt}/c\\.cache is on a filesystem of /dev/${loop.slice(5)}p1, a partition of the disk ${loop} itself; give -c a file on flash, not on the disk\\n$`));
    // BACKEND the second partition, the cache on the first: the same disk spins for every cache write.
    const sibling = `${loop}p2`;
    if (!existsSync(sibling)) {
      const [major, minor] = readFileSync(`/sys/class/block/${sibling.slice(5)}/dev`, 'utf8').trim().split(':');
      mustSh('mknod', [sibling, 'b', major!, minor!]);
      undo.push(() => sh('rm', ['-f', sibling]));
    }
    await expectRefused(['-c', join(mnt, 'c.cache'), '--writeback', unusedLoop(), sibling], new RegExp(`^ulobdev: the cache ${mnt}/c\\.cache is on a filesystem of /dev/${loop.slice(5)}p1, which is built on /dev/${loop.slice(5)} as the disk ${sibling} is: every cache write would spin the disk up; give -c a file on flash, not on the disk\\n$`));
  });

  it('a bad block size', async () => {
    s = scratch('ulob-cli-');
    await expectRefused([...cacheArgs(), '--block-size', '3000', unusedLoop(), makeDisk('disk.img')], /argument '3000' is invalid\. a block size is a power of two from 4K to 1M/);
    // The option and the value as typed, not 2097152 (newuser14).
    await expectRefused([...cacheArgs(), '--block-size', '2M', unusedLoop(), makeDisk('disk.img')], /^ulobdev: option '--block-size <N>' argument '2M' is invalid\. a block size is a power of two from 4K to 1M/);
    // Another block size than an existing cache's: says how to get a cache of that size.
    const disk = makeDisk('disk2.img');
    await makeCache(disk);
    await expectRefused(
      [...cacheArgs(), '--block-size', '64K', unusedLoop(), disk],
      new RegExp(`the cache uses 4096-byte blocks, not 65536; omit --block-size, or for a cache of 65536-byte blocks empty this one first \\('ulobdev discard -c ${join(s.dir, 'c.cache')} ${disk}'\\) and attach again\n$`),
    );
  });

  it('the kernel module frontends without their module', async () => {
    s = scratch('ulob-cli-');
    await expectRefused([...cacheArgs(), '/dev/uloop0', makeDisk('disk.img')], /needs the uloop kernel module \(not installed for kernel .*\): install it with DKMS.*docs\/laptop\.md/);
    const nbd = sh('sh', ['-c', 'test -e /sys/module/nbd']).status === 0;
    if (!nbd) await expectRefused([...cacheArgs(), '/dev/nbd0', makeDisk('disk.img')], /nbd kernel module is not loaded; run 'modprobe nbd'/);
  });

  it('uloop.ko refused by Secure Boot: one line naming the cause and the doc', async () => {
    s = scratch('ulob-cli-');
    // modprobe as it answers on a Secure Boot machine for an unsigned (or unenrolled-key) module
    const bin = join(s.dir, 'bin');
    mkdirSync(bin);
    writeFileSync(join(bin, 'modprobe'), `#!/bin/sh\necho "modprobe: ERROR: could not insert 'uloop': Key was rejected by service" >&2\nexit 1\n`, { mode: 0o755 });
    const env = { ...process.env, PATH: `${bin}:${process.env.PATH ?? '/usr/bin:/bin'}` };
    await expectRefused([...cacheArgs(), '/dev/uloop0', makeDisk('disk.img')], /refused uloop\.ko \(Key was rejected by service.*mokutil --import.*docs\/laptop\.md/, { env });
  });

  it('no root for a device frontend', async () => {
    s = scratch('ulob-cli-');
    await expectRefused([...cacheArgs(), unusedLoop(), makeDisk('disk.img')], /needs root/, { uid: 65534 });
  });

  it('detach and status of a device nobody serves', async () => {
    s = scratch('ulob-cli-');
    await expectRefused(['detach', '/dev/loop7'], /\/dev\/loop7 is not attached/);
    await expectRefused(['status', '/dev/loop7'], /\/dev\/loop7 is not attached/);
  });
});
