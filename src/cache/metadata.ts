// Cache metadata in SQLite: identity, mode, clean-shutdown flag, flush epoch, the cache budget, the
// dirty set as block extents (zeroed blocks among them), the eviction clock, and the history
// tables. WAL with synchronous=FULL: every transaction that returns is durable, which is what the
// dirty set needs (docs/design.md, "Durability rules"). docs/format.md describes every column.
import { closeSync, constants as fsConstants, existsSync, openSync, rmSync } from 'node:fs';
import { resolve } from 'node:path';
import Database from 'better-sqlite3';
import { fdatasync } from '../native/io.js';
import { CacheBusyError, CorruptMetadataError, ioError, MetadataFullError } from '../errors.js';
import type { Extent } from './layout.js';

export const FORMAT_VERSION = 5;
/** Oldest format open() upgrades in place (upgrade()); anything else is refused. */
export const OLDEST_FORMAT = 1;

export type CacheMode = 'readonly' | 'writeback';

export interface CacheIdentity {
  uuid: string;
  blockSize: number;
  backingSize: number;
  /** Stable id of the backing disk: WWN or serial for disks, device+inode for files. */
  backingId: string;
}

export interface CacheInfo extends CacheIdentity {
  /** The format of the file as opened: below FORMAT_VERSION until upgrade(). */
  formatVersion: number;
  mode: CacheMode;
  /** 'creating' until the cache and bitmap files are allocated: a crash before that re-creates. */
  state: 'creating' | 'ready';
  cleanShutdown: boolean;
  flushEpoch: number;
  createdAt: number;
  /** Bytes of the cache file's space the cache may use, or null: a full, preallocated mirror. */
  budget: number | null;
  /** Bytes of an eviction unit (the granule of fills, eviction and the clock). */
  evictionUnit: number;
  /**
   * The disk's flush generation this cache last saw or wrote (its disk record, docs/format.md
   * "Disk records"), or null: made before disk records existed (format 2 and older) and not
   * attached since.
   */
  diskGeneration: number | null;
  /** The bitmap path of the last attach (absolute), or null (format 2 and older): what discard removes. */
  bitmapPath: string | null;
  /**
   * The fingerprint of the disk's regions every filesystem rewrites when mounted (src/cache/fingerprint.ts)
   * as this cache last left the disk: taken at attach and at the end of each flush that wrote it,
   * cleared before a flush writes it. Null: unknown (a flush was cut, format 3 and older, or an HTTP image).
   */
  diskFingerprint: string | null;
}

/** One row of the dirty table: an extent, and whether it was zeroed (see docs/format.md). */
export interface DirtyRow extends Extent {
  zero: boolean;
}

/** The eviction clock as saved at close: its hand and a use count per unit. */
export interface ClockState {
  unitBytes: number;
  hand: number;
  counts: Buffer;
}

/** Eviction unit of caches made by format 1, which had none (and of new caches by default). */
export const DEFAULT_EVICTION_UNIT = 256 * 1024;

const SCHEMA = `
CREATE TABLE cache_info (
  id             INTEGER PRIMARY KEY CHECK (id = 1),
  format_version INTEGER NOT NULL,
  uuid           TEXT    NOT NULL,
  block_size     INTEGER NOT NULL,
  backing_size   INTEGER NOT NULL,
  backing_id     TEXT    NOT NULL,
  mode           TEXT    NOT NULL CHECK (mode IN ('readonly', 'writeback')),
  state          TEXT    NOT NULL CHECK (state IN ('creating', 'ready')),
  clean_shutdown INTEGER NOT NULL,
  flush_epoch    INTEGER NOT NULL,
  created_at     INTEGER NOT NULL,
  budget         INTEGER CHECK (budget IS NULL OR budget > 0),
  eviction_unit  INTEGER NOT NULL,
  disk_generation INTEGER CHECK (disk_generation IS NULL OR disk_generation >= 0),
  bitmap_path    TEXT,
  disk_fingerprint TEXT,
  journal_open   INTEGER NOT NULL DEFAULT 0 CHECK (journal_open IN (0, 1))
);
-- Dirty blocks as extents. Rows may overlap or touch until the next rewrite compacts them. The
-- dirty set is their union; a row with zero = 1 says its blocks read as zeros (the cache file does
-- not hold them), zero = 0 that the cache file holds them; later rows (by rowid) win.
CREATE TABLE dirty (
  start INTEGER NOT NULL CHECK (start >= 0),
  count INTEGER NOT NULL CHECK (count > 0),
  zero  INTEGER NOT NULL DEFAULT 0 CHECK (zero IN (0, 1))
);
-- The eviction clock as of the last clean close: hand (a unit) and a use count (one byte) per unit.
CREATE TABLE clock (
  id     INTEGER PRIMARY KEY CHECK (id = 1),
  unit   INTEGER NOT NULL,
  hand   INTEGER NOT NULL,
  counts BLOB    NOT NULL
);
CREATE TABLE flush_history (
  id          INTEGER PRIMARY KEY,
  epoch       INTEGER NOT NULL,
  started_at  INTEGER NOT NULL,
  ended_at    INTEGER,
  bytes       INTEGER NOT NULL DEFAULT 0,
  blocks      INTEGER NOT NULL DEFAULT 0,
  spun_up     INTEGER NOT NULL DEFAULT 0,
  error       TEXT,
  reason      TEXT
);
CREATE TABLE dirty_samples (
  at          INTEGER NOT NULL,
  dirty_bytes INTEGER NOT NULL
);
CREATE TABLE events (
  at     INTEGER NOT NULL,
  kind   TEXT    NOT NULL,
  detail TEXT
);
`;

