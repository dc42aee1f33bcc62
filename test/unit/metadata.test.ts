// Cache metadata in SQLite (src/cache/metadata.ts) on real files: every field survives a close and
// reopen, the dirty table, the flush epoch, the clean-shutdown flag, the exclusive lock, and the
// durability settings of the connection.
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import fc from 'fast-check';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { CacheBusyError, CorruptMetadataError } from '../../src/errors.js';
import { DEFAULT_EVICTION_UNIT, FORMAT_VERSION, Metadata, type CacheIdentity } from '../../src/cache/metadata.js';
import type { Extent } from '../../src/cache/layout.js';

let dir: string;
let path: string;
const opened: Metadata[] = [];

const identity: CacheIdentity = {
  uuid: '8d0d5a0e-6f7c-4a43-9d55-6b1b1c8f0c11',
  blockSize: 8192,
  // 1000 blocks and a short last one.
  backingSize: 1000 * 8192 - 512,
  backingId: 'file:254:0:123456',
};
const BLOCKS = 1000;

/** The schema of format 1, as ulobdev 0.1 made it (docs/format.md before the budget). */
const FORMAT_1_SCHEMA = `
CREATE TABLE cache_info (
  id INTEGER PRIMARY KEY CHECK (id = 1), format_version INTEGER NOT NULL, uuid TEXT NOT NULL,
  block_size INTEGER NOT NULL, backing_size INTEGER NOT NULL, backing_id TEXT NOT NULL,
  mode TEXT NOT NULL CHECK (mode IN ('readonly', 'writeback')), state TEXT NOT NULL CHECK (state IN ('creating', 'ready')),
  clean_shutdown INTEGER NOT NULL, flush_epoch INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE dirty (start INTEGER NOT NULL CHECK (start >= 0), count INTEGER NOT NULL CHECK (count > 0));
CREATE TABLE flush_history (
  id INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, started_at INTEGER NOT NULL, ended_at INTEGER,
  bytes INTEGER NOT NULL DEFAULT 0, blocks INTEGER NOT NULL DEFAULT 0, spun_up INTEGER NOT NULL DEFAULT 0, error TEXT
);
CREATE TABLE dirty_samples (at INTEGER NOT NULL, dirty_bytes INTEGER NOT NULL);
CREATE TABLE events (at INTEGER NOT NULL, kind TEXT NOT NULL, detail TEXT);
`;

function create(mode: 'readonly' | 'writeback' = 'writeback'): Metadata {
  const m = Metadata.create(path, identity, mode);
  opened.push(m);
  return m;
}

function open(): Metadata {
  const m = Metadata.open(path);
  opened.push(m);
  return m;
}

/** The set of blocks covered by extents (rows may overlap). */
function blocksOf(extents: readonly Extent[]): number[] {
  const set = new Set<number>();
  for (const e of extents) for (let b = e.start; b < e.start + e.count; b++) set.add(b);
  return [...set].sort((a, b) => a - b);
}

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-metadata-'));
  path = join(dir, 'meta.db');
});

