// The disk fingerprint: a hash of the disk regions every filesystem rewrites when it is mounted
// read-write (ext4's and XFS's primary superblocks, btrfs's at 64 KiB, GPT's headers: the first
// and the last MiB of the disk, and the first MiB of each of its partitions). A cache keeps the
// fingerprint of the disk as it last left it (cache_info.disk_fingerprint); an attach that finds
// another one knows the disk was written without ulobdev (mounted directly after a detach) and that
// the cache's clean blocks may be older than the disk's. docs/design.md, "A disk written without
// ulobdev", has the reasoning (when it is taken, what it cannot see).
import { createHash } from 'node:crypto';
import { constants, promises as fsp } from 'node:fs';
import { alignedBuffer } from '../native/io.js';

/** Bytes hashed at each region's start: 1 MiB. */
export const FINGERPRINT_REGION = 1024 * 1024;

/** What the fingerprint reads: the backing disk (a Source) and, for a whole disk, where its partitions start. */
export interface FingerprintDisk {
  /** Bytes of the disk. */
  readonly size: number;
  /** Reads exactly buf.byteLength bytes at `position` (whole sectors, from an aligned buffer). */
  readAt(buf: Uint8Array, position: number): Promise<void>;
  /** Byte offsets where the disk's partitions start (empty for a partition or a disk without any). */
  partitionStarts?(): Promise<number[]>;
  /**
   * The disk's path: when given, the regions are read through a descriptor of its own opened with
   * O_DIRECT, past every page cache. A block device's page cache is not its partitions': pages a
   * holder of the whole disk kept stay stale after a write through /dev/sdb1 (a raw mount), and a
   * fingerprint read from them would miss that write. Where O_DIRECT is refused (tmpfs), readAt.
   */
  readonly path?: string;
}

/**
 * The regions hashed, as [offset, length] in bytes, sorted and without repeats: the first and last
 * FINGERPRINT_REGION bytes of a disk of `size` bytes and the first FINGERPRINT_REGION (or to the
 * end of the disk) at each of `partitionStarts` that lies inside it, and one 4 KiB probe at 1, 2,
 * 16 and 17 MiB past the disk's and each partition's start that fits (LVM's and LUKS's default
 * data offsets, where a filesystem inside them keeps its superblock).
 */
export function fingerprintRegions(size: number, partitionStarts: readonly number[] = []): [number, number][] {
  const starts = new Set<number>([0, Math.max(0, size - FINGERPRINT_REGION)]);
  for (const p of partitionStarts) if (Number.isSafeInteger(p) && p >= 0 && p < size) starts.add(p);
  const regions = new Map<number, number>();
  for (const at of starts) regions.set(at, Math.min(FINGERPRINT_REGION, size - at));
  // Where a filesystem's superblock lies behind a container's header at its default layout: LVM's
  // first extent (1 MiB), LUKS1's payload (2 MiB), LUKS2's (16 MiB), LUKS2 on LVM (17 MiB). One
  // block each, from the disk's and each partition's start.
  for (const p of [0, ...partitionStarts]) {
    if (!Number.isSafeInteger(p) || p < 0) continue;
    for (const off of CONTAINER_PROBES) {
      const at = p + off;
      if (at + PROBE <= size && !regions.has(at)) regions.set(at, PROBE);
    }
  }
  return [...regions.entries()].sort((a, b) => a[0] - b[0]);
}

/** Offsets (bytes, from a disk's or partition's start) of the container probes: fingerprintRegions. */
const CONTAINER_PROBES = [1, 2, 16, 17].map((m) => m * 1024 * 1024);
/** Bytes of one container probe: the first block behind the header, where ext4's superblock (at 1 KiB), XFS's and btrfs's (at 64 KiB: not covered) lie. */
const PROBE = 4096;

/**
 * Reads the regions of `disk` (fingerprintRegions; at most a few MiB, one read each) and returns
 * their hash: `sha256:` and 64 hex digits, the same for the same bytes at the same places. Throws
 * what disk.readAt throws (IOFailedError for a failing disk).
 */