/** Format 1 to 2: the budget (none), the eviction unit, zeroed rows, the clock. */
const UPGRADE_1_TO_2 = `
ALTER TABLE cache_info ADD COLUMN budget INTEGER CHECK (budget IS NULL OR budget > 0);
ALTER TABLE cache_info ADD COLUMN eviction_unit INTEGER NOT NULL DEFAULT ${DEFAULT_EVICTION_UNIT};
ALTER TABLE dirty ADD COLUMN zero INTEGER NOT NULL DEFAULT 0 CHECK (zero IN (0, 1));
CREATE TABLE clock (
  id     INTEGER PRIMARY KEY CHECK (id = 1),
  unit   INTEGER NOT NULL,
  hand   INTEGER NOT NULL,
  counts BLOB    NOT NULL
);
ALTER TABLE flush_history ADD COLUMN reason TEXT;
UPDATE cache_info SET format_version = 2 WHERE id = 1;
PRAGMA user_version = 2;
`;

/** Format 2 to 3: the disk generation (none yet: adopted at the next attach) and the bitmap path. */
const UPGRADE_2_TO_3 = `
ALTER TABLE cache_info ADD COLUMN disk_generation INTEGER CHECK (disk_generation IS NULL OR disk_generation >= 0);
ALTER TABLE cache_info ADD COLUMN bitmap_path TEXT;
UPDATE cache_info SET format_version = 3 WHERE id = 1;
PRAGMA user_version = 3;
`;

/** Format 3 to 4: the disk fingerprint (unknown: taken at the attach that upgrades). */
const UPGRADE_3_TO_4 = `
ALTER TABLE cache_info ADD COLUMN disk_fingerprint TEXT;
UPDATE cache_info SET format_version = 4 WHERE id = 1;
PRAGMA user_version = 4;
`;

/**
 * Format 4 to 5: the journal mark (journal_open: 0, as a closed file; the attach that upgrades
 * sets it, markOpen()).
 */
const UPGRADE_4_TO_5 = `
ALTER TABLE cache_info ADD COLUMN journal_open INTEGER NOT NULL DEFAULT 0 CHECK (journal_open IN (0, 1));
UPDATE cache_info SET format_version = 5 WHERE id = 1;
PRAGMA user_version = 5;
`;

interface InfoRow {
  format_version: number;
  uuid: string;
  block_size: number;
  backing_size: number;
  backing_id: string;
  mode: CacheMode;
  state: 'creating' | 'ready';
  clean_shutdown: number;
  flush_epoch: number;
  created_at: number;
  budget?: number | null;
  eviction_unit?: number;
  disk_generation?: number | null;
  bitmap_path?: string | null;
  disk_fingerprint?: string | null;
  journal_open?: number;
}

/** One row of flush_history. */
export interface FlushRecord {
  id: number;
  epoch: number;
  /** What started it (the scheduler's FlushReason), or null for rows of format 1. */
  reason: string | null;
  startedAt: number;
  endedAt: number | null;
  bytes: number;
  blocks: number;
  spunUp: boolean;
  error: string | null;
}

export interface DirtySample {
  at: number;
  dirtyBytes: number;
}

export interface EventRecord {
  at: number;
  kind: string;
  detail: string | null;
}

/**
 * The history the write-back scheduler keeps (flushes, dirty-byte samples, power events). Plain
 * inserts, not part of the cache's durable state: losing the last rows in a crash costs nothing.
 */
