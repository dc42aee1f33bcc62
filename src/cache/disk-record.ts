// Disk records: one small JSON file per backing disk on the host (STATE_DIR/disks/), keyed by the
// disk's identity (the backing id the cache metadata stores), saying which cache last took the disk
// for write-back, whether that cache may hold dirty data, and the disk's flush generation: a
// counter bumped, durably, before each flush writes the disk. Each cache's metadata keeps the
// generation it last saw or wrote (disk_generation). Together they stop the F4 data loss of
// session 7: a second cache for a disk whose first cache still holds dirty data is refused, and so
// is a cache whose clean blocks the disk no longer has (it was written through another cache since).
// bcache and lvmcache keep such a mark on the disk itself; ulobdev never writes the user's disk
// outside the flusher, so the mark lives on the host. docs/format.md, "Disk records", has the format;
// docs/design.md, "Two caches for one disk", the reasoning.
import { createHash } from 'node:crypto';
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readFileSync, readdirSync, renameSync, rmSync, writeSync } from 'node:fs';
import { isAbsolute, join, resolve } from 'node:path';
import { CacheBusyError, CorruptMetadataError, DiskConflictError, StaleCacheError, ioError } from '../errors.js';
import { formatBytes } from '../units.js';
import { Bitmap } from './bitmap.js';
import { Geometry } from './layout.js';
import { Metadata } from './metadata.js';

export const DISK_RECORD_VERSION = 1;
/** The directory of disk records under the state directory. */
export const DISK_RECORD_DIR = 'disks';

/** The cache that last took the disk for write-back. */
export interface DiskOwner {
  /** Absolute path of its cache file (for messages and the commands they suggest). */
  cache: string;
  /** Absolute path of its metadata: what the guard opens to count its dirty blocks. */
  metadata: string;
  /** Its uuid (cache_info.uuid): a cache re-created at the same path is another cache. */
  uuid: string;
  /** True from its write-back attach until a close (or discard) that left nothing dirty. */
  mayBeDirty: boolean;
  /** Dirty bytes at its last close (0 while attached: see mayBeDirty). */
  dirtyBytes: number;
  /**
   * The disk as the user named it when this cache took it (a relative file path made absolute),
   * for the commands a refusal suggests: a partition's cache must be named with the partition
   * (newuser8 item 4). Absent in records written before it.
   */
  device?: string;
}

/** One disk record (STATE_DIR/disks/ID.json). */
export interface DiskRecord {
  version: number;
  /** The disk's identity, as cache_info.backing_id. */
  disk: string;
  /** Bumped before each flush writes the disk; 0 for a record no flush has bumped yet. */
  generation: number;
  /** uuid of the cache whose flush made `generation`, or null (none yet). */
  writer: string | null;
  /** The flush epoch that flush was to commit in the writer's metadata (its flush_epoch + 1), or null. */
  writerEpoch: number | null;
  owner: DiskOwner | null;
  /** Milliseconds since the epoch of the last write of the record. */
  updatedAt: number;
}

/** What the guard knows of a cache being opened. */
export interface GuardedCache {
  uuid: string;
  /** Absolute cache, bitmap and metadata paths. */
  cache: string;
  metadata: string;
  /** cache_info.disk_generation; null: made before disk records existed. */
  diskGeneration: number | null;
  /** The open creates this cache: it holds nothing, so it cannot be stale. */
  created: boolean;
  /** Dirty bytes it holds (zeroed blocks included). */
  dirtyBytes: number;
  /** Its flush epoch (cache_info.flush_epoch): a copy restored from an older backup has an older one. */
  flushEpoch: number;
  /** The disk as the user named it, for messages. */
  description: string;
}

/** The records of one state directory. Every method is synchronous: a record is a few hundred bytes. */
export class DiskRecords {
  /** The directory holding the records (STATE_DIR/disks). */
  readonly dir: string;

  constructor(stateDir: string) {
    this.dir = join(resolve(stateDir), DISK_RECORD_DIR);
  }

  /** The file of `disk`'s record (any backing id: kept under its diskKey), made safe for a file name, with a hash that keeps keys apart. */
  pathOf(id: string): string {
    const disk = diskKey(id);
    const stem = disk.replace(/[^A-Za-z0-9._-]+/g, '_').slice(0, 120);
    return join(this.dir, `${stem}-${createHash('sha256').update(disk).digest('hex').slice(0, 12)}.json`);
  }

