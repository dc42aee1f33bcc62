// The disk fingerprint: a hash of the disk regions every filesystem rewrites when it is mounted
// read-write (ext4's and XFS's primary superblocks, btrfs's at 64 KiB, GPT's headers: the first
// and the last MiB of the disk, and the first MiB of each of its partitions). A cache keeps the
// fingerprint of the disk as it last left it (cache_info.disk_fingerprint); an attach that finds
// another one knows the disk was written without ulobdev (mounted directly after a detach) and that
// the cache's clean blocks may be older than the disk's. docs/design.md, "A disk written without
// ulobdev", has the reasoning (when it is taken, what it cannot see).
import { createHash } from 'node:crypto';
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
}

/**
 * The regions hashed, as [offset, length] in bytes, sorted and without repeats: the first and last
 * FINGERPRINT_REGION bytes of a disk of `size` bytes and the first FINGERPRINT_REGION (or to the
 * end of the disk) at each of `partitionStarts` that lies inside it.
 */
export function fingerprintRegions(size: number, partitionStarts: readonly number[] = []): [number, number][] {
  const starts = new Set<number>([0, Math.max(0, size - FINGERPRINT_REGION)]);
  for (const p of partitionStarts) if (Number.isSafeInteger(p) && p >= 0 && p < size) starts.add(p);
  return [...starts].sort((a, b) => a - b).map((at) => [at, Math.min(FINGERPRINT_REGION, size - at)]);
}

/**
 * Reads the regions of `disk` (fingerprintRegions; at most a few MiB, one read each) and returns
 * their hash: `sha256:` and 64 hex digits, the same for the same bytes at the same places. Throws
 * what disk.readAt throws (IOFailedError for a failing disk).
 */
export async function diskFingerprint(disk: FingerprintDisk): Promise<string> {
  const regions = fingerprintRegions(disk.size, (await disk.partitionStarts?.()) ?? []);
  const hash = createHash('sha256');
  const buf = alignedBuffer(FINGERPRINT_REGION, 4096);
  for (const [at, length] of regions) {
    const view = buf.subarray(0, length);
    await disk.readAt(view, at);
    hash.update(`${at}+${length}:`);
    hash.update(view);
  }
  return `sha256:${hash.digest('hex')}`;
}