export interface HistoryLog {
  flushStarted(epoch: number, at: number, reason?: string): number;
  flushEnded(id: number, result: { endedAt: number; bytes: number; blocks: number; spunUp: boolean; error?: string | null }): void;
  addDirtySample(at: number, dirtyBytes: number): void;
  addEvent(at: number, kind: string, detail?: string | null): void;
  flushes(since: number): FlushRecord[];
  /**
   * The last flush that completed without error, or undefined; with `wrote`, the last of those
   * that wrote at least one block (a flush that found nothing dirty is skipped).
   */
  lastFlush(options?: { wrote?: boolean }): FlushRecord | undefined;
  /**
   * The newest flush that did not complete (cut by a crash, or failed), when none completed after
   * it began; else undefined. Its blocks stayed dirty, but the disk holds part of them: it is not a
   * point-in-time image until a flush completes (invariant 7 holds only for completed flushes).
   */
  lastCutFlush(): FlushRecord | undefined;
  dirtySamples(since: number): DirtySample[];
  events(since: number, kind?: string): EventRecord[];
  countEvents(since: number, kinds: readonly string[]): number;
  /** Drops history older than `before` (the daemon keeps 90 days). */
  prune(before: number): void;
}

interface FlushRow {
  id: number;
  epoch: number;
  reason?: string | null;
  started_at: number;
  ended_at: number | null;
  bytes: number;
  blocks: number;
  spun_up: number;
  error: string | null;
}

function flushRecord(r: FlushRow): FlushRecord {
  return {
    id: r.id,
    epoch: r.epoch,
    reason: r.reason ?? null,
    startedAt: r.started_at,
    endedAt: r.ended_at,
    bytes: r.bytes,
    blocks: r.blocks,
    spunUp: r.spun_up === 1,
    error: r.error,
  };
}

export class Metadata implements HistoryLog {
  readonly path: string;
  #db: Database.Database;
  #info: CacheInfo;
  #insertDirty: Database.Statement<[number, number, number]> | null = null;
  readonly #syncNormal: Database.Statement;
  readonly #syncFull: Database.Statement;
  /** The WAL, opened on the first syncWal() (it exists from the first write on). */
  #walFd: number | null = null;
  /**
   * The main file says "open, possibly with a WAL" (journal_open = 1, format 5): close() clears
   * it once a checkpoint has put everything into the main file.
   */
  #journalOpen = false;
  /**
   * A file of format 4 or older (no journal mark) left by a daemon that did not close it
   * (clean_shutdown 0) found with no WAL beside it: its last transactions may be lost with a WAL
   * not copied along. Only a hint for refusals that follow (the mark decides from format 5 on).
   */
  readonly journalMaybeMissing: boolean;

  private constructor(path: string, db: Database.Database, walFound = true) {
    this.path = path;
    this.#db = db;
    this.#info = readInfo(db, path);
    this.#journalOpen = journalMark(db);
    this.journalMaybeMissing = !walFound && this.#info.formatVersion < 5 && !this.#info.cleanShutdown;
    this.#syncNormal = db.prepare('PRAGMA synchronous = NORMAL');
    this.#syncFull = db.prepare('PRAGMA synchronous = FULL');
  }

  /**
   * Creates a new metadata database; fails if `path` exists. `budget` in bytes (null: a full
   * mirror), `evictionUnit` in bytes.
   */
  static create(
    path: string,
    identity: CacheIdentity,
    mode: CacheMode,
    space: { budget: number | null; evictionUnit: number } = { budget: null, evictionUnit: DEFAULT_EVICTION_UNIT },
  ): Metadata {
    const fresh = !existsSync(path);
    const db = openDatabase(path, false);
    try {
      const { n } = db.prepare('SELECT count(*) AS n FROM sqlite_master').get() as { n: number };
      if (n !== 0) throw new CorruptMetadataError(`${path} already holds a database; refusing to overwrite it`);
      db.transaction(() => {
        db.exec(SCHEMA);
        db.prepare(
          `INSERT INTO cache_info (id, format_version, uuid, block_size, backing_size, backing_id, mode, state,
             clean_shutdown, flush_epoch, created_at, budget, eviction_unit, journal_open)
           VALUES (1, ?, ?, ?, ?, ?, ?, 'creating', 1, 0, ?, ?, ?, 1)`,
        ).run(FORMAT_VERSION, identity.uuid, identity.blockSize, identity.backingSize, identity.backingId, mode, Date.now(), space.budget, space.evictionUnit);
        db.pragma(`user_version = ${FORMAT_VERSION}`);
      })();
      // The mark in the main file before anything else is written (markOpen()).
      checkpoint(db, path);
      return new Metadata(path, db);
    } catch (err) {
      db.close();
      // A database this call made and could not fill (a full filesystem) is removed again.
      if (fresh) removeDatabase(path);
      throw (err as { code?: string }).code === 'SQLITE_FULL' ? translate(err, path) : err;
    }
  }

