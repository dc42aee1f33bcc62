// Dirty samples and events are written with synchronous = NORMAL: no fsync of the WAL on the
// event loop for rows that are not durable state (two per scheduled flush). A flush's own rows stay
// synced (status reports a flush cut mid-copy from them: review13 W-1). The connection must be back
// at synchronous = FULL right after each, or the dirty set's transactions would lose their
// durability (invariants 2 and 4).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, beforeEach, expect, it, vi } from 'vitest';
import { Metadata, type CacheIdentity } from '../../src/cache/metadata.js';

const identity: CacheIdentity = { uuid: '0b8c6e1e-3f1a-4d0e-9b7a-2a4f5e6d7c8b', blockSize: 4096, backingSize: 64 * 4096, backingId: 'file:1:2:3' };
let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-history-sync-'));
});
afterEach(() => {
  vi.restoreAllMocks();
  rmSync(dir, { recursive: true, force: true });
});

it('writes samples and events unsynced, flush rows and every dirty-set transaction synced', () => {
  // The connection is private to Metadata: catch it, and each statement's synchronous level as it runs.
  const original = Database.prototype.prepare;
  const prepare = vi.spyOn(Database.prototype, 'prepare');
  const m = Metadata.create(join(dir, 'meta.db'), identity, 'writeback');
  const db = prepare.mock.contexts[0] as Database.Database;
  expect(db.pragma('synchronous', { simple: true })).toBe(2);
  const seen: Array<[string, number]> = [];
  prepare.mockImplementation(function (this: Database.Database, source: string) {
    const statement = original.call(this, source) as Database.Statement;
    const run = statement.run.bind(statement);
    const table = /^(?:INSERT INTO|UPDATE|DELETE FROM) (\w+)/.exec(source)?.[1];
    if (table) {
      statement.run = (...args: unknown[]) => {
        seen.push([table, this.pragma('synchronous', { simple: true }) as number]);
        return run(...(args as []));
      };
    }
    return statement;
  } as typeof Database.prototype.prepare);
  try {
    const row = m.flushStarted(1, 1000, 'schedule');
    m.addDirtySample(1001, 4096);
    m.addEvent(1002, 'spinup-caused', 'schedule');
    m.flushEnded(row, { endedAt: 1003, bytes: 4096, blocks: 1, spunUp: false });
    expect(db.pragma('synchronous', { simple: true }), 'synchronous = FULL again after the history rows').toBe(2);
    m.addDirty([{ start: 3, count: 2 }]);
    m.replaceDirty([{ start: 4, count: 1 }], 2);
    expect(db.pragma('synchronous', { simple: true })).toBe(2);
    const level = (table: string) => seen.filter(([t]) => t === table).map(([, s]) => s);
    expect(level('flush_history'), 'a flush\'s start and end rows synced').toEqual([2, 2]);
    expect(level('dirty_samples')).toEqual([1]);
    expect(level('events')).toEqual([1]);
    expect(level('dirty').length).toBeGreaterThan(0);
    expect(new Set(level('dirty')), 'dirty-set statements run synced').toEqual(new Set([2]));
    expect(new Set(level('cache_info'))).toEqual(new Set([2]));
    // The rows are there (and the flush ended).
    expect(m.flushes(0)).toMatchObject([{ epoch: 1, endedAt: 1003, bytes: 4096, reason: 'schedule' }]);
    expect(m.dirtySamples(0)).toEqual([{ at: 1001, dirtyBytes: 4096 }]);
    // Inside a transaction the pragma cannot change (SQLite refuses): the row goes in with it.
    db.transaction(() => m.addEvent(1004, 'spinup-observed', null)).immediate();
    expect(m.events(1004).map((e) => e.kind)).toEqual(['spinup-observed']);
    expect(db.pragma('synchronous', { simple: true })).toBe(2);
  } finally {
    m.close();
  }
});
