// newuser11 finding 1: a cache copied to a new SSD after a crash without its CACHE.meta-wal lost
// the dirty records only the WAL held, silently. The main metadata file now says "open, possibly
// with a WAL" while a daemon has it (journal_open, format 5); an open that finds the mark and no
// WAL is refused with one line and changes nothing. A crash image is taken deterministically: the
// cache's files copied while the store still has them open (what a kill -9 leaves on disk: every
// committed transaction is in the files, synchronous = FULL).
import { createHash, randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CacheEngine } from '../../src/cache/engine.js';
import { Metadata } from '../../src/cache/metadata.js';
import { CacheStore, type CachePaths } from '../../src/cache/store.js';
import { CorruptMetadataError, DiskChangedError } from '../../src/errors.js';
import { openBacking } from '../../src/source/backing.js';
import type { FileSource } from '../../src/source/file-source.js';

const BS = 4096;
const BLOCKS = 256;
/** Blocks written dirty before the crash image, each in its own transaction (autoCommitMs 0). */
const DIRTY = [3, 9, 20, 21, 22, 40, 77, 100, 101, 200, 255];

let dir: string;
let disk: string;
let oldSsd: CachePaths;
let newSsd: CachePaths;
let cleanups: (() => unknown)[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-meta-journal-'));
  disk = join(dir, 'disk.img');
  writeFileSync(disk, randomBytes(BLOCKS * BS));
  mkdirSync(join(dir, 'old'));
  mkdirSync(join(dir, 'new'));
  const at = (d: string): CachePaths => ({ cache: join(dir, d, 'c'), bitmap: join(dir, d, 'c.bitmap'), metadata: join(dir, d, 'c.meta') });
  oldSsd = at('old');
  newSsd = at('new');
});

afterEach(async () => {
  for (const undo of cleanups.reverse()) {
    try {
      await undo();
    } catch {
      // best effort
    }
  }
  cleanups = [];
  rmSync(dir, { recursive: true, force: true });
});

async function open(paths: CachePaths): Promise<{ store: CacheStore; source: FileSource }> {
  const source = (await openBacking(disk, { writable: true })) as FileSource;
  try {
    const store = await CacheStore.open({ paths, backing: source, mode: 'writeback', blockSize: BS });
    return { store, source };
  } catch (err) {
    await source.close();
    throw err;
  }
}

/** A write-back cache on the old SSD with DIRTY written after its open (the WAL holds them). */
async function dirtyCache(): Promise<{ engine: CacheEngine; source: FileSource; gone: () => Promise<void> }> {
  // Made and closed once, so the main file holds a cache (not a fresh one) with nothing dirty.
  const first = await open(oldSsd);
  await new CacheEngine(first.store, first.source, { autoCommitMs: 0 }).close();
  await first.source.close();
  const { store, source } = await open(oldSsd);
  const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
  cleanups.push(() => source.close());
  cleanups.push(() => engine.close());
  // Each one fsynced (FUA): acknowledged, so it must survive any crash.
  for (const b of DIRTY) await engine.write(b * BS, randomBytes(BS), { fua: true });
  // The old SSD is gone (its daemon with it): nothing of it is left to find.
  const gone = async () => {
    await engine.close().catch(() => undefined);
    await source.close();
    rmSync(join(dir, 'old'), { recursive: true, force: true });
  };
  return { engine, source, gone };
}

function copy(names: string[]): void {
  for (const n of names) copyFileSync(join(dir, 'old', n), join(dir, 'new', n));
}

function hashes(d: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const n of readdirSync(d).sort()) out[n] = createHash('sha256').update(readFileSync(join(d, n))).digest('hex');
  return out;
}

function dirtyBlocks(store: CacheStore): number[] {
  const out: number[] = [];
  for (let b = 0; b < BLOCKS; b++) if (store.dirty.get(b)) out.push(b);
  return out;
}

/** Opens `paths` expecting the one-line CorruptMetadataError a cache without its journal gets; its message. */
async function refusal(paths: CachePaths): Promise<string> {
  const err = await open(paths).then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(CorruptMetadataError);
  const msg = (err as Error).message;
  expect(msg).not.toMatch(/[\r\n]/);
  return msg;
}

