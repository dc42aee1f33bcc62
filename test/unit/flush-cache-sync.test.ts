// The flush's fixed syncs (bench/README, "Session 13"): the cache file's fdatasync that makes the
// snapshot's content durable (invariant 2) runs alongside the copy and the disk's sync, and the
// commit waits for both before any dirty bit goes (invariants 2 and 4); with nothing staged, the
// epoch's begin does not fdatasync the cache file a second time through a commit.
// The cache file's sync is held at a gate, deterministically: while it is held the disk is
// written and synced, but no dirty bit may go; a power loss then must leave every block dirty
// (or, if clean, equal to the disk).
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { CacheEngine } from '../../src/cache/engine.js';
import { CacheStore } from '../../src/cache/store.js';
import { FileSource } from '../../src/source/file-source.js';
import type { BlockFile, Storage } from '../../src/storage/storage.js';
import { flushDirty } from '../../src/writeback/flusher.js';
import { CrashWorld, Rng } from '../support/crashable.js';

const BS = 4096;
const BLOCKS = 8;
let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join('/dev/shm', 'ulob-flush-sync-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

/** What happened to the files, in order: 'cache-sync', 'cache-synced', 'disk-write', 'disk-sync'. */
type Log = string[];

/**
 * The world's storage with the cache file's sync() logged and, while `gate.held` is a promise,
 * held until it resolves (the fdatasync under way, not yet returned); the disk's writes and syncs
 * logged.
 */
function observed(world: CrashWorld, log: Log, gate: { held: Promise<void> | null }): Storage {
  const base = world.storage();
  const wrap = (h: BlockFile, path: string): BlockFile =>
    new Proxy(h, {
      get(target, key) {
        const v = Reflect.get(target, key, target) as unknown;
        if (path.endsWith('/cache') && key === 'sync') {
          return async () => {
            log.push('cache-sync');
            if (gate.held) await gate.held;
            await target.sync();
            log.push('cache-synced');
          };
        }
        if (path.endsWith('/disk') && (key === 'write' || key === 'sync')) {
          return async (...args: unknown[]) => {
            log.push(`disk-${key}`);
            return (v as (...a: unknown[]) => Promise<unknown>).apply(target, args);
          };
        }
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
  return { ...base, open: async (path, options) => wrap(await base.open(path, options), path) };
}

async function open(world: CrashWorld, storage: Storage): Promise<CacheEngine> {
  // The disk without writeMany: each block one write(), logged.
  const source = new FileSource(await storage.open(join(dir, 'disk')), { id: 'disk', size: BLOCKS * BS, description: 'model disk' });
  const store = await CacheStore.open({
    paths: { cache: join(dir, 'cache'), bitmap: join(dir, 'bitmap'), metadata: join(dir, 'meta.db') },
    backing: source,
    mode: 'writeback',
    blockSize: BS,
    storage,
    metadata: world.metadata(),
  });
  return new CacheEngine(store, source, { autoCommitMs: 0 });
}

/** A world whose disk holds 0xaa everywhere, with blocks 1, 4 and 6 dirty in the cache (not synced there). */
async function dirtyWorld(log: Log, gate: { held: Promise<void> | null }): Promise<{ world: CrashWorld; engine: CacheEngine }> {
  const world = new CrashWorld();
  const disk = join(dir, 'disk');
  await world.storage().open(disk, { create: true });
  world.file(disk).write(Buffer.alloc(BLOCKS * BS, 0xaa), 0);
  world.file(disk).sync();
  const engine = await open(world, observed(world, log, gate));
  // Present and clean first (fills, committed), so the writes below are first writes into clean
  // blocks: a durable intent each, the cache file written and not synced, nothing staged.
  await engine.read(0, BLOCKS * BS);
  await engine.flush();
  for (const b of [1, 4, 6]) await engine.write(b * BS, Buffer.alloc(BS, 0xc0 + b));
  expect(engine.store.dirty.count()).toBe(3);
  return { world, engine };
}

const turns = async (n: number) => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

it('the flush copies and syncs the disk while the cache sync runs, and clears nothing before that sync returns', async () => {
  const log: Log = [];
  let release!: () => void;
  const gate: { held: Promise<void> | null } = { held: null };
  const { engine } = await dirtyWorld(log, gate);
  try {
    gate.held = new Promise<void>((r) => (release = r));
    log.length = 0;
    let settled = false;
    const flushing = flushDirty(engine).finally(() => (settled = true));
    // Until the disk's sync has been asked for (the copy is done), or many turns.
    for (let i = 0; i < 200 && !log.includes('disk-sync'); i++) await turns(1);
    await turns(20);
    expect(log.filter((e) => e === 'disk-write').length, log.join(' ')).toBe(3);
    expect(log, 'the disk is written and synced while the cache sync is under way').toContain('disk-sync');
    expect(log).not.toContain('cache-synced');
    expect(settled, 'the flush ended before the cache file was durable').toBe(false);
    expect(engine.store.dirty.count(), 'a dirty bit went before the cache file was durable').toBe(3);
    release();
    const result = await flushing;
    expect(result.cleaned).toBe(3);
    expect(engine.store.dirty.count()).toBe(0);
    // One fdatasync of the cache file for the whole flush: the epoch's (nothing was staged).
    expect(log.filter((e) => e === 'cache-sync').length, log.join(' ')).toBe(1);
  } finally {
    release?.();
    await engine.close();
  }
});

it('a power loss while the cache sync is held, the disk written and synced, leaves every block dirty or equal to the disk', async () => {
  // Each seed decides which unsynced sector versions the cache file keeps; most drop some of the
  // new blocks' sectors, which a dirty bit cleared too early would leave clean over stale bytes.
  for (let seed = 1; seed <= 4; seed++) {
    rmSync(dir, { recursive: true, force: true });
    dir = mkdtempSync(join('/dev/shm', 'ulob-flush-sync-'));
    const log: Log = [];
    let release!: () => void;
    const gate: { held: Promise<void> | null } = { held: null };
    const { world, engine } = await dirtyWorld(log, gate);
    gate.held = new Promise<void>((r) => (release = r));
    log.length = 0;
    const flushing = flushDirty(engine).catch((err: unknown) => err);
    for (let i = 0; i < 200 && !log.includes('disk-sync'); i++) await turns(1);
    await turns(20);
    expect(log, `seed ${seed}`).toContain('disk-sync');
    const disk = Buffer.from(world.file(join(dir, 'disk')).durable);
    for (const b of [1, 4, 6]) expect(disk.subarray(b * BS, (b + 1) * BS).equals(Buffer.alloc(BS, 0xc0 + b)), `seed ${seed}: block ${b} on the disk`).toBe(true);
    // Power loss now, the cache file's fdatasync never returned.
    await engine.store.abandon();
    await engine.source.close();
    world.crash('power', new Rng(seed));
    release();
    await flushing;
    const again = await open(world, world.storage());
    try {
      const cache = world.file(join(dir, 'cache')).visible;
      for (const b of [1, 4, 6]) {
        if (again.store.dirty.get(b)) continue;
        const same = cache.subarray(b * BS, (b + 1) * BS).equals(disk.subarray(b * BS, (b + 1) * BS));
        if (!same) expect.fail(`seed ${seed}: block ${b} is clean after the crash but its cache copy differs from the disk (invariant 2)`);
      }
      expect(again.store.dirty.count(), `seed ${seed}: the flush had not committed`).toBe(3);
    } finally {
      await again.store.abandon();
      await again.source.close();
    }
  }
});