export async function diskFingerprint(disk: FingerprintDisk): Promise<string> {
  const direct = disk.path ? await fsp.open(disk.path, constants.O_RDONLY | constants.O_DIRECT).catch(() => null) : null;
  try {
    const readAt = async (view: Buffer, at: number): Promise<void> => {
      if (direct) {
        try {
          for (let done = 0; done < view.length; ) {
            const { bytesRead } = await direct.read(view, done, view.length - done, at + done);
            if (bytesRead === 0) throw Object.assign(new Error(`${disk.path} ended at byte ${at + done}`), { code: 'EIO' });
            done += bytesRead;
          }
          return;
        } catch (err) {
          // EINVAL: this read's size or place does not suit O_DIRECT here; the disk's own read then.
          if ((err as { code?: string }).code !== 'EINVAL') throw err;
        }
      }
      await disk.readAt(view, at);
    };
    const buf = alignedBuffer(FINGERPRINT_REGION, 4096);
    // The partitions are also read from the disk's own table (in its first MiB, read here first):
    // an image file has no sysfs partitions, yet a loop device with -P mounts them (newuser9b).
    const head = buf.subarray(0, Math.min(FINGERPRINT_REGION, disk.size));
    await readAt(head, 0);
    const starts = [...((await disk.partitionStarts?.()) ?? []), ...tablePartitionStarts(head)];
    const regions = fingerprintRegions(disk.size, starts);
    const hash = createHash('sha256');
    for (const [at, length] of regions) {
      const view = buf.subarray(0, length);
      await readAt(view, at);
      hash.update(`${at}+${length}:`);
      hash.update(view);
    }
    return `sha256:${hash.digest('hex')}`;
  } finally {
    await direct?.close().catch(() => undefined);
  }
}

/**
 * Byte offsets where the partitions of a GPT or MBR partition table start, read from `head` (the
 * disk's first bytes; entries beyond it are not seen). GPT (UEFI spec, "GUID Partition Table"):
 * the header ("EFI PART") at LBA 1, tried for 512- and 4096-byte sectors, its entry array (LBA at
 * byte 72, count at 80, size at 84), each used entry's first LBA at byte 32. Without a GPT, MBR:
 * the 0x55AA signature and four entries at byte 446, each start (LBA at byte 8 of the entry) taken
 * in 512- and in 4096-byte sectors (the disk's sector size is not known here; an offset too many
 * is only hashed too). Extended partitions' chains are not followed. Never throws.
 */
export function tablePartitionStarts(head: Uint8Array): number[] {
  const view = Buffer.from(head.buffer, head.byteOffset, head.byteLength);
  const out: number[] = [];
  for (const sector of [512, 4096]) {
    const h = sector;
    if (view.length < h + 92 || view.toString('latin1', h, h + 8) !== 'EFI PART') continue;
    const entriesLba = Number(view.readBigUInt64LE(h + 72));
    const count = view.readUInt32LE(h + 80);
    const size = view.readUInt32LE(h + 84);
    if (size < 128 || count > 4096) continue;
    for (let i = 0; i < count; i++) {
      const e = entriesLba * sector + i * size;
      if (!Number.isSafeInteger(e) || e + 48 > view.length) break;
      if (view.subarray(e, e + 16).every((b) => b === 0)) continue; // unused entry: no type GUID
      const first = Number(view.readBigUInt64LE(e + 32));
      if (Number.isSafeInteger(first * sector)) out.push(first * sector);
    }
    if (out.length > 0) return out;
  }
  if (view.length >= 512 && view[510] === 0x55 && view[511] === 0xaa) {
    for (let i = 0; i < 4; i++) {
      const e = 446 + i * 16;
      const type = view[e + 4];
      if (type === 0 || type === 0xee) continue; // empty, or GPT's protective entry
      const lba = view.readUInt32LE(e + 8);
      if (lba > 0) out.push(lba * 512, lba * 4096);
    }
  }
  return out;
}