  /**
   * The record of `id` (any backing id: the record of its diskKey, whose `disk` is that key), or
   * null when there is none. Throws CorruptMetadataError for a file that
   * is not a record of this disk (with what to do), IOFailedError when it cannot be read.
   */
  read(id: string): DiskRecord | null {
    const disk = diskKey(id);
    const path = this.pathOf(disk);
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (err) {
      if ((err as { code?: string }).code === 'ENOENT') return null;
      throw ioError('read the disk record', path, err);
    }
    let r: DiskRecord;
    try {
      r = JSON.parse(text) as DiskRecord;
    } catch {
      r = {} as DiskRecord;
    }
    const owner = r.owner;
    const ok =
      r.version === DISK_RECORD_VERSION &&
      r.disk === disk &&
      Number.isSafeInteger(r.generation) &&
      r.generation >= 0 &&
      (r.writer === null || typeof r.writer === 'string') &&
      (r.writerEpoch === null || Number.isSafeInteger(r.writerEpoch)) &&
      (owner === null ||
        (typeof owner === 'object' &&
          typeof owner.cache === 'string' &&
          typeof owner.metadata === 'string' &&
          typeof owner.uuid === 'string' &&
          typeof owner.mayBeDirty === 'boolean' &&
          Number.isSafeInteger(owner.dirtyBytes) &&
          (owner.device === undefined || typeof owner.device === 'string')));
    if (!ok) {
      throw new CorruptMetadataError(
        `${path} is not a valid ulobdev disk record for ${disk}; if no cache of this disk holds dirty data, remove it (the next attach writes a new one)`,
      );
    }
    return r;
  }

