// Two caches for one disk (newuser7 F4, F18): the disk record on the host and the disk generation
// in each cache's metadata, at the store's level with a file as the disk. The end-to-end repro on
// /dev/loopN with ext4 is test/integration/two-caches.test.ts.
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CacheEngine } from '../../src/cache/engine.js';
import { DiskRecords, checkDiskRecord } from '../../src/cache/disk-record.js';
import { CacheStore, type CachePaths } from '../../src/cache/store.js';
import { DirtyDataError, DiskConflictError, ForeignCacheError, StaleCacheError } from '../../src/errors.js';
import { openBacking } from '../../src/source/backing.js';
import type { FileSource } from '../../src/source/file-source.js';
import { flushDirty } from '../../src/writeback/flusher.js';

const BS = 4096;
const SIZE = 64 * BS;

let dir: string;
let disk: string;
let records: DiskRecords;
/** The disk's identity (the file's), what its record is keyed by. */
let diskId: string;
let cleanups: (() => unknown)[] = [];

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-disk-record-'));
  disk = join(dir, 'disk.img');
  writeFileSync(disk, randomBytes(SIZE));
  records = new DiskRecords(join(dir, 'state'));
  const source = await openBacking(disk, { writable: false });
  diskId = source.id;
  await source.close();
});

afterEach(async () => {
  for (const undo of cleanups.reverse()) await Promise.resolve(undo()).catch(() => undefined);
  cleanups = [];
  rmSync(dir, { recursive: true, force: true });
});

function pathsOf(name: string): CachePaths {
  mkdirSync(join(dir, name), { recursive: true });
  return { cache: join(dir, name, 'c.cache'), bitmap: join(dir, name, 'c.bitmap'), metadata: join(dir, name, 'c.cache.meta') };
}

/** A write-back cache `name` of another disk of the same size (other.img), used by `use` and closed. */
async function otherDiskCache(name: string, use: (engine: CacheEngine) => Promise<void>): Promise<CachePaths> {
  const other = join(dir, 'other.img');
  writeFileSync(other, randomBytes(SIZE));
  const source = await openBacking(other, { writable: false });
  const paths = pathsOf(name);
  const engine = new CacheEngine(await CacheStore.open({ paths, backing: source, mode: 'writeback', blockSize: BS, records }), source, { autoCommitMs: 0 });
  await use(engine);
  await engine.close();
  await source.close();
  return paths;
}

interface Open {
  store: CacheStore;
  engine: CacheEngine;
  source: FileSource;
  /** Closes cleanly (the daemon's detach). */
  close(): Promise<void>;
  /** Drops everything as kill -9 would: no syncs, no clean flag, the record as it is. */
  crash(): Promise<void>;
}

/** Opens `paths` for the disk as the daemon does, with the records unless `noRecords` (a cache made before they existed). */
async function attach(paths: CachePaths, options: { mode?: 'readonly' | 'writeback'; noRecords?: boolean; id?: string; description?: string } = {}): Promise<Open> {
  const mode = options.mode ?? 'writeback';
  const source = await openBacking(disk, { writable: mode === 'writeback' });
  const backing = options.id ? { size: source.size, id: options.id, description: options.description ?? disk } : source;
  let store: CacheStore;
  try {
    store = await CacheStore.open({ paths, backing, mode, blockSize: BS, records: options.noRecords ? undefined : records });
  } catch (err) {
    await source.close();
    throw err;
  }
  const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
  let done = false;
  cleanups.push(async () => {
    if (!done) await engine.close();
    await source.close();
  });
  return {
    store,
    engine,
    source,
    close: async () => {
      done = true;
      await engine.close();
    },
    crash: async () => {
      done = true;
      await store.abandon();
    },
  };
}

async function refused(paths: CachePaths, options: Parameters<typeof attach>[1] = {}): Promise<Error> {
  const before = existsSync(paths.metadata);
  const id = options.id ?? diskId;
  const record = JSON.stringify(records.read(id));
  const err = await attach(paths, options).then(
    () => new Error('attached'),
    (e: Error) => e,
  );
  // Invariant 6: a refused attach changes nothing: no cache made, the record as it was.
  expect(existsSync(paths.metadata)).toBe(before);
  expect(JSON.stringify(records.read(id))).toBe(record);
  return err;
}