afterEach(() => {
  vi.restoreAllMocks();
  for (const m of opened.splice(0)) m.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('Metadata', () => {
  it('creates a cache record and reads every field back after a reopen', () => {
    const before = Date.now();
    const m = create('readonly');
    expect(m.info).toEqual({
      formatVersion: FORMAT_VERSION,
      ...identity,
      mode: 'readonly',
      state: 'creating',
      // docs/format.md: 1 at creation (a new cache did not crash), 0 while attached.
      cleanShutdown: true,
      flushEpoch: 0,
      createdAt: expect.any(Number),
      budget: null,
      evictionUnit: DEFAULT_EVICTION_UNIT,
      diskGeneration: null,
      bitmapPath: null,
      diskFingerprint: null,
    });
    expect(m.info.createdAt).toBeGreaterThanOrEqual(before);
    expect(m.info.createdAt).toBeLessThanOrEqual(Date.now());
    expect(m.dirtyExtents()).toEqual([]);
    const createdAt = m.info.createdAt;
    m.close();

    const r = open();
    expect(r.info).toEqual({
      formatVersion: FORMAT_VERSION,
      ...identity,
      mode: 'readonly',
      state: 'creating',
      cleanShutdown: true,
      flushEpoch: 0,
      createdAt,
      budget: null,
      evictionUnit: DEFAULT_EVICTION_UNIT,
      diskGeneration: null,
      bitmapPath: null,
      diskFingerprint: null,
    });
    r.setState('ready');
    r.setMode('writeback');
    r.setCleanShutdown(false);
    r.setCleanShutdown(true);
    r.replaceDirty([{ start: 3, count: 2 }], 7);
    r.setBudget(64 << 20, 1 << 20);
    r.setDiskState(4, '/flash/c.bitmap');
    r.replaceDirty([{ start: 3, count: 2 }], undefined, [], [], 5);
    r.setDiskFingerprint('sha256:00ff');
    // The in-memory copy follows every setter.
    expect(r.info).toMatchObject({ state: 'ready', mode: 'writeback', cleanShutdown: true, flushEpoch: 7, budget: 64 << 20, evictionUnit: 1 << 20, diskGeneration: 5, diskFingerprint: 'sha256:00ff' });
    r.close();

    const again = open();
    expect(again.info).toEqual({
      formatVersion: FORMAT_VERSION,
      ...identity,
      mode: 'writeback',
      state: 'ready',
      cleanShutdown: true,
      flushEpoch: 7,
      createdAt,
      budget: 64 << 20,
      evictionUnit: 1 << 20,
      diskGeneration: 5,
      bitmapPath: '/flash/c.bitmap',
      diskFingerprint: 'sha256:00ff',
    });
    expect(again.dirtyExtents()).toEqual([{ start: 3, count: 2 }]);
    // Cleared (unknown), durably: what a flush does before it writes the disk.
    again.setDiskFingerprint(null);
    expect(again.info.diskFingerprint).toBeNull();
    again.close();
    expect(open().info.diskFingerprint).toBeNull();
  });

  it('keeps zeroed rows: the dirty set is the union, whether a block is zeroed the last row naming it, also after replaceDirty', () => {
    const m = create();
    m.addDirty([{ start: 10, count: 10 }], true);
    m.addDirty([{ start: 12, count: 2 }]);
    m.addDirty([{ start: 30, count: 1 }]);
    m.addDirty([{ start: 13, count: 1 }], true);
    expect(m.dirtyRows()).toEqual([
      { start: 10, count: 10, zero: true },
      { start: 12, count: 2, zero: false },
      { start: 30, count: 1, zero: false },
      { start: 13, count: 1, zero: true },
    ]);
    m.replaceDirty([{ start: 12, count: 1 }], 1, [{ start: 10, count: 2 }]);
    m.close();
    expect(open().dirtyRows()).toEqual([
      { start: 12, count: 1, zero: false },
      { start: 10, count: 2, zero: true },
    ]);
  });

  it('saves and loads the eviction clock', () => {
    const m = create();
    expect(m.loadClock()).toBeNull();
    m.saveClock({ unitBytes: 1 << 18, hand: 5, counts: Buffer.from([0, 1, 2, 3]) });
    m.saveClock({ unitBytes: 1 << 18, hand: 6, counts: Buffer.from([3, 2, 1, 0]) });
    m.close();
    expect(open().loadClock()).toEqual({ unitBytes: 1 << 18, hand: 6, counts: Buffer.from([3, 2, 1, 0]) });
  });

  it('opens format 1 as it is and upgrades it in place: its dirty rows, epoch and history kept, no budget (a full mirror)', () => {
    const db = new Database(path);
    db.exec(FORMAT_1_SCHEMA);
    db.prepare(
      `INSERT INTO cache_info (id, format_version, uuid, block_size, backing_size, backing_id, mode, state, clean_shutdown, flush_epoch, created_at)
       VALUES (1, 1, ?, ?, ?, ?, 'writeback', 'ready', 1, 4, 1700000000000)`,
    ).run(identity.uuid, identity.blockSize, identity.backingSize, identity.backingId);
    db.prepare('INSERT INTO dirty (start, count) VALUES (?, ?)').run(5, 3);
    db.prepare('INSERT INTO flush_history (epoch, started_at, ended_at, bytes, blocks) VALUES (4, 1, 2, 8192, 1)').run();
    db.pragma('user_version = 1');
    db.close();

    const m = open();
    expect(m.info).toMatchObject({ formatVersion: 1, flushEpoch: 4, budget: null, evictionUnit: DEFAULT_EVICTION_UNIT });
    expect(m.needsUpgrade).toBe(true);
    expect(m.dirtyRows()).toEqual([{ start: 5, count: 3, zero: false }]);
    expect(m.loadClock()).toBeNull();
    m.upgrade();
    expect(m.info).toMatchObject({ formatVersion: FORMAT_VERSION, flushEpoch: 4, budget: null, diskGeneration: null, bitmapPath: null });
    expect(m.needsUpgrade).toBe(false);
    m.addDirty([{ start: 6, count: 1 }], true);
    expect(m.flushes(0)).toEqual([expect.objectContaining({ epoch: 4, bytes: 8192, reason: null })]);
    m.close();

    const again = open();
    expect(again.info.formatVersion).toBe(FORMAT_VERSION);
    expect(again.needsUpgrade).toBe(false);
    expect(again.dirtyRows()).toEqual([
      { start: 5, count: 3, zero: false },
      { start: 6, count: 1, zero: true },
    ]);
    again.close();
    const raw = new Database(path, { readonly: true });
    expect(raw.pragma('user_version', { simple: true })).toBe(FORMAT_VERSION);
    raw.close();
  });

  it('upgrades format 2 to 5: no disk generation yet (null, adopted at the next attach), no bitmap path, no fingerprint; a flush left running ends as interrupted', () => {
    const m = create('writeback');
    m.close();
    // Format 2 as session 7 wrote it: no disk_generation, no bitmap_path (nor format 4's disk_fingerprint).
    const db = new Database(path);
    db.exec(
      'ALTER TABLE cache_info DROP COLUMN journal_open; ALTER TABLE cache_info DROP COLUMN disk_fingerprint; ALTER TABLE cache_info DROP COLUMN disk_generation; ALTER TABLE cache_info DROP COLUMN bitmap_path; UPDATE cache_info SET format_version = 2',
    );
    db.pragma('user_version = 2');
    db.prepare('INSERT INTO flush_history (epoch, started_at) VALUES (1, 1000)').run();
    db.close();
    const r = open();
    expect(r.info).toMatchObject({ formatVersion: 2, diskGeneration: null, bitmapPath: null });
    r.upgrade();
    expect(r.info).toMatchObject({ formatVersion: 5, diskGeneration: null, bitmapPath: null, diskFingerprint: null });
    // F30: the flush a kill -9 cut stays "running" (ended_at NULL) until the next open ends it.
    expect(r.flushes(0)).toEqual([expect.objectContaining({ endedAt: null, error: null })]);
    expect(r.endInterruptedFlushes()).toBe(1);
    expect(r.flushes(0)).toEqual([expect.objectContaining({ endedAt: 1000, error: expect.stringMatching(/^interrupted/) })]);
    expect(r.endInterruptedFlushes()).toBe(0);
    r.setDiskState(2, '/flash/c.bitmap');
    r.close();
    expect(open().info).toMatchObject({ formatVersion: 5, diskGeneration: 2, bitmapPath: '/flash/c.bitmap' });
  });

  it('upgrades format 3 to 5 in place: its disk generation and bitmap path kept, the disk fingerprint unknown (null) until an attach takes it', () => {
    const m = create('writeback');
    m.setDiskState(6, '/flash/c.bitmap');
    m.close();
    // Format 3 as session 8 wrote it: no disk_fingerprint.
    const db = new Database(path);
    db.exec('ALTER TABLE cache_info DROP COLUMN journal_open; ALTER TABLE cache_info DROP COLUMN disk_fingerprint; UPDATE cache_info SET format_version = 3');
    db.pragma('user_version = 3');
    db.close();
    const r = open();
    expect(r.info).toMatchObject({ formatVersion: 3, diskGeneration: 6, bitmapPath: '/flash/c.bitmap', diskFingerprint: null });
    expect(r.needsUpgrade).toBe(true);
    r.upgrade();
    expect(r.info).toMatchObject({ formatVersion: 5, diskGeneration: 6, bitmapPath: '/flash/c.bitmap', diskFingerprint: null });
    r.setDiskFingerprint('sha256:01');
    r.close();
    const again = open();
    expect(again.info).toMatchObject({ formatVersion: 5, diskGeneration: 6, diskFingerprint: 'sha256:01' });
    again.close();
    const raw = new Database(path, { readonly: true });
    expect(raw.pragma('user_version', { simple: true })).toBe(5);
    raw.close();
  });

  it('refuses to create over an existing database', () => {
    create().close();
    expect(() => Metadata.create(path, identity, 'writeback')).toThrow(CorruptMetadataError);
    // The existing cache record is untouched.
    expect(open().info.uuid).toBe(identity.uuid);
  });

  it('stores dirty rows that may overlap; together they cover the union of what was added', () => {
    fc.assert(
      fc.property(
        fc.array(fc.array(fc.record({ start: fc.nat({ max: BLOCKS - 1 }), count: fc.integer({ min: 1, max: 40 }) }), { maxLength: 6 }), {
          maxLength: 5,
        }),
        (batches) => {
          rmSync(dir, { recursive: true, force: true });
          dir = mkdtempSync(join(tmpdir(), 'ulob-metadata-'));
          path = join(dir, 'meta.db');
          const m = create();
          const added: Extent[] = [];
          for (const batch of batches) {
            const clipped = batch.map((e) => ({ start: e.start, count: Math.min(e.count, BLOCKS - e.start) }));
            m.addDirty(clipped);
            added.push(...clipped);
            const rows = m.dirtyExtents();
            // Sorted by start, as the store's loader expects.
            for (let i = 1; i < rows.length; i++) expect(rows[i]!.start).toBeGreaterThanOrEqual(rows[i - 1]!.start);
            expect(blocksOf(rows)).toEqual(blocksOf(added));
          }
          m.close();
          // And durably so.
          const r = open();
          expect(blocksOf(r.dirtyExtents())).toEqual(blocksOf(added));
          r.close();
        },
      ),
      { numRuns: 40 },
    );
  });

  it('keeps overlapping and touching rows as a union', () => {
    const m = create();
    m.addDirty([
      { start: 10, count: 5 },
      { start: 12, count: 10 },
    ]);
    m.addDirty([{ start: 22, count: 1 }]);
    m.addDirty([]);
    expect(blocksOf(m.dirtyExtents())).toEqual(Array.from({ length: 13 }, (_, i) => 10 + i));
  });

  it('replaceDirty replaces the whole set and bumps the epoch only when asked, durably', () => {
    const m = create();
    m.addDirty([
      { start: 0, count: 10 },
      { start: 5, count: 10 },
    ]);
    m.replaceDirty([{ start: 2, count: 3 }]);
    expect(m.info.flushEpoch).toBe(0);
    expect(m.dirtyExtents()).toEqual([{ start: 2, count: 3 }]);
    m.replaceDirty([], 1);
    expect(m.info.flushEpoch).toBe(1);
    expect(m.dirtyExtents()).toEqual([]);
    m.replaceDirty(
      (function* () {
        yield { start: 100, count: 1 };
        yield { start: 200, count: 2 };
      })(),
      2,
    );
    m.close();
    const r = open();
    expect(r.info.flushEpoch).toBe(2);
    expect(r.dirtyExtents()).toEqual([
      { start: 100, count: 1 },
      { start: 200, count: 2 },
    ]);
  });

  it('persists the clean-shutdown flag both ways', () => {
    const m = create();
    expect(m.info.cleanShutdown).toBe(true);
    m.setCleanShutdown(false);
    m.close();
    const r = open();
    expect(r.info.cleanShutdown).toBe(false);
    r.setCleanShutdown(true);
    r.close();
    expect(open().info.cleanShutdown).toBe(true);
  });

  it('refuses a dirty row outside the disk', () => {
    const m = create();
    m.addDirty([{ start: BLOCKS - 1, count: 1 }]);
    expect(m.dirtyExtents()).toEqual([{ start: BLOCKS - 1, count: 1 }]);
    m.addDirty([{ start: BLOCKS - 1, count: 2 }]);
    expect(() => m.dirtyExtents()).toThrow(CorruptMetadataError);
    expect(() => m.dirtyExtents()).toThrow(`${path}: dirty extent ${BLOCKS - 1}+2 lies outside the disk`);
  });

  it('holds an exclusive lock: a second open is CacheBusyError until the first closes', () => {
    const m = create();
    let err: unknown;
    try {
      open();
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(CacheBusyError);
    expect((err as CacheBusyError).code).toBe('ULOB_E_CACHE_BUSY');
    expect((err as Error).message).toBe(`${path} is in use by another ulobdev process`);
    // The first connection is unaffected and still writes.
    m.addDirty([{ start: 1, count: 1 }]);
    m.setCleanShutdown(false);
    // So is any other connection: not even a reader gets in.
    const reader = new Database(path, { readonly: true, fileMustExist: true, timeout: 0 });
    try {
      expect(() => reader.prepare('SELECT count(*) FROM dirty').get()).toThrow(/locked|busy/i);
    } finally {
      reader.close();
    }
    m.close();
    const r = open();
    expect(r.dirtyExtents()).toEqual([{ start: 1, count: 1 }]);
    expect(r.info.cleanShutdown).toBe(false);
  });

  it('makes the metadata and its WAL 0600 whatever the umask (newuser12: a library user got 0644)', () => {
    const old = process.umask(0o022);
    try {
      const m = create();
      m.addEvent(Date.now(), 'test');
      expect(statSync(path).mode & 0o777).toBe(0o600);
      expect(statSync(`${path}-wal`).mode & 0o777).toBe(0o600);
      m.close();
    } finally {
      process.umask(old);
    }
  });

  it('runs the connection in WAL mode with synchronous = FULL and an exclusive lock', () => {
    // The connection is private to Metadata; catch it as it configures itself.
    const pragma = vi.spyOn(Database.prototype, 'pragma');
    const m = create();
    const connections = new Set(pragma.mock.contexts as Database.Database[]);
    expect(connections.size).toBe(1);
    const db = [...connections][0]!;
    expect(db.open).toBe(true);
    expect(db.pragma('journal_mode', { simple: true })).toBe('wal');
    expect(db.pragma('synchronous', { simple: true })).toBe(2);
    expect(db.pragma('locking_mode', { simple: true })).toBe('exclusive');
    m.close();
    pragma.mockClear();

    // The same on reopen.
    const r = open();
    const db2 = (pragma.mock.contexts as Database.Database[])[0]!;
    expect(db2).not.toBe(db);
    expect(db2.pragma('journal_mode', { simple: true })).toBe('wal');
    expect(db2.pragma('synchronous', { simple: true })).toBe(2);
    expect(db2.pragma('locking_mode', { simple: true })).toBe('exclusive');
    r.close();
    // WAL is also recorded in the file header (bytes 18 and 19 are 2 for WAL).
    const header = readFileSync(path).subarray(0, 20);
    expect(header.subarray(0, 16).toString('latin1')).toBe('SQLite format 3\0');
    expect([header[18], header[19]]).toEqual([2, 2]);
  });

  it('leaves no WAL or shared-memory file behind after a close', () => {
    const m = create();
    m.addDirty([{ start: 0, count: 1 }]);
    m.close();
    expect(readdirSync(dir)).toEqual(['meta.db']);
  });

  it('refuses metadata of another format or without its cache record', () => {
    create().close();
    const db = new Database(path);
    db.pragma('user_version = 99');
    db.close();
    expect(() => Metadata.open(path)).toThrow(CorruptMetadataError);
    expect(() => Metadata.open(path)).toThrow(`${path}: metadata format 99 is not a format this ulobdev reads (1 to ${FORMAT_VERSION}); a newer ulobdev made it`);

    const db2 = new Database(path);
    db2.pragma(`user_version = ${FORMAT_VERSION}`);
    db2.exec('DELETE FROM cache_info');
    db2.close();
    expect(() => Metadata.open(path)).toThrow(`${path}: metadata has no cache_info row`);

    writeFileSync(path, Buffer.alloc(8192, 0x5a));
    expect(() => Metadata.open(path)).toThrow(CorruptMetadataError);
    expect(() => Metadata.open(path)).toThrow(`${path} is not valid ulobdev metadata`);
  });
});
