// fstab lines that name a filesystem by tag (UUID=, LABEL=, PARTUUID=, PARTLABEL=) find it on the
// cached device and on the raw disk alike: both carry the same superblock and partition table. Such
// a line may mount the raw disk behind the cache's back (whichever device udev linked last, or the
// raw disk at a boot where the daemon starts late) and then the dirty data on flash and the disk
// part ways. The attach reads fstab and the tags of the cached device and its partitions (blkid
// reads through the cache, never the disk directly) and warns once per such line, naming the
// cached device to use instead (docs/laptop.md, "Naming the device").
import { promises as fsp } from 'node:fs';
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
 * the raw disk `backing` carries the same tag. `devices` maps each cached device node to its tags.
 */
export function ambiguousTagWarnings(
  fstabPath: string,
  mounts: readonly TaggedMount[],
  devices: ReadonlyMap<string, DeviceTags>,
  backing: string,
): string[] {
  const out: string[] = [];
  for (const m of mounts) {
    for (const [node, tags] of devices) {
      if (tags[m.tag] !== m.value) continue;
      out.push(
        `${fstabPath} line ${m.line} mounts ${m.tag}=${m.value} on ${m.mountPoint}, which the raw disk ${backing} carries as well as ${node}: ` +
          `that line may mount the disk behind the cache; name ${node} there instead (see docs/laptop.md)`,
      );
      break;
    }
  }
  return out;
}

/**
 * Reads `fstabPath` and, only if some line names a device by tag, the tags of `device` and its
 * partitions (sysfs directory `sys`). Never throws: a missing fstab or blkid means no warning.
 */
export async function fstabWarnings(device: string, sys: string, backing: string, fstabPath = '/etc/fstab'): Promise<string[]> {
  let text: string;
  try {
    text = await fsp.readFile(fstabPath, 'utf8');
  } catch {
    return [];
  }
  const mounts = taggedMounts(text);
  if (mounts.length === 0) return [];
  const nodes = [device, ...(await partitionsOf(sys)).map((p) => `/dev/${p.name}`)];
  const devices = new Map<string, DeviceTags>();
  for (const node of nodes) {
    // -p: probe the device itself, not blkid's cache; the reads are served by this daemon.
    const out = await run('blkid', ['-p', '-o', 'export', node]).catch(() => '');
    devices.set(node, parseBlkidExport(out));
  }
  return ambiguousTagWarnings(fstabPath, mounts, devices, backing);
}
