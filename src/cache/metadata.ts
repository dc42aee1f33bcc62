// Cache metadata in SQLite: identity, mode, clean-shutdown flag, flush epoch, the dirty set as block
// extents, and the history tables. WAL with synchronous=FULL: every transaction that returns is
// durable, which is what the dirty set needs (docs/design.md, "Durability rules").
import Database from 'better-sqlite3';
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

export class Metadata {
  readonly path: string;
  #db: Database.Database;
  #info: CacheInfo;
  #insertDirty: Database.Statement<[number, number]>;

  private constructor(path: string, db: Database.Database) {
    this.path = path;
    this.#db = db;
    this.#info = readInfo(db, path);
    this.#insertDirty = db.prepare('INSERT INTO dirty (start, count) VALUES (?, ?)');
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
    if (this.#db.open) this.#db.close();
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
