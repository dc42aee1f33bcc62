// The dirty-intent rounds' gather (CacheStore.#gatherGate): a round starts once as many blocks
// arrived since the last round ended as that round made dirty (its writers came back), or at the
// latest CacheStore.intentGatherMs after that end. Without it the writers of one round come back
// while the next already runs with the few that arrived during its fsync: through /dev/loopN at
// QD16 rounds carried 2.75-2.84 blocks (session 13's quiet baseline), each a transaction and a WAL
// fsync. Checked here with the WAL fsync held or counted (a wrapped Metadata): the round waits for
// the writers and carries them all, a writer alone never waits, a wait that runs out starts the
// round and lets the next rounds start without one. Rule 3 holds throughout: nothing waiting in
// a gather is written or dirty before its round's fsync.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CacheEngine } from '../../src/cache/engine.js';
import { Metadata } from '../../src/cache/metadata.js';
import { CacheStore, type CachePaths, type MetadataFactory } from '../../src/cache/store.js';
import { openBacking } from '../../src/source/backing.js';
import type { FileSource } from '../../src/source/file-source.js';

const BS = 4096;
const BLOCKS = 32;

let dir: string;
let cleanups: (() => unknown)[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-intent-gather-'));
});

afterEach(async () => {
  for (const undo of cleanups.reverse()) {
    try {
      await undo();
    } catch {
      // best effort: the next undo still runs
    }
  }
  cleanups = [];
  rmSync(dir, { recursive: true, force: true });
});

/** A Metadata whose WAL fsync can be held, counting each round's transaction (blocks) and fsyncs. */
function gatedMetadata() {
  const gate = { held: false, waiting: [] as (() => void)[], syncs: 0, transactions: [] as number[], at: [] as number[] };
  const wrap = (m: Metadata): Metadata => {
    const syncWal = m.syncWal.bind(m);
    const addDirtyUnsynced = m.addDirtyUnsynced.bind(m);
    m.addDirtyUnsynced = (extents) => {
      gate.transactions.push(extents.reduce((n, e) => n + e.count, 0));
      gate.at.push(performance.now());
      addDirtyUnsynced(extents);
    };
    m.syncWal = async () => {
      gate.syncs++;
      if (gate.held) await new Promise<void>((resolve) => gate.waiting.push(resolve));
      await syncWal();
    };
    return m;
  };
  const factory: MetadataFactory = { create: (...a) => wrap(Metadata.create(...a)), open: (p) => wrap(Metadata.open(p)) };
  const release = () => {
    gate.held = false;
    for (const go of gate.waiting.splice(0)) go();
  };
  return { gate, factory, release };
}

/** An engine over a 32-block disk, every block read into the cache and clean. */
async function rig() {
  const disk = join(dir, 'disk.img');
  const initial = randomBytes(BLOCKS * BS);
  writeFileSync(disk, initial);
  const paths: CachePaths = { cache: join(dir, 'c'), bitmap: join(dir, 'c.bitmap'), metadata: join(dir, 'c.meta') };
  const source = (await openBacking(disk, { writable: true })) as FileSource;
  cleanups.push(() => source.close());
  const g = gatedMetadata();
  const store = await CacheStore.open({ paths, backing: source, mode: 'writeback', blockSize: BS, metadata: g.factory });
  const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
  cleanups.push(() => engine.close());
  await engine.read(0, BLOCKS * BS);
  await engine.flush();
  const unchanged = (b: number) => readFileSync(paths.cache).subarray(b * BS, (b + 1) * BS).equals(initial.subarray(b * BS, (b + 1) * BS));
  return { engine, store, unchanged, ...g };
}

const turn = () => new Promise<void>((resolve) => setImmediate(resolve));
const block = (seed: number) => Buffer.alloc(BS, seed);