  /**
   * Opens existing metadata, taking the exclusive lock that keeps a second daemon out. A format
   * from OLDEST_FORMAT up is read as it is (info.formatVersion says which); upgrade() brings it to
   * FORMAT_VERSION. Any other format is refused, with the way to start over.
   */
  static open(path: string): Metadata {
    // Before SQLite opens it: opening makes an empty WAL.
    const walFound = existsSync(`${path}-wal`);
    const db = openDatabase(path, true);
    try {
      const version = db.pragma('user_version', { simple: true }) as number;
      if (version === 0 && !walFound) {
        // A cache never checkpointed (made by ulobdev before format 5) has all of it in the WAL.
        throw new CorruptMetadataError(
          `${path} holds no metadata and its journal ${path}-wal is missing: if the cache was copied or moved after a crash, copy ${path}-wal too (every file of the cache: CACHE*) and attach again`,
        );
      }
      if (version < OLDEST_FORMAT || version > FORMAT_VERSION) {
        throw new CorruptMetadataError(
          `${path}: metadata format ${version} is not a format this ulobdev reads (${OLDEST_FORMAT} to ${FORMAT_VERSION})` +
            (version > FORMAT_VERSION ? '; a newer ulobdev made it: use that one' : '') +
            "; or flush with the ulobdev that made it and start over with 'ulobdev discard'",
        );
      }
      // A crash always leaves the WAL (SQLite removes it only at a clean close), and a main file
      // marked open may lack the transactions in it: the last dirty records (invariant 1).
      if (!walFound && journalMark(db)) {
        throw new CorruptMetadataError(
          `${path} was left open by a daemon that stopped without closing it, and its journal ${path}-wal is missing: it holds the last writes (dirty data); ` +
            `copy ${path}-wal from where the cache was (every file of the cache: CACHE*) and attach again; ` +
            `only if another SQLite program (the sqlite3 shell) opened this file since the crash did it move the journal in: then 'touch ${path}-wal' and attach again; ` +
            `if it is lost for good, 'ulobdev discard --force' drops the cache and what only it held; nothing was changed`,
        );
      }
      return new Metadata(path, db, walFound);
    } catch (err) {
      db.close();
      throw translate(err, path);
    }
  }

  get info(): Readonly<CacheInfo> {
    return this.#info;
  }

  /** True when the file is of an older format: upgrade() before any other change. */
  get needsUpgrade(): boolean {
    return this.#info.formatVersion < FORMAT_VERSION;
  }