  /**
   * Writes `record` atomically and durably: a temporary file, fsync, rename over the record,
   * fsync of the directory, under the diskKey of `record.disk` (which it stores). Returns once it
   * is on the host's disk. Throws IOFailedError.
   */
  write(given: DiskRecord): void {
    const record = { ...given, disk: diskKey(given.disk) };
    const path = this.pathOf(record.disk);
    const tmp = `${path}.tmp-${process.pid}`;
    try {
      mkdirSync(this.dir, { recursive: true, mode: 0o700 });
      const fd = openSync(tmp, 'w', 0o600);
      try {
        writeSync(fd, JSON.stringify(record, null, 2) + '\n');
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
      renameSync(tmp, path);
      const dirFd = openSync(this.dir, 'r');
      try {
        fsyncSync(dirFd);
      } finally {
        closeSync(dirFd);
      }
    } catch (err) {
      rmSync(tmp, { force: true });
      const e = ioError('write the disk record', path, err);
      e.message += `; ulobdev keeps a record of each disk it caches in ${this.dir} (docs/format.md, "Disk records"): the directory must be writable`;
      throw e;
    }
  }

  /**
   * The keys of every record that shares blocks with `disk` (any backing id; docs/format.md, "Disk
   * records"): its whole disk, its partitions, and for a disk over an image file every other view
   * of that file at another offset (relatedDisks). Unreadable files are skipped.
   */
  relatedOf(disk: string): string[] {
    const key = diskKey(disk);
    let names: string[];
    try {
      names = readdirSync(this.dir);
    } catch {
      return [];
    }
    const ids: string[] = [];
    for (const name of names) {
      if (!name.endsWith('.json')) continue;
      try {
        const r = JSON.parse(readFileSync(join(this.dir, name), 'utf8')) as { disk?: unknown };
        if (typeof r.disk === 'string' && relatedDisks(key, r.disk)) ids.push(r.disk);
      } catch {
        // not a record (a temporary file of a crashed write): skip
      }
    }
    return ids;
  }
}

/**
 * The key a disk's record is kept under, for a backing id (src/source/backing.ts). A loop device
 * at offset 0 over an image file shows the file's blocks at the same addresses, so it is the same
 * disk as the file: `loop:file:DEV:INO@0` is keyed `file:DEV:INO`, and its partitions
 * `loop:file:DEV:INO@0:partN@START` as `file:DEV:INO:partN@START` (newuser8 F1: a cache of the file
 * and one of /dev/loop0p1 over it were two disks to the records). The backing ids themselves are
 * unchanged (cache metadata stores them). Records are never written under the old key outside
 * this unreleased session's builds (main has no disk records yet), so there is no migration.
 */
export function diskKey(id: string): string {
  const m = /^loop:(file:\d+:\d+:\d+)@0(?=$|:part\d+@\d+$)/.exec(id);
  return m ? m[1]! + id.slice(m[0].length) : id;
}

/** The image file (`file:DEV:INO`) under a record key: the file, a loop device over it at any offset, or a partition of either. */
function imageFileOf(key: string): string | undefined {
  return /^(?:loop:)?(file:\d+:\d+:\d+)(?:@\d+)?(?::part\d+@\d+)?$/.exec(key)?.[1];
}

/**
 * Whether two record keys (diskKey) are different disks that share blocks: a whole disk and one of
 * its partitions, or two views of one image file at different offsets (the file and a loop device
 * at offset 1 MiB over it, or their partitions: which blocks overlap is not worked out, so any two
 * are related, the safe side). Two partitions of one disk are not.
 */
export function relatedDisks(a: string, b: string): boolean {
  if (a === b) return false;
  if (wholeDiskOf(a) === b || wholeDiskOf(b) === a) return true;
  const file = imageFileOf(a);
  return file !== undefined && file === imageFileOf(b) && (wholeDiskOf(a) ?? a) !== (wholeDiskOf(b) ?? b);
}

/** The whole disk of a partition's id (`${disk}:partN@START`), or undefined for a whole disk. */
export function wholeDiskOf(id: string): string | undefined {
  const m = /^(.*):part\d+@\d+$/.exec(id);
  return m?.[1];
}

/** Dirty bytes another cache holds for certain (it exists and is the record's), or what the record says of a missing one. */
interface OwnerState {
  /** 'present': its metadata was read; 'missing': not there (flash unmounted, or removed); 'replaced': another cache is at its path now. */
  state: 'present' | 'missing' | 'replaced';
  dirtyBytes: number;
}

function ownerState(owner: DiskOwner): OwnerState {
  if (!existsSync(owner.metadata)) return { state: 'missing', dirtyBytes: owner.mayBeDirty ? owner.dirtyBytes : 0 };
  let meta: Metadata;
  try {
    meta = Metadata.open(owner.metadata);
  } catch (err) {
    if (err instanceof CacheBusyError) {
      throw new CacheBusyError(`${owner.cache}, the write-back cache of this disk, is in use by another ulobdev process; detach that one first ('ulobdev status' lists it)`, {
        path: resolve(owner.metadata),
      });
    }
    throw err;
  }
  try {
    if (meta.info.uuid !== owner.uuid) return { state: 'replaced', dirtyBytes: 0 };
    // Rows may overlap: each block counts once (zeroed ones too: the disk lacks their zeros).
    const dirty = new Bitmap(new Geometry(meta.info.backingSize, meta.info.blockSize).blockCount);
    for (const e of meta.dirtyExtents()) dirty.setRange(e.start, e.start + e.count);
    return { state: 'present', dirtyBytes: dirty.count() * meta.info.blockSize };
  } finally {
    meta.close();
  }
}

/** One line naming where another cache's dirty data is and the three ways out. */
function conflict(description: string, owner: DiskOwner, st: OwnerState, self: GuardedCache, relation: string): DiskConflictError {
  const where = st.state === 'missing' ? `${owner.cache}, which is not there now (flash not mounted?)` : owner.cache;
  const size = st.state === 'missing' ? `${formatBytes(st.dirtyBytes)} (at its last detach)` : formatBytes(st.dirtyBytes);
  // The owner's own disk (a partition's cache is attached and discarded with the partition), as
  // its user named it; records from before `device` fall back to this disk.
  const its = owner.device ?? description;
  const forget =
    st.state === 'missing'
      ? `if it is gone for good, 'ulobdev discard --force -c ${owner.cache} ${its}' forgets it (losing that data)`
      : `or 'ulobdev discard --force -c ${owner.cache} ${its}' to lose that data`;
  return new DiskConflictError(
    `${description} has ${size} of dirty data in ${where}${relation} that ${self.created ? 'a new cache' : self.cache} would not show and a flush of either would undo: ` +
      `attach ${its} with -c ${owner.cache} and flush it, ${forget}; nothing was changed`,
  );
}

/**
 * The attach-time guard (every frontend, read-only attaches too). Reads `disk`'s record and those
 * of its whole disk and partitions; throws, changing nothing:
 * - DiskConflictError when another existing cache (of the disk, its whole disk, or one of its
 *   partitions) holds dirty data, or the record says a missing one did at its last detach;
 * - StaleCacheError when the disk was written through another cache since `self` last saw it
 *   (its generation is older than the record's), or `self` predates disk records while the record
 *   names another cache that has flushed; with dirty blocks, as a conflict never to be flushed.
 * Returns the generation `self` is at once accepted: the record's (or self's own for a disk
 * without a record: adopted).
 */
export function checkDiskRecord(records: DiskRecords, disk: string, self: GuardedCache): { generation: number; record: DiskRecord | null } {
  const record = records.read(disk);
  const key = diskKey(disk);
  const related = records.relatedOf(key);
  // Another cache (of this disk, or of one sharing its blocks: its whole disk, a partition, the
  // same image file at another offset) with dirty data.
  for (const [id, r] of [[key, record] as const, ...related.map((id) => [id, records.read(id)] as const)]) {
    const owner = r?.owner;
    // The owner's path holding this cache now: the owner was replaced (discarded, and this cache
    // made there since) without its record being told, e.g. discarded with another state dir.
    if (!owner || owner.uuid === self.uuid || owner.metadata === self.metadata) continue;
    const st = ownerState(owner);
    if (st.state === 'replaced' || st.dirtyBytes === 0) continue;
    const relation =
      id === key
        ? ''
        : ` (the cache of ${id === wholeDiskOf(key) ? 'its whole disk' : wholeDiskOf(id) === key ? 'one of its partitions' : 'the same image file at another offset, which shares its blocks'})`;
    throw conflict(self.description, owner, st, self, relation);
  }
  if (!record) return { generation: self.diskGeneration ?? 0, record: null };
  if (self.created) return { generation: record.generation, record };
  const seen = self.diskGeneration;
  // Its own flush whose record write went through and whose metadata commit did not (a crash or
  // a failed flush in between): the disk has part of this cache's own data, nothing of another's.
  // The epoch tells it from an older copy of the same cache (a backup put back): that one is stale.
  if (
    seen !== null &&
    seen < record.generation &&
    record.writer === self.uuid &&
    record.owner?.uuid === self.uuid &&
    record.writerEpoch === self.flushEpoch + 1
  ) {
    return { generation: record.generation, record };
  }
  // A cache from before disk records (seen null) is taken as it is while no flush has bumped the
  // record (the upgrade: the first attach writes the record); after one, only its writer is sure.
  if (seen === null ? record.writer === null : seen >= record.generation) {
    return { generation: Math.max(seen ?? 0, record.generation), record };
  }
  const since =
    seen === null
      ? `it was made before ulobdev kept disk records, and ${record.owner ? record.owner.cache : 'another cache'} has written the disk since`
      : `the disk was written through ${record.owner && record.owner.uuid !== self.uuid ? record.owner.cache : 'another cache'} since this cache last saw it (generation ${seen}, the disk is at ${record.generation})`;
  if (self.dirtyBytes > 0) {
    throw new DiskConflictError(
      `${self.cache} holds ${formatBytes(self.dirtyBytes)} of dirty data for ${self.description}, but ${since}: flushing it would overwrite newer data, so it is refused; ` +
        `copy what you need from it read-only elsewhere, then 'ulobdev discard --force -c ${self.cache} ${self.description}'; nothing was changed`,
    );
  }
  throw new StaleCacheError(
    `${self.cache} may hold stale blocks of ${self.description}: ${since}; it holds no dirty data, so 'ulobdev discard -c ${self.cache} ${self.description}' and attach again (it starts empty); nothing was changed`,
  );
}

/** The owner entry of `self` (absolute paths). */
export function ownerEntry(self: { cache: string; metadata: string; uuid: string; device?: string }, mayBeDirty: boolean, dirtyBytes: number): DiskOwner {
  const device = self.device === undefined || self.device.includes('://') ? self.device : absolute(self.device);
  return { cache: absolute(self.cache), metadata: absolute(self.metadata), uuid: self.uuid, mayBeDirty, dirtyBytes, ...(device !== undefined ? { device } : {}) };
}

function absolute(p: string): string {
  return isAbsolute(p) ? p : resolve(p);
}
