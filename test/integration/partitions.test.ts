// Partitioned disks on /dev/loopN: the partitions appear (/dev/loopNpM), detach and SIGTERM refuse
// while any partition is mounted or open and change nothing, and a partition used as the backing
// disk keeps its cache across a re-bind under another device number (its identity is the disk's
// plus the partition, not the partition's device number).
import { closeSync, existsSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { fstabWarnings } from '../../src/daemon/fstab.js';
import { attachFreeLoop, killStrays, mustSh, prepareCliTests, scratch, sh, ulobdev, unusedLoop } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
const undo: Array<() => Promise<unknown> | unknown> = [];

beforeAll(() => {
  prepareCliTests();
}, 900_000);

afterEach(async () => {
  for (const step of undo.splice(0).reverse()) await step();
  s?.cleanup();
});

/** A GPT disk image: partition 1 of `first` from sector 2048, partition 2 the rest. */
function partitionedImage(name: string, size: string, first: string): string {
  const image = join(s.dir, name);
  mustSh('truncate', ['-s', size, image]);
  mustSh('sgdisk', ['-n', `1:2048:+${first}`, '-n', '2:0:0', image]);
  return image;
}

async function attach(args: string[], backing: string): Promise<string> {
  const { loop: dev } = await attachFreeLoop((loop) => ulobdev([...args, '--daemon', '--run-dir', s.runDir, '--state-dir', s.stateDir, loop, backing]));
  undo.push(async () => {
    const d = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
    if (d.code !== 0) killStrays(s.dir, s.runDir);
  });
  return dev;
}

async function status(dev: string): Promise<Record<string, any>> {
  const r = await ulobdev(['status', dev, '--json', '--run-dir', s.runDir]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

function boundTo(dev: string): string {
  return sh('losetup', ['-n', '-O', 'BACK-FILE', dev]).stdout.trim();
}

describe('partitions', () => {
  it('show on /dev/loopN; detach refuses while one is mounted or open, changing nothing; SIGTERM keeps serving until the unmount, then detaches', async () => {
    s = scratch('ulob-part-');
    // XFS takes 300 MB at least.
    const image = partitionedImage('disk.img', '512M', '320M');
    const dev = await attach(['--writeback', '-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap')], image);
    const name = dev.slice('/dev/'.length);
    expect(existsSync(`/sys/block/${name}/${name}p1`)).toBe(true);
    expect(existsSync(`/sys/block/${name}/${name}p2`)).toBe(true);
    expect(mustSh('partx', ['-g', '-o', 'NR,START,SECTORS', dev]).trim().split('\n').map((l) => l.trim().split(/\s+/))).toEqual([
      ['1', '2048', String((320 << 20) / 512)],
      ['2', String(2048 + (320 << 20) / 512), expect.any(String)],
    ]);
    mustSh('mkfs.xfs', ['-q', '-f', `${dev}p1`]);
    const mnt = join(s.dir, 'mnt');
    sh('mkdir', ['-p', mnt]);
    mustSh('mount', [`${dev}p1`, mnt]);
    undo.push(() => sh('umount', [mnt]));
    const { pid } = await status(dev);
    const backFile = boundTo(dev);

    const r = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`ulobdev: ${dev} stays attached: ${dev}p1 is mounted on ${mnt}; unmount it first\n`);
    // Nothing changed: still bound, still served.
    expect(boundTo(dev)).toBe(backFile);
    writeFileSync(join(mnt, 'after-detach'), 'still here');
    mustSh('sync', ['-f', join(mnt, 'after-detach')]);
    mustSh('umount', [mnt]);
    undo.pop();

    // Open by a process (no mount): refused too, naming the process.
    const fd = openSync(`${dev}p2`, 'r');
    try {
      const open = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
      expect(open.code).toBe(1);
      expect(open.stderr).toBe(`ulobdev: ${dev} stays attached: ${dev}p2 is open by pid ${process.pid} (node); stop or close it first\n`);
      expect(boundTo(dev)).toBe(backFile);
    } finally {
      closeSync(fd);
    }

    // SIGTERM (systemd's stop) while p1 is mounted: the daemon keeps serving, unbinds nothing, and
    // waits (up to --stop-timeout) for the unmount; once p1 is unmounted it detaches by itself.
    mustSh('mount', [`${dev}p1`, mnt]);
    undo.push(() => sh('umount', [mnt]));
    process.kill(pid, 'SIGTERM');
    await new Promise((resolve) => setTimeout(resolve, 1500));
    expect(boundTo(dev)).toBe(backFile);
    expect((await status(dev)).pid).toBe(pid);
    writeFileSync(join(mnt, 'after-sigterm'), 'still here');
    mustSh('sync', ['-f', join(mnt, 'after-sigterm')]);
    expect(readFileSync(join(mnt, 'after-detach'), 'utf8')).toBe('still here');
    mustSh('umount', [mnt]);
    undo.pop();
    for (let i = 0; i < 300 && boundTo(dev) === backFile; i++) await new Promise((resolve) => setTimeout(resolve, 100));
    expect(boundTo(dev)).toBe('');
    const d = await ulobdev(['status', dev, '--run-dir', s.runDir]);
    expect(d.stderr).toMatch(/is not attached/);
    undo.pop();
    expect(existsSync(`/sys/block/${name}/${name}p1`)).toBe(false);
  });

  it('a partition as BACKEND keeps its cache when its disk is bound under another device number', async () => {
    s = scratch('ulob-partback-');
    const image = partitionedImage('disk.img', '64M', '16M');
    const bindDisk = () => {
      const loop = mustSh('losetup', ['-f', '--show', '--partscan', image]).trim();
      const unbind = () => sh('losetup', ['-d', loop]);
      undo.push(unbind);
      // A kernel without the GPT parser (this test machine's) shows partitions only when told.
      if (!existsSync(`${loop}p1`)) mustSh('partx', ['--add', loop]);
      return { loop, unbind };
    };
    const first = bindDisk();
    const a = await attach(['--writeback'], `${first.loop}p1`);
    const st = await status(a);
    expect(st.paths.cache).not.toMatch(/devnum/);
    expect(st.paths.cache).toMatch(/^.*\/loop_file_\d+_\d+_\d+_0_part1_2048\.cache$/);
    mustSh('dd', ['if=/dev/urandom', `of=${a}`, 'bs=64k', 'count=4', 'oflag=direct', 'status=none']);
    expect(mustSh('blockdev', ['--getsize64', a]).trim()).toBe(String(16 << 20));
    const written = mustSh('sha256sum', [a]);
    expect((await ulobdev(['detach', a, '--run-dir', s.runDir])).code).toBe(0);
    undo.pop();
    first.unbind();
    undo.pop();

    // Another device number for the disk (and so for its partition): a spacer takes the disk's old
    // number itself, not the lowest free one (a test beside this one may free a lower number
    // meanwhile, and the disk would get its old one back: seen in a host run). If the bind fails,
    // another test holds that number, which keeps it from the disk as well.
    mustSh('truncate', ['-s', '1M', join(s.dir, 'spacer')]);
    if (sh('losetup', [first.loop, join(s.dir, 'spacer')]).status === 0) undo.push(() => sh('losetup', ['-d', first.loop]));
    const second = bindDisk();
    expect(second.loop).not.toBe(first.loop);
    const b = await attach(['--writeback'], `${second.loop}p1`);
    const again = await status(b);
    expect(again.paths.cache).toBe(st.paths.cache);
    expect(again.dirtyBytes).toBe(256 << 10);
    expect(mustSh('sha256sum', [b]).split(' ')[0]).toBe(written.split(' ')[0]);
  });

  it('a disk and its partitions are cached once, and a ulobdev device is never a BACKEND: each refusal names the daemon, in one line, and binds nothing (newuser14 F5a, F5b)', async () => {
    s = scratch('ulob-partonce-');
    const image = partitionedImage('disk.img', '64M', '16M');
    const disk = mustSh('losetup', ['-f', '--show', '--partscan', image]).trim();
    undo.push(() => sh('losetup', ['-d', disk]));
    if (!existsSync(`${disk}p1`)) mustSh('partx', ['--add', disk]);
    const refused = async (backing: string, message: RegExp) => {
      const target = unusedLoop();
      const r = await ulobdev(['--writeback', '-c', join(s.dir, 'other.cache'), '--run-dir', s.runDir, '--state-dir', s.stateDir, target, backing]);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(new RegExp(`^ulobdev: ${message.source}[^\\n]*\\n$`));
      expect(existsSync(join(s.dir, 'other.cache'))).toBe(false);
      expect(existsSync(`/sys/block/${target.slice(5)}`)).toBe(false);
    };
    // A partition cached: its whole disk is refused, naming the daemon; its sibling is not.
    const part = await attach(['--writeback', '-c', join(s.dir, 'p2.cache')], `${disk}p2`);
    await refused(disk, /\/dev\/loop\d+ holds \/dev\/loop\d+p2, which the ulobdev daemon of \/dev\/loop\d+ \(pid \d+\) caches: .*ulobdev detach /);
    // The disk named where its device is meant (bcache's tools take the backing disk): the device is named.
    for (const cmd of ['status', 'flush', 'detach']) {
      const r = await ulobdev([cmd, `${disk}p2`, '--run-dir', s.runDir]);
      expect(r.code).toBe(1);
      expect(r.stderr).toBe(`ulobdev: ${disk}p2 is the disk that ${part} (pid ${(await status(part)).pid}) caches, not a device of ours: give ${part} instead\n`);
    }
    // The ulobdev device itself as BACKEND: a cache of a cache.
    await refused(part, /\/dev\/loop\d+ is the ulobdev device of \/dev\/loop\d+ \(pid \d+\), a cache of \/dev\/loop\d+p2: name the disk itself/);
    expect((await ulobdev(['detach', part, '--run-dir', s.runDir])).code).toBe(0);
    undo.pop();

    // The whole disk cached: its partitions are refused, and so are the cached device's own partitions.
    const whole = await attach(['--writeback', '-c', join(s.dir, 'whole.cache')], disk);
    await refused(`${disk}p1`, /\/dev\/loop\d+p1 is on \/dev\/loop\d+, which the ulobdev daemon of /);
    if (!existsSync(`${whole}p1`)) mustSh('partx', ['--add', whole]);
    await refused(`${whole}p1`, /\/dev\/loop\d+p1 is a partition of the ulobdev device of /);
  });

  it('fstab lines that name a filesystem or partition of the device by tag are warned about at attach', async () => {
    s = scratch('ulob-fstab-');
    const image = join(s.dir, 'disk.img');
    mustSh('truncate', ['-s', '64M', image]);
    const partUuid = '6f6539ea-4052-4b2a-acde-0a2792298474';
    mustSh('sgdisk', ['-n', '1:2048:+16M', '-u', `1:${partUuid}`, '-n', '2:0:0', image]);
    const fsUuid = '81720442-f1c0-4c71-b2e1-d1b829c08e4e';
    const fstab = join(s.dir, 'fstab');
    const tmp = mustSh('losetup', ['-f', '--show', '--partscan', image]).trim();
    try {
      if (!existsSync(`${tmp}p2`)) mustSh('partx', ['--add', tmp]);
      mustSh('mkfs.ext4', ['-q', '-L', 'vault', '-U', fsUuid, `${tmp}p2`]);
      // With the udev rule installed the advice names the stable links, partition numbers from sysfs.
      writeFileSync(fstab, `LABEL=vault /srv ext4 defaults 0 2\nPARTUUID=${partUuid} /p1 ext4 defaults 0 2\n`);
      const linked = await fstabWarnings(tmp, `/sys/block/${basename(tmp)}`, image, fstab, '/dev/ulobdev/vault');
      expect(linked.map((l) => /name (.*) there instead/.exec(l)?.[1])).toEqual([
        `/dev/ulobdev/vault-part2 (the stable link to ${tmp}p2)`,
        `/dev/ulobdev/vault-part1 (the stable link to ${tmp}p1)`,
      ]);
    } finally {
      sh('losetup', ['-d', tmp]);
    }
    writeFileSync(
      fstab,
      [
        '# a comment: UUID=' + fsUuid,
        `UUID=${fsUuid.toUpperCase()} /srv/vault ext4 defaults 0 2`,
        'LABEL="vault" /srv/by-label ext4 defaults 0 2',
        `PARTUUID=${partUuid} /srv/p1 ext4 defaults 0 2`,
        'UUID=00000000-0000-0000-0000-000000000000 /other ext4 defaults 0 2',
        '/dev/sda1 /boot ext4 defaults 0 1',
        '',
      ].join('\n'),
    );
    const { loop: dev, result: r } = await attachFreeLoop((loop) =>
      ulobdev(['-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap'), '--fstab', fstab, '--daemon', '--run-dir', s.runDir, loop, image]),
    );
    undo.push(() => ulobdev(['detach', dev, '--run-dir', s.runDir]));
    const warn = (line: number, spec: string, mnt: string, node: string) =>
      `ulobdev: ${dev}: ${fstab} line ${line} mounts ${spec} on ${mnt}, which the raw disk ${image} carries as well as ${node}: that line may mount the disk behind the cache; name ${node} there instead (see docs/laptop.md)`;
    expect(r.stderr.trim().split('\n')).toEqual([
      warn(2, `UUID=${fsUuid}`, '/srv/vault', `${dev}p2`),
      warn(3, 'LABEL=vault', '/srv/by-label', `${dev}p2`),
      warn(4, `PARTUUID=${partUuid}`, '/srv/p1', `${dev}p1`),
    ]);
  });
});
