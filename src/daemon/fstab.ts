// fstab lines that name a filesystem by tag (UUID=, LABEL=, PARTUUID=, PARTLABEL=) find it on the
// cached device and on the raw disk alike: both carry the same superblock and partition table. Such
// a line may mount the raw disk behind the cache's back (whichever device udev linked last, or the
// raw disk at a boot where the daemon starts late) and then the dirty data on flash and the disk
// part ways. The attach reads fstab and the tags of the cached device and its partitions (blkid
// reads through the cache, never the disk directly) and warns once per such line, naming the
// cached device to use instead (docs/laptop.md, "Naming the device").
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { run } from '../bdev/programs.js';
import { partitionsOf } from '../sys.js';

const TAGS = ['UUID', 'LABEL', 'PARTUUID', 'PARTLABEL'] as const;
type Tag = (typeof TAGS)[number];

/** An fstab line that names its device by a tag. */
export interface TaggedMount {
  /** 1-based line number. */
  line: number;
  tag: Tag;
  value: string;
  mountPoint: string;
}

/** The tags blkid found on one device: TAG → value. */
export type DeviceTags = Partial<Record<Tag, string>>;

/** The fstab lines whose first field is TAG=value (quotes around the value allowed). */
export function taggedMounts(fstab: string): TaggedMount[] {
  const out: TaggedMount[] = [];
  fstab.split('\n').forEach((text, i) => {
    const fields = text.trim().split(/\s+/);
    if (fields.length < 2 || fields[0]!.startsWith('#')) return;
    const m = /^(UUID|LABEL|PARTUUID|PARTLABEL)=(.*)$/.exec(fields[0]!);
    if (!m) return;
    const value = m[2]!.replace(/^"(.*)"$/, '$1').replace(/^'(.*)'$/, '$1').replace(/\\040/g, ' ');
    out.push({ line: i + 1, tag: m[1] as Tag, value: m[1] === 'UUID' || m[1] === 'PARTUUID' ? value.toLowerCase() : value, mountPoint: fields[1]! });
  });
  return out;
}

/** The tags of `blkid -p -o export` output (PART_ENTRY_UUID and PART_ENTRY_NAME as PARTUUID, PARTLABEL). */
export function parseBlkidExport(text: string): DeviceTags {
  const tags: DeviceTags = {};
  for (const line of text.split('\n')) {
    const eq = line.indexOf('=');
    if (eq < 0) continue;
    const key = line.slice(0, eq);
    const value = line.slice(eq + 1).replace(/\\x20/g, ' ');
    if (key === 'UUID') tags.UUID = value.toLowerCase();
    else if (key === 'LABEL') tags.LABEL = value;
    else if (key === 'PART_ENTRY_UUID') tags.PARTUUID = value.toLowerCase();
    else if (key === 'PART_ENTRY_NAME') tags.PARTLABEL = value;
  }
  return tags;
}

/**
 * One warning per fstab line that names by tag a filesystem or partition of the cached device:
 * the raw disk `backing` carries the same tag. `devices` maps each cached device node to its tags;
 * `links` maps a node to its stable udev link (/dev/ulobdev/NAME, NAME-partN), the name the
 * advice gives when there is one: /dev/loopN may be another number at the next boot.
 */
export function ambiguousTagWarnings(
  fstabPath: string,
  mounts: readonly TaggedMount[],
  devices: ReadonlyMap<string, DeviceTags>,
  backing: string,
  links: ReadonlyMap<string, string> = new Map(),
): string[] {
  const out: string[] = [];
  for (const m of mounts) {
    for (const [node, tags] of devices) {
      if (tags[m.tag] !== m.value) continue;
      const link = links.get(node);
      out.push(
        `${fstabPath} line ${m.line} mounts ${m.tag}=${m.value} on ${m.mountPoint}, which the raw disk ${backing} carries as well as ${node}: ` +
          `that line may mount the disk behind the cache; name ${link ? `${link} (the stable link to ${node})` : node} there instead (see docs/laptop.md)`,
      );
      break;
    }
  }
  return out;
}

/** Where `make install` and the Debian package put the udev rule that makes /dev/ulobdev/NAME. */
export const UDEV_RULE_PATHS = ['/usr/lib/udev/rules.d/60-ulobdev.rules', '/lib/udev/rules.d/60-ulobdev.rules', '/etc/udev/rules.d/60-ulobdev.rules'];

/**
 * The stable link udev makes for the device served as `name` (`/dev/ulobdev/NAME`), or undefined
 * when none will exist: the rule is not installed, or the run directory is not the one its helper
 * reads (`--run-dir`).
 */
export async function stableLinkFor(name: string, defaultRunDir: boolean, rulePaths: readonly string[] = UDEV_RULE_PATHS): Promise<string | undefined> {
  if (!defaultRunDir) return undefined;
  for (const p of rulePaths) {
    if (await fsp.access(p).then(() => true, () => false)) return `/dev/ulobdev/${name}`;
  }
  return undefined;
}

/**
 * Reads `fstabPath` and, only if some line names a device by tag, the tags of `device` and its
 * partitions (sysfs directory `sys`). `stableLink` (from stableLinkFor) is the device's udev link;
 * its partitions' are LINK-partN. Never throws: a missing fstab or blkid means no warning.
 */
export async function fstabWarnings(device: string, sys: string, backing: string, fstabPath = '/etc/fstab', stableLink?: string): Promise<string[]> {
  let text: string;
  try {
    text = await fsp.readFile(fstabPath, 'utf8');
  } catch {
    return [];
  }
  const mounts = taggedMounts(text);
  if (mounts.length === 0) return [];
  const partitions = await partitionsOf(sys);
  const nodes = [device, ...partitions.map((p) => `/dev/${p.name}`)];
  const links = new Map<string, string>();
  if (stableLink) {
    links.set(device, stableLink);
    for (const p of partitions) {
      const n = (await fsp.readFile(join(p.sysDir, 'partition'), 'utf8').catch(() => '')).trim();
      if (/^\d+$/.test(n)) links.set(`/dev/${p.name}`, `${stableLink}-part${n}`);
    }
  }
  const devices = new Map<string, DeviceTags>();
  for (const node of nodes) {
    // -p: probe the device itself, not blkid's cache; the reads are served by this daemon.
    const out = await run('blkid', ['-p', '-o', 'export', node]).catch(() => '');
    devices.set(node, parseBlkidExport(out));
  }
  return ambiguousTagWarnings(fstabPath, mounts, devices, backing, links);
}