describe('intent rounds gather the writers of the round before', () => {
  it('a round waits until the last round\'s writers are back and carries them all in one transaction', async () => {
    const { engine, store, gate, release, unchanged } = await rig();
    // Long enough that only the writers' arrival can end the wait in this test.
    store.intentGatherMs = 20_000;
    gate.held = true;
    const first = [0, 1, 2, 3].map((b) => engine.write(b * BS, block(b + 1)));
    await turn();
    expect(gate.transactions).toEqual([4]);
    release();
    await Promise.all(first);
    // The four come back one turn apart, as the answers of a QD4 client would.
    const next: Promise<void>[] = [];
    for (const b of [8, 9, 10]) {
      next.push(engine.write(b * BS, block(b + 1)));
      await turn();
      await turn();
    }
    // Three of four are back: no round yet, and nothing of theirs written or dirty (rule 3).
    expect(gate.transactions).toEqual([4]);
    for (const b of [8, 9, 10]) {
      expect(store.dirty.get(b)).toBe(false);
      expect(unchanged(b)).toBe(true);
    }
    next.push(engine.write(11 * BS, block(12)));
    await Promise.all(next);
    // One round of all four, not 1 + 3 (a round started by the first one back, the rest in the next).
    expect(gate.transactions).toEqual([4, 4]);
    expect(gate.syncs).toBe(2);
    for (const b of [8, 9, 10, 11]) expect(store.dirty.get(b)).toBe(true);
    expect(store.intentStats()).toMatchObject({ rounds: 2, blocks: 8, gathered: 1, gatherTimeouts: 0 });
  });

  it('a writer alone never waits: its next write is the one its round released', async () => {
    const { engine, store, gate } = await rig();
    store.intentGatherMs = 20_000;
    const started = performance.now();
    for (let b = 0; b < 6; b++) await engine.write(b * BS, block(b + 1));
    // A wait would have taken 20 s each.
    expect(performance.now() - started).toBeLessThan(10_000);
    expect(gate.transactions).toEqual([1, 1, 1, 1, 1, 1]);
    expect(store.intentStats()).toMatchObject({ rounds: 6, gathered: 0, gatherTimeouts: 0 });
  });

  it('a record that is not a writer\'s (a commit, a kernel\'s) ends a wait and never waits itself', async () => {
    const { engine, store, gate, release } = await rig();
    store.intentGatherMs = 20_000;
    gate.held = true;
    const first = [0, 1, 2, 3].map((b) => engine.write(b * BS, block(b + 1)));
    await turn();
    release();
    await Promise.all(first);
    const started = performance.now();
    // One writer of four is back and waits; then a record without `gather` (as the engine's
    // commit makes for staged dirty blocks): the round starts at once and carries both.
    const writer = engine.write(8 * BS, block(9));
    await turn();
    await turn();
    expect(gate.transactions).toEqual([4]);
    await store.markDirtyDurable([{ start: 20, count: 1 }]);
    await writer;
    expect(gate.transactions).toEqual([4, 2]);
    // Alone, right after a round that released a writer: a record without `gather` starts its
    // round at once all the same.
    await store.markDirtyDurable([{ start: 21, count: 1 }]);
    expect(gate.transactions).toEqual([4, 2, 1]);
    expect(performance.now() - started).toBeLessThan(10_000);
    expect(store.intentStats()).toMatchObject({ gathered: 1, gatherTimeouts: 0 });
  }, 60_000);

  it('after a slow fsync a round waits for the writers up to that fsync\'s time (at most 10 ms), not only intentGatherMs', async () => {
    const { engine, store, gate, release } = await rig();
    store.intentGatherMs = 1;
    gate.held = true;
    const first = [0, 1, 2, 3].map((b) => engine.write(b * BS, block(b + 1)));
    await turn();
    // Round 1's fsync takes 300 ms.
    await new Promise((resolve) => setTimeout(resolve, 300));
    release();
    await Promise.all(first);
    const ended = performance.now();
    // One of its four writers comes back: its round waits 10 ms (min(300, 10)) from round 1's
    // end, not 1 ms, and then runs out (the other three never come).
    await engine.write(8 * BS, block(9));
    expect(gate.transactions).toEqual([4, 1]);
    expect(gate.at[1]! - ended).toBeGreaterThanOrEqual(5);
    expect(store.intentStats()).toMatchObject({ gathered: 1, gatherTimeouts: 1 });
  });

  it('a wait that runs out starts the round; the rounds after it start without waiting', async () => {
    const { engine, store, gate, release } = await rig();
    store.intentGatherMs = 300;
    gate.held = true;
    const first = [0, 1, 2, 3].map((b) => engine.write(b * BS, block(b + 1)));
    await turn();
    release();
    await Promise.all(first);
    // One writer of four comes back: its round waits for the others until intentGatherMs ran out.
    const asked = performance.now();
    await engine.write(8 * BS, block(9));
    expect(performance.now() - asked).toBeGreaterThanOrEqual(200);
    expect(gate.transactions).toEqual([4, 1]);
    expect(store.intentStats()).toMatchObject({ gathered: 1, gatherTimeouts: 1 });
    // Now a 20 s gather: the rounds right after a timeout skip it, so these do not wait.
    store.intentGatherMs = 20_000;
    const again = performance.now();
    await Promise.all([16, 17, 18, 19].map((b) => engine.write(b * BS, block(b + 1))));
    await engine.write(20 * BS, block(21));
    expect(performance.now() - again).toBeLessThan(10_000);
    expect(gate.transactions).toEqual([4, 1, 4, 1]);
    expect(store.intentStats()).toMatchObject({ gathered: 1, gatherTimeouts: 1 });
  }, 60_000);
});