describe('disk records: one disk, two caches', () => {
  it('F4: a second cache (new, or existing and clean) is refused while the first holds dirty data; flushed, the first frees the disk, and the second, written past, is refused as stale', async () => {
    const a = pathsOf('a');
    const b = pathsOf('b');
    // B exists first, clean, at generation 0 (the user's b.cache of an earlier day).
    const b0 = await attach(b);
    await b0.engine.read(0, 8 * BS);
    await b0.close();
    // A takes the disk and keeps 3 blocks dirty across its detach.
    const a1 = await attach(a);
    for (const block of [2, 3, 10]) await a1.engine.write(block * BS, randomBytes(BS));
    await a1.close();
    expect(records.read(diskId)).toMatchObject({ generation: 0, owner: { cache: a.cache, mayBeDirty: true, dirtyBytes: 3 * BS } });

    const c = pathsOf('c');
    for (const [paths, mode] of [[c, 'writeback'], [c, 'readonly'], [b, 'writeback'], [b, 'readonly']] as const) {
      const err = await refused(paths, { mode });
      expect(err).toBeInstanceOf(DiskConflictError);
      expect(err.message).toContain(`${disk} has 12 KiB of dirty data in ${a.cache}`);
      expect(err.message).toContain(`attach ${disk} with -c ${a.cache} and flush it`);
      expect(err.message).toContain(`'ulobdev discard --force -c ${a.cache} ${disk}'`);
    }

    // A flushes: the disk's generation goes to 1 before the disk is written, A's metadata follows.
    const a2 = await attach(a);
    const written = await a2.engine.read(2 * BS, BS);
    expect((await flushDirty(a2.engine)).cleaned).toBe(3);
    expect(readFileSync(disk).subarray(2 * BS, 3 * BS).equals(written)).toBe(true);
    expect(a2.store.info.diskGeneration).toBe(1);
    await a2.close();
    expect(records.read(diskId)).toMatchObject({ generation: 1, writer: a2.store.info.uuid, owner: { cache: a.cache, mayBeDirty: false, dirtyBytes: 0 } });

    // B saw generation 0: block 2 in it is the old one. Refused, read-only too; a new cache is fine.
    for (const mode of ['writeback', 'readonly'] as const) {
      const err = await refused(b, { mode });
      expect(err).toBeInstanceOf(StaleCacheError);
      expect(err.message).toBe(
        `${b.cache} may hold stale blocks of ${disk}: the disk was written through ${a.cache} since this cache last saw it (generation 0, the disk is at 1); it holds no dirty data, so 'ulobdev discard -c ${b.cache} ${disk}' and attach again (it starts empty); nothing was changed`,
      );
    }
    const c1 = await attach(c);
    expect(c1.store.info.diskGeneration).toBe(1);
    await c1.close();
    // The refusal's way out: discard B, and it attaches again, empty.
    await CacheStore.discard(b, { backing: disk, backingId: diskId, records });
    const b1 = await attach(b);
    expect(b1.store.present.count()).toBe(0);
    await b1.close();
  });

  it('a stale cache that holds dirty data is refused as a conflict and never flushed', async () => {
    const a = pathsOf('a');
    const b = pathsOf('b');
    const b0 = await attach(b);
    await b0.engine.write(5 * BS, randomBytes(BS));
    // B keeps its dirty block, but the record no longer names it: another cache took the disk
    // after B was discarded from the record by hand (the file kept), or B predates... here: B's
    // record entry dropped as a missing cache (--force) while its flash was away.
    await b0.close();
    renameSync(join(dir, 'b'), join(dir, 'b-away'));
    await CacheStore.discard(b, { force: true, backing: disk, backingId: b0.source.id, records });
    const a1 = await attach(a);
    await a1.engine.write(6 * BS, randomBytes(BS));
    await flushDirty(a1.engine);
    await a1.close();
    renameSync(join(dir, 'b-away'), join(dir, 'b'));
    const before = readFileSync(disk);
    const err = await refused(b);
    expect(err).toBeInstanceOf(DiskConflictError);
    expect(err.message).toMatch(new RegExp(`^${b.cache} holds 4 KiB of dirty data for ${disk}, but the disk was written through ${a.cache} since this cache last saw it \\(generation 0, the disk is at 1\\): flushing it would overwrite newer data, so it is refused`));
    expect(readFileSync(disk).equals(before)).toBe(true);
  });

  it('kill -9 between the record write and the flush commit: the same cache is taken back (its own flush), its dirty blocks flushed again; another cache of the old generation is stale', async () => {
    const a = pathsOf('a');
    const b = pathsOf('b');
    const b0 = await attach(b);
    await b0.engine.read(0, 4 * BS);
    await b0.close();
    const a1 = await attach(a);
    const data = randomBytes(BS);
    await a1.engine.write(1 * BS, data);
    // beginEpoch writes the record (generation 1, writer A) before any block reaches the disk.
    a1.store.history.flushStarted(1, 1000, 'manual');
    await a1.engine.beginEpoch();
    expect(records.read(diskId)).toMatchObject({ generation: 1, writer: a1.store.info.uuid });
    await a1.crash();
    const a2 = await attach(a);
    expect(a2.store.recoveredFromCrash).toBe(true);
    expect(a2.store.info.diskGeneration).toBe(1);
    expect(a2.store.dirty.count()).toBe(1);
    // F30: the flush the kill cut is no longer "running" in the history.
    expect(a2.store.history.flushes(0)).toEqual([expect.objectContaining({ endedAt: 1000, error: expect.stringMatching(/^interrupted: the daemon stopped during this flush/) })]);
    await flushDirty(a2.engine);
    expect(a2.store.info.diskGeneration).toBe(2);
    await a2.close();
    expect(readFileSync(disk).subarray(BS, 2 * BS).equals(data)).toBe(true);
    expect(await refused(b)).toBeInstanceOf(StaleCacheError);
  });

  it('an older copy of the same cache put back (a backup) after its flushes is not taken for its own cut flush: refused, never flushed', async () => {
    const a = pathsOf('a');
    const a1 = await attach(a);
    await a1.engine.write(0, randomBytes(BS));
    await a1.close();
    cpSync(join(dir, 'a'), join(dir, 'a-backup'), { recursive: true });
    // The cache goes on: one flush commits (generation 1), the next one is cut by a kill.
    const a2 = await attach(a);
    await flushDirty(a2.engine);
    await a2.engine.write(BS, randomBytes(BS));
    await a2.engine.beginEpoch();
    await a2.crash();
    expect(records.read(diskId)).toMatchObject({ generation: 2, writer: a2.store.info.uuid, writerEpoch: 2 });
    rmSync(join(dir, 'a'), { recursive: true });
    renameSync(join(dir, 'a-backup'), join(dir, 'a'));
    const before = readFileSync(disk);
    const err = await refused(a);
    expect(err).toBeInstanceOf(DiskConflictError);
    expect(err.message).toMatch(/holds 4 KiB of dirty data .* since this cache last saw it \(generation 0, the disk is at 2\): flushing it would overwrite newer data/);
    expect(readFileSync(disk).equals(before)).toBe(true);
  });

  it('upgrade: a cache from before disk records (no generation) is adopted when the disk has no record; once another cache flushed, it is stale', async () => {
    const a = pathsOf('a');
    const b = pathsOf('b');
    for (const p of [a, b]) {
      const o = await attach(p, { noRecords: true });
      await o.engine.read(0, 4 * BS);
      await o.close();
      expect(o.store.info.diskGeneration).toBeNull();
    }
    expect(records.read(diskId)).toBeNull();
    const a1 = await attach(a);
    expect(a1.store.info.diskGeneration).toBe(0);
    expect(records.read(diskId)).toMatchObject({ generation: 0, writer: null, owner: { cache: a.cache } });
    await a1.close();
    // No flush yet through the record: B (no generation either) is taken as it is.
    const b1 = await attach(b, { mode: 'readonly' });
    await b1.close();
    const a2 = await attach(a);
    await a2.engine.write(0, randomBytes(BS));
    await flushDirty(a2.engine);
    await a2.close();
    // A format-2 cache (disk_generation NULL) of the same disk: stale once A has flushed.
    const c = pathsOf('c');
    const c0 = await attach(c, { noRecords: true });
    await c0.close();
    const err = await refused(c);
    expect(err).toBeInstanceOf(StaleCacheError);
    expect(err.message).toContain(`it was made before ulobdev kept disk records, and ${a.cache} has written the disk since`);
  });

  it('a record naming a cache that is not there: refused while it held dirty data (flash unmounted?), until discard --force forgets it; a clean one is no obstacle', async () => {
    const a = pathsOf('a');
    const b = pathsOf('b');
    const a1 = await attach(a);
    await a1.engine.write(0, randomBytes(2 * BS));
    await a1.close();
    const id = a1.source.id;
    renameSync(join(dir, 'a'), join(dir, 'a-unmounted'));
    const err = await refused(b);
    expect(err).toBeInstanceOf(DiskConflictError);
    expect(err.message).toContain(`${disk} has 8 KiB (at its last detach) of dirty data in ${a.cache}, which is not there now (flash not mounted?)`);
    expect(err.message).toContain(`if it is gone for good, 'ulobdev discard --force -c ${a.cache} ${disk}' forgets it`);
    // discard without --force says the same; with it, the record forgets A.
    await expect(CacheStore.discard(a, { backing: disk, backingId: id, records })).rejects.toThrow(DirtyDataError);
    await CacheStore.discard(a, { force: true, backing: disk, backingId: id, records });
    expect(records.read(diskId)?.owner).toBeNull();
    const b1 = await attach(b);
    await b1.close();
    // A missing clean owner: nothing to refuse for.
    rmSync(join(dir, 'b'), { recursive: true });
    const c1 = await attach(pathsOf('c'));
    await c1.close();
  });

  it('discard of the owning cache frees the disk; discard of a cache made for another disk is refused and removes nothing (F18); a -b bitmap elsewhere goes with its cache', async () => {
    const a = { ...pathsOf('a'), bitmap: join(dir, 'elsewhere.bitmap') };
    const a1 = await attach(a);
    await a1.engine.write(0, randomBytes(BS));
    await a1.close();
    const other = join(dir, 'other.img');
    writeFileSync(other, randomBytes(SIZE));
    const otherSource = await openBacking(other, { writable: false });
    const otherId = otherSource.id;
    await otherSource.close();
    const err = await CacheStore.discard(a, { force: true, backing: other, backingId: otherId, records }).catch((e: Error) => e);
    expect(err).toBeInstanceOf(ForeignCacheError);
    expect((err as Error).message).toBe(
      `${a.cache} is the cache of another disk (${a1.source.id}), not of ${other} (${otherId}); discard removes nothing: name the disk it was made for`,
    );
    expect(existsSync(a.metadata) && existsSync(a.bitmap)).toBe(true);
    // Named with its default bitmap path (no -b): the recorded one goes too.
    const result = await CacheStore.discard({ ...a, bitmap: `${a.cache}.bitmap` }, { force: true, backing: disk, backingId: a1.source.id, records });
    expect(result).toMatchObject({ dirtyBlocks: 1, bitmap: a.bitmap });
    expect(existsSync(a.bitmap) || existsSync(a.metadata) || existsSync(a.cache)).toBe(false);
    expect(records.read(diskId)).toMatchObject({ owner: null });
    const b1 = await attach(pathsOf('b'));
    await b1.close();
  });

  it('newuser8 F2: discard --force removes only the cache\'s own bitmap, never a -b naming another cache\'s, and says which it left alone and why', async () => {
    const a = pathsOf('a');
    const a1 = await attach(a);
    await a1.engine.write(0, randomBytes(BS));
    await a1.close();
    // B: another cache (of another disk) whose bitmap the typo names.
    const b = await otherDiskCache('b', (engine) => engine.write(0, randomBytes(BS)));
    const bBitmap = readFileSync(b.bitmap);
    // An attach of A with a -b of the wrong size: the advice names A's own bitmap before any discard.
    const stray = join(dir, 'stray.bitmap');
    writeFileSync(stray, Buffer.alloc(100, 7));
    const wrong = await refused({ ...a, bitmap: stray });
    expect(wrong.message).toContain(`this cache was last attached with -b ${a.bitmap}, which is still there: give that one (is ${stray} the bitmap of another cache?)`);
    // With its own bitmap gone (moved?), the size check names it and asks about the -b given.
    renameSync(a.bitmap, `${a.bitmap}.away`);
    const gone = await refused({ ...a, bitmap: stray });
    expect(gone.message).toContain(`is 100 bytes, not the`);
    expect(gone.message).toContain(`this cache was last attached with -b ${a.bitmap}, which is not there now (moved?); is ${stray} the bitmap of another cache?`);
    renameSync(`${a.bitmap}.away`, a.bitmap);
    // The typo names B's bitmap (the same size as A's: both disks are SIZE): left alone.
    const result = await CacheStore.discard({ ...a, bitmap: b.bitmap }, { force: true, backing: disk, backingId: diskId, records });
    expect(result).toEqual({ dirtyBlocks: 1, bitmap: a.bitmap, keptBitmap: `left ${b.bitmap} alone: it is not this cache's bitmap, which is ${a.bitmap} (is -b another cache's?)` });
    expect(existsSync(a.bitmap) || existsSync(a.metadata) || existsSync(a.cache)).toBe(false);
    expect(readFileSync(b.bitmap).equals(bBitmap)).toBe(true);
    // A cache whose metadata records no bitmap (from before bitmap_path): the given -b goes only at exactly its bitmap size.
    const c = pathsOf('c');
    const c1 = await attach(c);
    await c1.close();
    const db = new Database(c.metadata);
    db.exec('UPDATE cache_info SET bitmap_path = NULL');
    db.close();
    const r2 = await CacheStore.discard({ ...c, bitmap: stray }, { force: true, backing: disk, backingId: diskId, records });
    expect(r2.keptBitmap).toMatch(new RegExp(`^left ${stray} alone: it is 100 bytes, not this cache's bitmap of \\d+ bytes$`));
    expect(existsSync(stray) && existsSync(c.bitmap)).toBe(true);
    expect(existsSync(c.metadata)).toBe(false);
  });

  it('an attach with -b naming another cache\'s bitmap of the same size is refused while its own is there (its bits would serve wrong blocks)', async () => {
    const a = pathsOf('a');
    const a1 = await attach(a);
    await a1.engine.write(0, randomBytes(BS));
    await a1.close();
    // B: a cache of another disk of the same size, so its bitmap is A's size.
    const b = await otherDiskCache('b', (engine) => engine.read(0, SIZE).then(() => undefined));
    const aMeta = readFileSync(a.metadata);
    const bBitmap = readFileSync(b.bitmap);
    const wrong = await refused({ ...a, bitmap: b.bitmap });
    expect(wrong.message).toContain(`this cache was last attached with -b ${a.bitmap}, which is still there: give that one (is ${b.bitmap} the bitmap of another cache?)`);
    expect(readFileSync(b.bitmap).equals(bBitmap)).toBe(true);
    expect(readFileSync(a.metadata).equals(aMeta)).toBe(true);
    // Moved on purpose: nothing left at the recorded path, the new one is taken (and recorded).
    const moved = join(dir, 'a-moved.bitmap');
    renameSync(a.bitmap, moved);
    const a2 = await attach({ ...a, bitmap: moved });
    await a2.close();
  });

  it('partitions: a dirty cache of the whole disk refuses a cache of a partition and the other way round; a flush through one makes the other stale', async () => {
    const whole = 'wwid:test-disk';
    const part = `${whole}:part1@2048`;
    const w = pathsOf('w');
    const p = pathsOf('p');
    const p0 = await attach(p, { id: part });
    await p0.engine.read(0, 4 * BS);
    await p0.close();
    const w1 = await attach(w, { id: whole });
    await w1.engine.write(0, randomBytes(BS));
    await w1.close();
    const err = await refused(p, { id: part });
    expect(err).toBeInstanceOf(DiskConflictError);
    expect(err.message).toContain(`in ${w.cache} (the cache of its whole disk)`);
    const w2 = await attach(w, { id: whole });
    await flushDirty(w2.engine);
    await w2.close();
    expect(await refused(p, { id: part })).toBeInstanceOf(StaleCacheError);
    // And a dirty partition cache refuses the whole disk's.
    const q = pathsOf('q');
    const q1 = await attach(q, { id: `${whole}:part2@4096`, description: '/dev/fake0p2' });
    await q1.engine.write(0, randomBytes(BS));
    await q1.close();
    const err2 = await refused(w, { id: whole, description: '/dev/fake0' });
    expect(err2.message).toContain(`/dev/fake0 has 4 KiB of dirty data in ${q.cache} (the cache of one of its partitions)`);
    // newuser8 item 4: both ways out name the disk that cache belongs to, the partition, not /dev/fake0.
    expect(err2.message).toContain(`attach /dev/fake0p2 with -c ${q.cache} and flush it, or 'ulobdev discard --force -c ${q.cache} /dev/fake0p2' to lose that data`);
  });

  it('newuser8 F1: an image file and a loop device over it are one disk to the records (offset 0, partitions too) or related (another offset), both ways', async () => {
    // The backing ids the loop driver gives (src/source/backing.ts): unchanged, only the records' keys relate them.
    const loop0 = `loop:${diskId}@0`;
    const loopPart = `${loop0}:part1@2048`;
    const loopOff = `loop:${diskId}@1048576`;
    const f = pathsOf('f');
    const l = pathsOf('l');
    // A clean cache of the file, from before.
    const f0 = pathsOf('f0');
    const f01 = await attach(f0);
    await f01.close();
    // The loop device's partition (/dev/loop0p1) holds dirty data: the file itself is refused.
    const p1 = await attach(l, { id: loopPart });
    await p1.engine.write(0, randomBytes(BS));
    await p1.close();
    const err = await refused(f);
    expect(err).toBeInstanceOf(DiskConflictError);
    expect(err.message).toContain(`in ${l.cache} (the cache of one of its partitions)`);
    // Flushed through the partition, the file's record moved on with it: the file's cache made
    // before is stale.
    const p2 = await attach(l, { id: loopPart });
    await flushDirty(p2.engine);
    await p2.close();
    expect(await refused(f0)).toBeInstanceOf(StaleCacheError);
    // The other direction: the file's cache dirty, a loop device at offset 0 over it refused.
    const f1 = await attach(f);
    await f1.engine.write(0, randomBytes(BS));
    await f1.close();
    const err2 = await refused(pathsOf('l0'), { id: loop0 });
    expect(err2).toBeInstanceOf(DiskConflictError);
    expect(err2.message).toContain(`in ${f.cache} that a new cache`);
    expect(await refused(pathsOf('l1'), { id: loopPart })).toBeInstanceOf(DiskConflictError);
    // A loop device at another offset shares blocks with the file: refused too, and the other way round.
    const err3 = await refused(pathsOf('lo'), { id: loopOff });
    expect(err3.message).toContain(`in ${f.cache} (the cache of the same image file at another offset, which shares its blocks)`);
    const f2 = await attach(f);
    await flushDirty(f2.engine);
    await f2.close();
    const o = pathsOf('o');
    const o1 = await attach(o, { id: loopOff });
    await o1.engine.write(0, randomBytes(BS));
    await o1.close();
    expect(await refused(pathsOf('f3'))).toBeInstanceOf(DiskConflictError);
    // Its flush bumps the file's record: the file's cache is stale after it.
    const o2 = await attach(o, { id: loopOff });
    await flushDirty(o2.engine);
    await o2.close();
    expect(await refused(f)).toBeInstanceOf(StaleCacheError);
  });

  it('a cache made again at the path of the owner (the record not told of the discard) is the cache of that path now, not a conflict', async () => {
    const a = pathsOf('a');
    const a1 = await attach(a);
    await a1.engine.write(0, randomBytes(BS));
    await a1.close();
    // Discarded with another state directory: this one still names the old cache as dirty.
    await CacheStore.discard(a, { force: true, backing: disk, backingId: diskId, records: new DiskRecords(join(dir, 'other-state')) });
    expect(records.read(diskId)?.owner).toMatchObject({ metadata: a.metadata, mayBeDirty: true });
    const a2 = await attach(a);
    expect(a2.store.info.uuid).not.toBe(a1.store.info.uuid);
    await a2.close();
    expect(records.read(diskId)?.owner).toMatchObject({ uuid: a2.store.info.uuid, mayBeDirty: false });
  });

  it('a record that is not one is refused with what to do', () => {
    mkdirSync(records.dir, { recursive: true });
    writeFileSync(records.pathOf('x'), '{"version": 1, "disk": "y"}');
    expect(() => checkDiskRecord(records, 'x', { uuid: 'u', cache: '/c', metadata: '/c.meta', diskGeneration: 0, created: false, dirtyBytes: 0, flushEpoch: 0, description: 'd' })).toThrow(
      `${records.pathOf('x')} is not a valid ulobdev disk record for x; if no cache of this disk holds dirty data, remove it (the next attach writes a new one)`,
    );
  });
});