  /**
   * Brings an older format to FORMAT_VERSION in place, in one durable transaction. Format 1 had
   * no budget (a full mirror stays one), no zeroed rows and no clock; format 2 no disk generation
   * (null until the attach adopts one) and no bitmap path; format 3 no disk fingerprint (null: unknown).
   */
  upgrade(): void {
    if (!this.needsUpgrade) return;
    const from = this.#info.formatVersion;
    this.#run(() => {
      if (from < 2) this.#db.exec(UPGRADE_1_TO_2);
      if (from < 3) this.#db.exec(UPGRADE_2_TO_3);
      if (from < 4) this.#db.exec(UPGRADE_3_TO_4);
      this.#db.exec(UPGRADE_4_TO_5);
    });
    this.#info = readInfo(this.#db, this.path);
  }

  /** The dirty rows in the order they were written (later rows win for `zero`). */
  dirtyRows(): DirtyRow[] {
    const zero = this.#info.formatVersion >= 2 ? 'zero' : '0 AS zero';
    const rows = this.#db.prepare(`SELECT start, count, ${zero} FROM dirty ORDER BY rowid`).all() as { start: number; count: number; zero: number }[];
    const blocks = Math.ceil(this.#info.backingSize / this.#info.blockSize);
    for (const r of rows) {
      if (!Number.isSafeInteger(r.start) || !Number.isSafeInteger(r.count) || r.start + r.count > blocks) {
        throw new CorruptMetadataError(`${this.path}: dirty extent ${r.start}+${r.count} lies outside the disk`);
      }
    }
    return rows.map((r) => ({ start: r.start, count: r.count, zero: r.zero === 1 }));
  }

  /** The dirty extents, zeroed or not, sorted by start (rows as stored: they may overlap). */
  dirtyExtents(): Extent[] {
    return this.dirtyRows()
      .map(({ start, count }) => ({ start, count }))
      .sort((a, b) => a.start - b.start);
  }

  /**
   * Adds dirty extents in one durable transaction. `zero`: the blocks read as zeros from now on
   * (the cache file need not hold them); otherwise the cache file holds their content, which also
   * ends an earlier zeroing of them.
   */
  addDirty(extents: readonly Extent[], zero = false): void {
    this.#run(() => {
      const insert = this.#insert();
      for (const e of extents) insert.run(e.start, e.count, zero ? 1 : 0);
    });
  }

  /**
   * addDirty() without waiting for the disk: the transaction is committed to the WAL but not
   * synced (synchronous = NORMAL for this one transaction), so it takes microseconds on the event
   * loop instead of an fsync. It is durable once a later syncWal() resolves, or any later
   * transaction of this connection (they are synced, and the WAL is a log: syncing it covers
   * everything before). A crash before either may lose it, and so may lose no more than that:
   * SQLite recovers the WAL up to the last frame it can verify.
   */
  addDirtyUnsynced(extents: readonly Extent[]): void {
    this.#syncNormal.run();
    try {
      this.addDirty(extents);
    } finally {
      this.#syncFull.run();
    }
  }

  /**
   * fdatasync of the WAL on the threadpool: every transaction committed before the call is
   * durable when it resolves. Checkpoints in between are safe: with synchronous = NORMAL SQLite
   * syncs the WAL before a checkpoint and the database after it, before reusing the WAL.
   */
  async syncWal(): Promise<void> {
    try {
      this.#walFd ??= openSync(`${this.path}-wal`, fsConstants.O_RDONLY);
      await fdatasync(this.#walFd);
    } catch (err) {
      throw ioError('sync the metadata journal', `${this.path}-wal`, err);
    }
  }

  /**
   * Replaces the whole dirty set (after a flush epoch or to compact it); optionally bumps the
   * epoch. `zeroed`: extents that read as zeros; `later`: extents whose content the cache file
   * holds, written after the zeroed rows so that they win over them (intents being synced).
   */
  replaceDirty(
    extents: Iterable<Extent>,
    newEpoch?: number,
    zeroed: Iterable<Extent> = [],
    later: Iterable<Extent> = [],
    diskGeneration?: number,
  ): void {
    this.#run(() => {
      const insert = this.#insert();
      this.#db.exec('DELETE FROM dirty');
      for (const e of extents) insert.run(e.start, e.count, 0);
      for (const e of zeroed) insert.run(e.start, e.count, 1);
      for (const e of later) insert.run(e.start, e.count, 0);
      if (newEpoch !== undefined) {
        this.#db.prepare('UPDATE cache_info SET flush_epoch = ? WHERE id = 1').run(newEpoch);
      }
      if (diskGeneration !== undefined) this.#db.prepare('UPDATE cache_info SET disk_generation = ? WHERE id = 1').run(diskGeneration);
    });
    if (newEpoch !== undefined) this.#info = { ...this.#info, flushEpoch: newEpoch };
    if (diskGeneration !== undefined) this.#info = { ...this.#info, diskGeneration };
  }

  /** Sets the disk generation this cache has seen (an integer >= 0, or null: none yet) and the bitmap path, durably. Format 3 only. */
  setDiskState(diskGeneration: number | null, bitmapPath: string): void {
    this.#run(() => {
      this.#db.prepare('UPDATE cache_info SET disk_generation = ?, bitmap_path = ? WHERE id = 1').run(diskGeneration, bitmapPath);
    });
    this.#info = { ...this.#info, diskGeneration, bitmapPath };
  }

  /** Sets the disk fingerprint (a string, or null: unknown), durably. Format 4 only. */
  setDiskFingerprint(fingerprint: string | null): void {
    this.#run(() => {
      this.#db.prepare('UPDATE cache_info SET disk_fingerprint = ? WHERE id = 1').run(fingerprint);
    });
    this.#info = { ...this.#info, diskFingerprint: fingerprint };
  }

  /**
   * Ends the flush_history rows a dead daemon left running (ended_at NULL): ended at their start,
   * with the error "interrupted". Only the process holding the metadata's exclusive lock (no
   * flush of another is running) may call it. Returns how many rows it ended.
   */
  endInterruptedFlushes(): number {
    const r = this.#db
      .prepare("UPDATE flush_history SET ended_at = started_at, error = 'interrupted: the daemon stopped during this flush (its blocks stayed dirty for the next one)' WHERE ended_at IS NULL")
      .run();
    return r.changes;
  }

  /** Sets the budget (bytes; null: none) and the eviction unit (bytes), durably. */
  setBudget(budget: number | null, evictionUnit: number): void {
    this.#run(() => {
      this.#db.prepare('UPDATE cache_info SET budget = ?, eviction_unit = ? WHERE id = 1').run(budget, evictionUnit);
    });
    this.#info = { ...this.#info, budget, evictionUnit };
  }

  /** The clock saved by saveClock(), if any. */
  loadClock(): ClockState | null {
    if (this.#info.formatVersion < 2) return null;
    const row = this.#db.prepare('SELECT unit, hand, counts FROM clock WHERE id = 1').get() as { unit: number; hand: number; counts: Buffer } | undefined;
    return row ? { unitBytes: row.unit, hand: row.hand, counts: row.counts } : null;
  }

  /** Saves the eviction clock (soft state: losing it in a crash costs one sweep of the clock). */
  saveClock(state: ClockState): void {
    this.#run(() => {
      this.#db
        .prepare('INSERT INTO clock (id, unit, hand, counts) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET unit = excluded.unit, hand = excluded.hand, counts = excluded.counts')
        .run(state.unitBytes, state.hand, state.counts);
    });
  }

  setState(state: CacheInfo['state']): void {
    this.#update('state', state);
    this.#info = { ...this.#info, state };
  }

  setMode(mode: CacheMode): void {
    this.#update('mode', mode);
    this.#info = { ...this.#info, mode };
  }

  setCleanShutdown(clean: boolean): void {
    this.#update('clean_shutdown', clean ? 1 : 0);
    this.#info = { ...this.#info, cleanShutdown: clean };
  }

  /**
   * Marks the main file "open, possibly with a WAL" (journal_open = 1) and checkpoints the mark
   * into it, durably, so that a copy of the cache without CACHE.meta-wal is refused at open
   * instead of losing the transactions only the WAL holds (docs/format.md, "The journal"). The
   * attach calls it once the open is accepted, after upgrade(), before anything else is written.
   * Throws IOFailedError or MetadataFullError.
   */
  markOpen(): void {
    if (this.#journalOpen) {
      checkpoint(this.#db, this.path);
      return;
    }
    this.#run(() => {
      this.#db.prepare('UPDATE cache_info SET journal_open = 1 WHERE id = 1').run();
    });
    // Committed: from here close() must clear it, even if the checkpoint below fails (else
    // SQLite's checkpoint at close would leave a main file marked open with no WAL beside it).
    this.#journalOpen = true;
    checkpoint(this.#db, this.path);
  }

  /**
   * Closes the database. A file marked open gets, after a final checkpoint put everything in the
   * main file, journal_open = 0 (a small transaction SQLite's own checkpoint at close moves there
   * before it removes the WAL). A failure on the way leaves the mark and the WAL: both are right.
   */
  close(): void {
    if (this.#walFd !== null) closeSync(this.#walFd);
    this.#walFd = null;
    if (!this.#db.open) return;
    if (this.#journalOpen) {
      try {
        checkpoint(this.#db, this.path);
        this.#db.transaction(() => this.#db.prepare('UPDATE cache_info SET journal_open = 0 WHERE id = 1').run()).immediate();
        // The 0 in the main file now, not only through SQLite's own checkpoint at close (review11 M-1).
        checkpoint(this.#db, this.path);
        this.#journalOpen = false;
      } catch {
        // The mark stays: the next open finds the WAL beside it (SQLite keeps it when its own
        // checkpoint at close fails too) and takes it.
      }
    }
    this.#db.close();
  }

  // --- history (HistoryLog) -------------------------------------------------------------------

  // Dirty samples and events are written unsynced (synchronous = NORMAL for the one statement):
  // not durable state, a crash may lose the last of them, and the next synced transaction (or WAL
  // sync) makes them durable with it. Synced, each cost an fsync of the WAL on the event loop, two
  // per scheduled flush on top of the flush's own. A flush's own rows stay synced: a start row lost
  // in a power cut would hide a flush cut mid-copy (status: the disk is not a consistent image), an
  // end row lost would report a completed flush as cut (review13 W-1).

  flushStarted(epoch: number, at: number, reason: string | null = null): number {
    return Number(this.#db.prepare('INSERT INTO flush_history (epoch, started_at, reason) VALUES (?, ?, ?)').run(epoch, at, reason).lastInsertRowid);
  }

  flushEnded(id: number, result: { endedAt: number; bytes: number; blocks: number; spunUp: boolean; error?: string | null }): void {
    this.#db
      .prepare('UPDATE flush_history SET ended_at = ?, bytes = ?, blocks = ?, spun_up = ?, error = ? WHERE id = ?')
      .run(result.endedAt, result.bytes, result.blocks, result.spunUp ? 1 : 0, result.error ?? null, id);
  }

  addDirtySample(at: number, dirtyBytes: number): void {
    this.#unsynced(() => this.#db.prepare('INSERT INTO dirty_samples (at, dirty_bytes) VALUES (?, ?)').run(at, dirtyBytes));
  }

  addEvent(at: number, kind: string, detail: string | null = null): void {
    this.#unsynced(() => this.#db.prepare('INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)').run(at, kind, detail));
  }

  /**
   * Runs `fn` (one autocommit statement) with synchronous = NORMAL: committed to the WAL, not
   * synced. The pragmas are run afresh, not as statements prepared once: a prepared PRAGMA whose
   * schema changed since (the open's create or upgrade) silently does nothing on its next run, and
   * a FULL that did nothing would leave every later transaction unsynced.
   */
  #unsynced<T>(fn: () => T): T {
    // Inside a transaction SQLite refuses the pragma; the transaction's own commit then applies.
    if (this.#db.inTransaction) return fn();
    this.#db.pragma('synchronous = NORMAL');
    try {
      return fn();
    } finally {
      this.#db.pragma('synchronous = FULL');
    }
  }

  flushes(since: number): FlushRecord[] {
    const rows = this.#db.prepare('SELECT * FROM flush_history WHERE started_at >= ? ORDER BY started_at, id').all(since) as FlushRow[];
    return rows.map(flushRecord);
  }

  lastFlush(options: { wrote?: boolean } = {}): FlushRecord | undefined {
    const wrote = options.wrote ? ' AND blocks > 0' : '';
    const row = this.#db.prepare(`SELECT * FROM flush_history WHERE ended_at IS NOT NULL AND error IS NULL${wrote} ORDER BY ended_at DESC, id DESC LIMIT 1`).get() as
      | FlushRow
      | undefined;
    return row && flushRecord(row);
  }

  lastCutFlush(): FlushRecord | undefined {
    const row = this.#db
      .prepare(
        'SELECT * FROM flush_history WHERE error IS NOT NULL AND started_at > ' +
          'COALESCE((SELECT MAX(started_at) FROM flush_history WHERE ended_at IS NOT NULL AND error IS NULL), -1) ' +
          'ORDER BY started_at DESC, id DESC LIMIT 1',
      )
      .get() as FlushRow | undefined;
    return row && flushRecord(row);
  }

  dirtySamples(since: number): DirtySample[] {
    return (this.#db.prepare('SELECT at, dirty_bytes FROM dirty_samples WHERE at >= ? ORDER BY at').all(since) as { at: number; dirty_bytes: number }[]).map(
      (r) => ({ at: r.at, dirtyBytes: r.dirty_bytes }),
    );
  }

  events(since: number, kind?: string): EventRecord[] {
    const rows =
      kind === undefined
        ? this.#db.prepare('SELECT at, kind, detail FROM events WHERE at >= ? ORDER BY at').all(since)
        : this.#db.prepare('SELECT at, kind, detail FROM events WHERE at >= ? AND kind = ? ORDER BY at').all(since, kind);
    return rows as EventRecord[];
  }

  countEvents(since: number, kinds: readonly string[]): number {
    if (kinds.length === 0) return 0;
    const marks = kinds.map(() => '?').join(', ');
    const row = this.#db.prepare(`SELECT count(*) AS n FROM events WHERE at >= ? AND kind IN (${marks})`).get(since, ...kinds) as { n: number };
    return row.n;
  }

  prune(before: number): void {
    this.#db.transaction(() => {
      this.#db.prepare('DELETE FROM flush_history WHERE started_at < ?').run(before);
      this.#db.prepare('DELETE FROM dirty_samples WHERE at < ?').run(before);
      this.#db.prepare('DELETE FROM events WHERE at < ?').run(before);
    })();
  }

  #update(column: 'state' | 'mode' | 'clean_shutdown', value: string | number): void {
    this.#run(() => {
      this.#db.prepare(`UPDATE cache_info SET ${column} = ? WHERE id = 1`).run(value);
    });
  }

  #insert(): Database.Statement<[number, number, number]> {
    this.#insertDirty ??= this.#db.prepare('INSERT INTO dirty (start, count, zero) VALUES (?, ?, ?)');
    return this.#insertDirty;
  }

  #run(fn: () => void): void {
    try {
      this.#db.transaction(fn).immediate();
    } catch (err) {
      throw translate(err, this.path);
    }
  }
}

