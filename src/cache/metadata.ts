// Cache metadata in SQLite: identity, mode, clean-shutdown flag, flush epoch, the dirty set as block
// extents, and the history tables. WAL with synchronous=FULL: every transaction that returns is
// durable, which is what the dirty set needs (docs/design.md, "Durability rules").
import { closeSync, constants as fsConstants, openSync } from 'node:fs';
import Database from 'better-sqlite3';
import { fdatasync } from '../native/io.js';
import { CacheBusyError, CorruptMetadataError, ioError } from '../errors.js';
import type { Extent } from './layout.js';

export const FORMAT_VERSION = 1;

export type CacheMode = 'readonly' | 'writeback';

export interface CacheIdentity {
  uuid: string;
  blockSize: number;
  backingSize: number;
  /** Stable id of the backing disk: WWN or serial for disks, device+inode for files. */
  backingId: string;
}

export interface CacheInfo extends CacheIdentity {
  formatVersion: number;
  mode: CacheMode;
  /** 'creating' until the cache and bitmap files are allocated: a crash before that re-creates. */
  state: 'creating' | 'ready';
  cleanShutdown: boolean;
  flushEpoch: number;
  createdAt: number;
}

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
  created_at     INTEGER NOT NULL
);
-- Dirty blocks as extents. Rows may overlap or touch until the next rewrite compacts them.
CREATE TABLE dirty (
  start INTEGER NOT NULL CHECK (start >= 0),
  count INTEGER NOT NULL CHECK (count > 0)
);
CREATE TABLE flush_history (
  id          INTEGER PRIMARY KEY,
  epoch       INTEGER NOT NULL,
  started_at  INTEGER NOT NULL,
  ended_at    INTEGER,
  bytes       INTEGER NOT NULL DEFAULT 0,
  blocks      INTEGER NOT NULL DEFAULT 0,
  spun_up     INTEGER NOT NULL DEFAULT 0,
  error       TEXT
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
}

/** One row of flush_history. */
export interface FlushRecord {
  id: number;
  epoch: number;
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
  flushStarted(epoch: number, at: number): number;
  flushEnded(id: number, result: { endedAt: number; bytes: number; blocks: number; spunUp: boolean; error?: string | null }): void;
  addDirtySample(at: number, dirtyBytes: number): void;
  addEvent(at: number, kind: string, detail?: string | null): void;
  flushes(since: number): FlushRecord[];
  lastFlush(): FlushRecord | undefined;
  dirtySamples(since: number): DirtySample[];
  events(since: number, kind?: string): EventRecord[];
  countEvents(since: number, kinds: readonly string[]): number;
  /** Drops history older than `before` (the daemon keeps 90 days). */
  prune(before: number): void;
}

interface FlushRow {
  id: number;
  epoch: number;
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
  #insertDirty: Database.Statement<[number, number]>;
  readonly #syncNormal: Database.Statement;
  readonly #syncFull: Database.Statement;
  /** The WAL, opened on the first syncWal() (it exists from the first write on). */
  #walFd: number | null = null;

  private constructor(path: string, db: Database.Database) {
    this.path = path;
    this.#db = db;
    this.#info = readInfo(db, path);
    this.#insertDirty = db.prepare('INSERT INTO dirty (start, count) VALUES (?, ?)');
    this.#syncNormal = db.prepare('PRAGMA synchronous = NORMAL');
    this.#syncFull = db.prepare('PRAGMA synchronous = FULL');
  }

  /** Creates a new metadata database; fails if `path` exists. */
  static create(path: string, identity: CacheIdentity, mode: CacheMode): Metadata {
    const db = openDatabase(path, false);
    try {
      const { n } = db.prepare('SELECT count(*) AS n FROM sqlite_master').get() as { n: number };
      if (n !== 0) throw new CorruptMetadataError(`${path} already holds a database; refusing to overwrite it`);
      db.transaction(() => {
        db.exec(SCHEMA);
        db.prepare(
          `INSERT INTO cache_info (id, format_version, uuid, block_size, backing_size, backing_id, mode, state,
             clean_shutdown, flush_epoch, created_at)
           VALUES (1, ?, ?, ?, ?, ?, ?, 'creating', 1, 0, ?)`,
        ).run(FORMAT_VERSION, identity.uuid, identity.blockSize, identity.backingSize, identity.backingId, mode, Date.now());
        db.pragma(`user_version = ${FORMAT_VERSION}`);
      })();
      return new Metadata(path, db);
    } catch (err) {
      db.close();
      throw err;
    }
  }

  /** Opens existing metadata, taking the exclusive lock that keeps a second daemon out. */
  static open(path: string): Metadata {
    const db = openDatabase(path, true);
    try {
      const version = db.pragma('user_version', { simple: true }) as number;
      if (version !== FORMAT_VERSION) {
        throw new CorruptMetadataError(`${path}: metadata format ${version} is not the supported format ${FORMAT_VERSION}`);
      }
      return new Metadata(path, db);
    } catch (err) {
      db.close();
      throw translate(err, path);
    }
  }

