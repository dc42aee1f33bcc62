// blockStack walks sysfs from a block device down to what it is built on; the cache-path check
// (assertCachePathsApart) refuses a cache whose filesystem shares any of it with the disk. A fake
// sysfs laid out as the kernel does (dev/block/MAJ:MIN symlinks into devices/, a partition's
// directory inside its disk's, slaves/ links for dm and md).
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { blockStack } from '../../src/sys.js';

let sys: string;
beforeEach(() => {
  sys = mkdtempSync(join(tmpdir(), 'ulob-sysfs-'));
  mkdirSync(join(sys, 'dev/block'), { recursive: true });
});
afterEach(() => rmSync(sys, { recursive: true, force: true }));

function device(path: string, dev: string, partition = false): string {
  const dir = join(sys, 'devices', path);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'dev'), `${dev}\n`);
  if (partition) writeFileSync(join(dir, 'partition'), '1\n');
  symlinkSync(dir, join(sys, 'dev/block', dev));
  return dir;
}

function slave(upper: string, lower: string, name: string): void {
  mkdirSync(join(upper, 'slaves'), { recursive: true });
  symlinkSync(lower, join(upper, 'slaves', name));
}

it('follows partitions to their disk and dm/md slaves down to the disks, itself first', async () => {
  device('pci/ata1/block/sdb', '8:16');
  const sdb1 = device('pci/ata1/block/sdb/sdb1', '8:17', true);
  const sdb2 = device('pci/ata1/block/sdb/sdb2', '8:18', true);
  device('pci/ata2/block/sdc', '8:32');
  const sdc1 = device('pci/ata2/block/sdc/sdc1', '8:33', true);
  const md0 = device('virtual/block/md0', '9:0');
  slave(md0, sdb1, 'sdb1');
  slave(md0, sdc1, 'sdc1');
  const dm0 = device('virtual/block/dm-0', '253:0');
  slave(dm0, md0, 'md0');
  device('virtual/block/loop3', '7:3');

  expect([...(await blockStack('253:0', sys)).values()]).toEqual(['dm-0', 'md0', 'sdb1', 'sdc1', 'sdb', 'sdc']);
  expect([...(await blockStack('8:18', sys)).entries()]).toEqual([['8:18', 'sdb2'], ['8:16', 'sdb']]);
  expect([...(await blockStack('7:3', sys)).values()]).toEqual(['loop3']);
  expect(sdb2).toContain('sdb2');
  // Unknown devices end the walk quietly.
  expect((await blockStack('1:99', sys)).size).toBe(0);
});

// mountsOfSource: the mounts of a disk deleted while mounted (a ublk device whose recovery failed),
// found by the source mount(8) recorded, since sysfs no longer lists it.
it('mountsOfSource finds a device and its partitions by mount source, unescaping the mount point', async () => {
  const mountinfo = [
    '22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw',
    '90 22 259:3 / /tmp/m rw,relatime - ext4 /dev/ublkb0 rw',
    '91 22 259:4 / /srv/with\\040space rw - xfs /dev/ublkb0p2 rw',
    '92 22 259:5 / /other rw - ext4 /dev/ublkb01 rw',
    '93 22 259:6 / /x rw - ext4 /dev/ublkb0px rw',
  ].join('\n');
  const { mountsOfSource } = await import('../../src/sys.js');
  expect(await mountsOfSource('/dev/ublkb0', mountinfo)).toEqual(['/tmp/m', '/srv/with space']);
  expect(await mountsOfSource('/dev/ublkb1', mountinfo)).toEqual([]);
});