describe('a cache copied after a crash (newuser11 finding 1)', () => {
  it('without its CACHE.meta-wal is refused in one line naming the missing file, and nothing changes', async () => {
    const { gone } = await dirtyCache();
    // The crash image: the daemon still has the files (the WAL is there, the main file marked open).
    expect(readdirSync(join(dir, 'old')).sort()).toEqual(['c', 'c.bitmap', 'c.meta', 'c.meta-reserve', 'c.meta-wal']);
    copy(['c', 'c.bitmap', 'c.meta']);
    await gone();
    const before = hashes(join(dir, 'new'));
    const msg = await refusal(newSsd);
    expect(msg).toContain(`${newSsd.metadata}-wal is missing`);
    expect(msg).toContain('copy');
    // Nothing changed, and no WAL was left behind by the look.
    expect(hashes(join(dir, 'new'))).toEqual(before);
    expect(existsSync(`${newSsd.metadata}-wal`)).toBe(false);
  });

  it('with its CACHE.meta-wal is accepted, every dirty block still dirty', async () => {
    const { gone } = await dirtyCache();
    copy(['c', 'c.bitmap', 'c.meta', 'c.meta-wal']);
    await gone();
    const { store, source } = await open(newSsd);
    cleanups.push(() => source.close());
    cleanups.push(() => store.close());
    expect(store.recoveredFromCrash).toBe(true);
    expect(dirtyBlocks(store)).toEqual(DIRTY);
  });

  it('opened by another SQLite program after the crash (its close moves the WAL in and removes it): refused with the touch hint, which then opens it with every dirty block', async () => {
    const { gone } = await dirtyCache();
    copy(['c', 'c.bitmap', 'c.meta', 'c.meta-wal']);
    await gone();
    // What `sqlite3 c.meta .tables` does: read, then, as the last connection, checkpoint and delete the WAL.
    const shell = new Database(newSsd.metadata);
    shell.prepare('SELECT count(*) FROM dirty').get();
    shell.close();
    expect(existsSync(`${newSsd.metadata}-wal`)).toBe(false);
    expect(await refusal(newSsd)).toContain(`'touch ${newSsd.metadata}-wal'`);
    // The hint, followed: the main file already holds every transaction.
    writeFileSync(`${newSsd.metadata}-wal`, '');
    const { store, source } = await open(newSsd);
    cleanups.push(() => source.close());
    cleanups.push(() => store.close());
    expect(store.recoveredFromCrash).toBe(true);
    expect(dirtyBlocks(store)).toEqual(DIRTY);
  });

  it('after a clean close the three files are the whole cache: accepted, every dirty block dirty, and the copy closes cleanly again', async () => {
    const { engine, source } = await dirtyCache();
    await engine.close();
    await source.close();
    expect(readdirSync(join(dir, 'old')).sort()).toEqual(['c', 'c.bitmap', 'c.meta', 'c.meta-reserve']);
    copy(['c', 'c.bitmap', 'c.meta']);
    rmSync(join(dir, 'old'), { recursive: true });
    const a = await open(newSsd);
    expect(a.store.recoveredFromCrash).toBe(false);
    expect(dirtyBlocks(a.store)).toEqual(DIRTY);
    await a.store.close();
    await a.source.close();
    // Its close cleared the mark again: the main file alone opens.
    const m = Metadata.open(newSsd.metadata);
    m.close();
  });

  it('a zero-length WAL (a crash right after a checkpoint with TRUNCATE) is a WAL: accepted; the same file without it refused', async () => {
    const first = await open(oldSsd);
    await first.store.close();
    await first.source.close();
    // A crash right after the attach's checkpoint: the main file marked open, the WAL empty.
    const db = new Database(oldSsd.metadata);
    db.exec('UPDATE cache_info SET journal_open = 1, clean_shutdown = 0');
    db.close();
    expect(() => Metadata.open(oldSsd.metadata)).toThrow(`${oldSsd.metadata}-wal is missing`);
    writeFileSync(`${oldSsd.metadata}-wal`, '');
    expect(statSync(`${oldSsd.metadata}-wal`).size).toBe(0);
    const { store, source } = await open(oldSsd);
    expect(store.recoveredFromCrash).toBe(true);
    await store.close();
    await source.close();
  });

  it('a cache of format 4 (no mark) opens as before and gets the mark at its attach', async () => {
    const first = await open(oldSsd);
    await first.store.close();
    await first.source.close();
    // Format 4 as session 10 wrote it, left by a crash (clean_shutdown 0) and copied without its WAL.
    const db = new Database(oldSsd.metadata);
    db.exec('ALTER TABLE cache_info DROP COLUMN journal_open; UPDATE cache_info SET format_version = 4, clean_shutdown = 0');
    db.pragma('user_version = 4');
    db.close();
    expect(existsSync(`${oldSsd.metadata}-wal`)).toBe(false);
    const m = Metadata.open(oldSsd.metadata);
    expect(m.journalMaybeMissing).toBe(true);
    m.close();
    const { store, source } = await open(oldSsd);
    expect(store.info.formatVersion).toBe(5);
    // The mark is in the main file now (checkpointed): a copy of it without the WAL is refused.
    copy(['c.meta']);
    expect(existsSync(`${newSsd.metadata}-wal`)).toBe(false);
    expect(() => Metadata.open(newSsd.metadata)).toThrow(`${newSsd.metadata}-wal is missing`);
    await store.close();
    await source.close();
  });

  it('a crashed cache of format 4 copied without its WAL, whose fingerprint is behind the disk, is refused naming the missing WAL, not "written without ulobdev"', async () => {
    const { engine, source } = await dirtyCache();
    await engine.close();
    await source.close();
    // Format 4, left by a crash after a flush the WAL recorded (the main file has the old fingerprint).
    const db = new Database(oldSsd.metadata);
    db.exec("ALTER TABLE cache_info DROP COLUMN journal_open; UPDATE cache_info SET format_version = 4, clean_shutdown = 0, disk_fingerprint = 'sha256:old'");
    db.pragma('user_version = 4');
    db.close();
    const src = (await openBacking(disk, { writable: true })) as FileSource;
    cleanups.push(() => src.close());
    const err = await CacheStore.open({ paths: oldSsd, backing: src, mode: 'writeback', fingerprint: () => Promise.resolve('sha256:new') }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(DiskChangedError);
    expect((err as Error).message).toContain(`its journal ${oldSsd.metadata}-wal is missing`);
    expect((err as Error).message).not.toMatch(/[\r\n]/);
  });

  it('a young cache of an older ulobdev (everything still in the WAL) copied without it names the missing WAL, not "format 0"', () => {
    writeFileSync(oldSsd.metadata, '');
    expect(() => Metadata.open(oldSsd.metadata)).toThrow(`${oldSsd.metadata} holds no metadata and its journal ${oldSsd.metadata}-wal is missing`);
  });
});