  get info(): Readonly<CacheInfo> {
    return this.#info;
  }

  dirtyExtents(): Extent[] {
    const rows = this.#db.prepare('SELECT start, count FROM dirty ORDER BY start').all() as Extent[];
    for (const r of rows) {
      if (!Number.isSafeInteger(r.start) || !Number.isSafeInteger(r.count) || r.start + r.count > Math.ceil(this.#info.backingSize / this.#info.blockSize)) {
        throw new CorruptMetadataError(`${this.path}: dirty extent ${r.start}+${r.count} lies outside the disk`);
      }
    }
    return rows;
  }

  /** Adds dirty extents in one durable transaction. */
  addDirty(extents: readonly Extent[]): void {
    this.#run(() => {
      for (const e of extents) this.#insertDirty.run(e.start, e.count);
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

  /** Replaces the whole dirty set (after a flush epoch or to compact it); optionally bumps the epoch. */
  replaceDirty(extents: Iterable<Extent>, newEpoch?: number): void {
    this.#run(() => {
      this.#db.exec('DELETE FROM dirty');
      for (const e of extents) this.#insertDirty.run(e.start, e.count);
      if (newEpoch !== undefined) {
        this.#db.prepare('UPDATE cache_info SET flush_epoch = ? WHERE id = 1').run(newEpoch);
      }
    });
    if (newEpoch !== undefined) this.#info = { ...this.#info, flushEpoch: newEpoch };
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

  close(): void {
    if (this.#walFd !== null) closeSync(this.#walFd);
    this.#walFd = null;
    if (this.#db.open) this.#db.close();
  }

  // --- history (HistoryLog) -------------------------------------------------------------------

  flushStarted(epoch: number, at: number): number {
    const r = this.#db.prepare('INSERT INTO flush_history (epoch, started_at) VALUES (?, ?)').run(epoch, at);
    return Number(r.lastInsertRowid);
  }

  flushEnded(id: number, result: { endedAt: number; bytes: number; blocks: number; spunUp: boolean; error?: string | null }): void {
    this.#db
      .prepare('UPDATE flush_history SET ended_at = ?, bytes = ?, blocks = ?, spun_up = ?, error = ? WHERE id = ?')
      .run(result.endedAt, result.bytes, result.blocks, result.spunUp ? 1 : 0, result.error ?? null, id);
  }

  addDirtySample(at: number, dirtyBytes: number): void {
    this.#db.prepare('INSERT INTO dirty_samples (at, dirty_bytes) VALUES (?, ?)').run(at, dirtyBytes);
  }

  addEvent(at: number, kind: string, detail: string | null = null): void {
    this.#db.prepare('INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)').run(at, kind, detail);
  }

  flushes(since: number): FlushRecord[] {
    const rows = this.#db.prepare('SELECT * FROM flush_history WHERE started_at >= ? ORDER BY started_at, id').all(since) as FlushRow[];
    return rows.map(flushRecord);
  }

  lastFlush(): FlushRecord | undefined {
    const row = this.#db.prepare('SELECT * FROM flush_history WHERE ended_at IS NOT NULL AND error IS NULL ORDER BY ended_at DESC, id DESC LIMIT 1').get() as
      | FlushRow
      | undefined;
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

  #run(fn: () => void): void {
    try {
      this.#db.transaction(fn).immediate();
    } catch (err) {
      throw translate(err, this.path);
    }
  }
}

function openDatabase(path: string, mustExist: boolean): Database.Database {
  let db: Database.Database;
  try {
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
    throw translate(err, path);
  }
}

function readInfo(db: Database.Database, path: string): CacheInfo {
  let row: InfoRow | undefined;
  try {
    row = db.prepare('SELECT * FROM cache_info WHERE id = 1').get() as InfoRow | undefined;
  } catch (err) {
    throw translate(err, path);
  }
  if (!row) throw new CorruptMetadataError(`${path}: metadata has no cache_info row`);
  const ints = [row.block_size, row.backing_size, row.flush_epoch, row.created_at];
  if (!ints.every((n) => Number.isSafeInteger(n) && n >= 0) || typeof row.uuid !== 'string' || typeof row.backing_id !== 'string') {
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
  };
}

function translate(err: unknown, path: string): Error {
  if (err instanceof CorruptMetadataError || err instanceof CacheBusyError) return err;
  const code = (err as { code?: string }).code ?? '';
  if (code === 'SQLITE_BUSY' || code.startsWith('SQLITE_BUSY_') || code === 'SQLITE_LOCKED') {
    return new CacheBusyError(`${path} is in use by another ulobdev process`);
  }
  if (code === 'SQLITE_NOTADB' || code.startsWith('SQLITE_CORRUPT') || code === 'SQLITE_ERROR') {
    return new CorruptMetadataError(`${path} is not valid ulobdev metadata (${code})`, { cause: err });
  }
  if (code.startsWith('SQLITE_CANTOPEN')) return ioError('open metadata', path, err);
  return err instanceof Error ? err : new Error(String(err));
}