function openDatabase(path: string, mustExist: boolean): Database.Database {
  const fresh = !mustExist && !existsSync(path);
  let db: Database.Database;
  try {
    // Made 0600 first, as the cache file and the bitmap are: SQLite creates a file with the
    // process's umask (a library user's 022 left it world-readable: newuser12), and gives the
    // WAL the database file's mode.
    if (fresh) closeSync(openSync(path, fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_WRONLY, 0o600));
    db = new Database(path, { fileMustExist: mustExist, timeout: 0 });
  } catch (err) {
    throw mustExist ? translate(err, path) : ioError('create metadata', path, err);
  }
  try {
    // Exclusive locking keeps a second daemon out for as long as this one lives.
    db.pragma('locking_mode = EXCLUSIVE');
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    // Take the lock now, so a busy cache is reported at open and not at the first write.
    db.exec('BEGIN IMMEDIATE; COMMIT');
    return db;
  } catch (err) {
    db.close();
    // A database this call made and could not set up (a full filesystem) is removed again.
    if (fresh) removeDatabase(path);
    throw translate(err, path);
  }
}

/** journal_open of the file as opened (false for formats without it). */
function journalMark(db: Database.Database): boolean {
  try {
    const row = db.prepare('SELECT * FROM cache_info WHERE id = 1').get() as InfoRow | undefined;
    return row?.journal_open === 1;
  } catch {
    return false;
  }
}

