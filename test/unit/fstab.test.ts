// fstab lines that name a filesystem by tag (src/daemon/fstab.ts): which lines count, how blkid's
// tags are read, the warning's advice (the stable /dev/ulobdev link when udev makes one, else the
// device node), and when a stable link is offered at all.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ambiguousTagWarnings, parseBlkidExport, stableLinkFor, taggedMounts } from '../../src/daemon/fstab.js';

describe('fstab tags', () => {
  it('reads tagged lines only, with quotes, escapes and case as mount does', () => {
    const text = [
      '# UUID=ABC /x ext4',
      'UUID=ABCD-EF /srv ext4 defaults 0 2',
      'LABEL="my\\040disk" /data xfs defaults 0 2',
      "PARTLABEL='Vault' /v ext4 defaults 0 2",
      '/dev/sda1 /boot ext4 defaults 0 1',
      'UUID=lonely',
    ].join('\n');
    expect(taggedMounts(text)).toEqual([
      { line: 2, tag: 'UUID', value: 'abcd-ef', mountPoint: '/srv' },
      { line: 3, tag: 'LABEL', value: 'my disk', mountPoint: '/data' },
      { line: 4, tag: 'PARTLABEL', value: 'Vault', mountPoint: '/v' },
    ]);
  });

  it("takes blkid's partition entry names as PARTUUID and PARTLABEL", () => {
    expect(parseBlkidExport('DEVNAME=/dev/loop6p1\nUUID=AB-CD\nLABEL=a\\x20b\nPART_ENTRY_UUID=1234-AB\nPART_ENTRY_NAME=Linux\n')).toEqual({
      UUID: 'ab-cd',
      LABEL: 'a b',
      PARTUUID: '1234-ab',
      PARTLABEL: 'Linux',
    });
  });

  it('names the stable link where there is one, else the device node; one warning per line', () => {
    const mounts = taggedMounts('UUID=ab-cd /srv ext4 defaults 0 2\nPARTUUID=12 /p ext4 defaults 0 2\nLABEL=none /n ext4 defaults 0 2\n');
    const devices = new Map([
      ['/dev/loop6', {}],
      ['/dev/loop6p1', { PARTUUID: '12', UUID: 'ab-cd' }],
    ]);
    const plain = ambiguousTagWarnings('/etc/fstab', mounts, devices, '/dev/sdb');
    expect(plain).toEqual([
      '/etc/fstab line 1 mounts UUID=ab-cd on /srv, which the raw disk /dev/sdb carries as well as /dev/loop6p1: that line may mount the disk behind the cache; name /dev/loop6p1 there instead (see docs/laptop.md)',
      '/etc/fstab line 2 mounts PARTUUID=12 on /p, which the raw disk /dev/sdb carries as well as /dev/loop6p1: that line may mount the disk behind the cache; name /dev/loop6p1 there instead (see docs/laptop.md)',
    ]);
    const linked = ambiguousTagWarnings('/etc/fstab', mounts, devices, '/dev/sdb', new Map([['/dev/loop6p1', '/dev/ulobdev/data-part1']]));
    expect(linked[0]).toContain('name /dev/ulobdev/data-part1 (the stable link to /dev/loop6p1) there instead');
  });

  it('offers /dev/ulobdev/NAME only with the udev rule installed and the default run directory', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ulob-rule-'));
    try {
      const rule = join(dir, '60-ulobdev.rules');
      const missing = join(dir, 'none.rules');
      expect(await stableLinkFor('data', true, [missing])).toBeUndefined();
      writeFileSync(rule, '# rule\n');
      expect(await stableLinkFor('data', true, [missing, rule])).toBe('/dev/ulobdev/data');
      expect(await stableLinkFor('data', false, [rule])).toBeUndefined();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