/**
 * Copies every WAL frame into the main file and syncs it (synchronous = FULL), leaving an empty
 * WAL (TRUNCATE: a zero-length file, which still exists). Throws IOFailedError when SQLite could
 * not checkpoint it all.
 */
function checkpoint(db: Database.Database, path: string): void {
  let r: { busy: number; log: number; checkpointed: number } | undefined;
  try {
    r = (db.pragma('wal_checkpoint(TRUNCATE)') as { busy: number; log: number; checkpointed: number }[])[0];
  } catch (err) {
    throw translate(err, path);
  }
  if (!r || r.busy !== 0) throw ioError('checkpoint the metadata journal into', path, new Error('the checkpoint was incomplete (SQLITE_BUSY)'));
}

function removeDatabase(path: string): void {
  for (const p of [path, `${path}-wal`, `${path}-shm`]) rmSync(p, { force: true });
}

function readInfo(db: Database.Database, path: string): CacheInfo {
  let row: InfoRow | undefined;
  try {
    row = db.prepare('SELECT * FROM cache_info WHERE id = 1').get() as InfoRow | undefined;
  } catch (err) {
    throw translate(err, path);
  }
  if (!row) throw new CorruptMetadataError(`${path}: metadata has no cache_info row`);
  const evictionUnit = row.eviction_unit ?? DEFAULT_EVICTION_UNIT;
  const budget = row.budget ?? null;
  const ints = [row.block_size, row.backing_size, row.flush_epoch, row.created_at, evictionUnit, budget ?? 1];
  if (!ints.every((n) => Number.isSafeInteger(n) && n >= 0) || typeof row.uuid !== 'string' || typeof row.backing_id !== 'string') {
    throw new CorruptMetadataError(`${path}: cache_info row is malformed`);
  }
  const diskGeneration = row.disk_generation ?? null;
  if (diskGeneration !== null && !(Number.isSafeInteger(diskGeneration) && diskGeneration >= 0)) {
    throw new CorruptMetadataError(`${path}: cache_info row is malformed`);
  }
  return {
    formatVersion: row.format_version,
    uuid: row.uuid,
    blockSize: row.block_size,
    backingSize: row.backing_size,
    backingId: row.backing_id,
    mode: row.mode,
    state: row.state,
    cleanShutdown: row.clean_shutdown === 1,
    flushEpoch: row.flush_epoch,
    createdAt: row.created_at,
    budget,
    evictionUnit,
    diskGeneration,
    bitmapPath: row.bitmap_path ?? null,
    diskFingerprint: typeof row.disk_fingerprint === 'string' ? row.disk_fingerprint : null,
  };
}

function translate(err: unknown, path: string): Error {
  if (err instanceof CorruptMetadataError || err instanceof CacheBusyError) return err;
  const code = (err as { code?: string }).code ?? '';
  if (code === 'SQLITE_BUSY' || code.startsWith('SQLITE_BUSY_') || code === 'SQLITE_LOCKED') {
    return new CacheBusyError(`${path} is in use by another ulobdev process`, { path: resolve(path) });
  }
  if (code === 'SQLITE_NOTADB' || code.startsWith('SQLITE_CORRUPT') || code === 'SQLITE_ERROR') {
    return new CorruptMetadataError(`${path} is not valid ulobdev metadata (${code})`, { cause: err });
  }
  if (code.startsWith('SQLITE_CANTOPEN')) return ioError('open metadata', path, err);
  // SQLite says only "database or disk is full": name the file.
  // The transaction is rolled back and the connection usable (MetadataFullError): the cache
  // frees room and tries again, or fails the one request.
  if (code === 'SQLITE_FULL') return new MetadataFullError(`cannot write ${path}: the filesystem holding it is full (SQLITE_FULL); free space on it`, { cause: err, path });
  return err instanceof Error ? err : new Error(String(err));
}
