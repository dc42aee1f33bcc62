// Model-based crash test of the cache engine: fast-check drives the real engine, store and
// metadata over crashable model files (test/support/crashable.ts) against a model disk that knows,
// per 512-byte sector, which contents a crash may legally leave behind.
//
// A run is plain data, a ModelCase: the steps (operations, crashes, reopens) and the seed of the
// crash randomness. So a shrunk counterexample is printed as a case ready to paste next to its
// property (see assertEngineModel) and replays exactly with runEngineModel.
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { expect } from 'vitest';
import { CacheEngine, type Epoch } from '../../src/cache/engine.js';
import { CacheStore, type CachePaths } from '../../src/cache/store.js';
import { FileSource } from '../../src/source/file-source.js';
import { flushDirty } from '../../src/writeback/flusher.js';
import { CrashWorld, Rng, SECTOR, SimulatedCrash, type CrashKind } from './crashable.js';

export interface ModelConfig {
  blockSize: number;
  blocks: number;
  /** Bytes cut off the last block, so the disk is not a whole number of blocks. */
  tail: number;
  /**
   * A cache budget (--cache-size) of this many blocks, with eviction units of `unitBlocks`: the
   * cache file is sparse, and evictions and punched holes join the persistence points. Without
   * it the cache is a full, preallocated mirror.
   */
  budgetBlocks?: number;
  unitBlocks?: number;
}

const BASE_TAG = 1;

/** Sector content that names the write it came from and its own position. */
export function sectorBytes(tag: number, sector: number): Buffer {
  const b = Buffer.allocUnsafe(SECTOR);
  b.writeUInt32LE(tag, 0);
  b.writeUInt32LE(sector, 4);
  let x = (tag * 2654435761 + sector * 40503) >>> 0;
  for (let i = 8; i < SECTOR; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

/** Content of a zeroed sector (TRIM, WRITE_ZEROES). */
export const ZERO_TAG = 0;

/** The write a sector's bytes came from (ZERO_TAG for all zeros), or -1 for garbage. */
export function decodeSector(buf: Buffer, sector: number): number {
  const tag = buf.readUInt32LE(0);
  if (tag === 0) return buf.every((x) => x === 0) ? ZERO_TAG : -1;
  if (!sectorBytes(tag, sector).equals(buf)) return -1;
  return tag;
}

interface Model {
  sectors: number;
  /** Latest acknowledged content per sector. */
  current: Uint32Array;
  /** Content guaranteed to survive a crash (as of the last FLUSH or FUA covering it). */
  stable: Uint32Array;
  /** Contents written since `stable` that a crash may also leave behind. */
  since: Map<number, Set<number>>;
  nextTag: number;
  /**
   * The image of the last completed flush epoch: what the backing disk holds, sector for sector,
   * whenever no flush is running (point-in-time epochs, docs/design.md).
   */
  image: Uint32Array;
  /** The image of the epoch being flushed, from its beginEpoch() until it completes or crashes. */
  flushing: Uint32Array | null;
  /**
   * Other contents the flushing epoch may hold per sector: those of the request in flight when a
   * flush started from inside it (the budget was full), whose sectors may be old or new in it.
   */
  flushingAlt: Map<number, Set<number>>;
  /** The write or zeroing being served now: its sectors, its tag, their contents before it. */
  inflight: { first: number; count: number; tag: number; before: Uint32Array } | null;
  /** While recovering: sectors not read back yet (their content is one of stable/since). */
  unverified: Uint8Array | null;
  /**
   * Sectors a crash left torn between two epochs (old image or the crashed epoch's): allowed on the
   * disk besides `image` until the next completed epoch rewrites them.
   */
  torn: Map<number, Set<number>>;
}

interface Real {
  world: CrashWorld;
  rng: Rng;
  paths: CachePaths;
  backingPath: string;
  size: number;
  blockSize: number;
  budgetBlocks: number | undefined;
  unitBlocks: number;
  engine: CacheEngine;
  model?: Model;
}

async function openEngine(real: Omit<Real, 'engine'>): Promise<CacheEngine> {
  const storage = real.world.storage();
  const handle = await storage.open(real.backingPath);
  const source = new FileSource(handle, { id: 'model-disk', size: real.size, description: 'model disk' });
  const store = await CacheStore.open({
    paths: real.paths,
    backing: source,
    mode: 'writeback',
    blockSize: real.blockSize,
    budget: real.budgetBlocks === undefined ? undefined : real.budgetBlocks * real.blockSize,
    evictionUnit: real.unitBlocks * real.blockSize,
    storage,
    metadata: real.world.metadata(),
  });
  // One block of copies in memory, the rest in the spill file: both copy-on-write paths run.
  // Fills of 2 blocks or more are staged and locked as ranges, single blocks one by one: both run.
  const engine = new CacheEngine(store, source, { autoCommitMs: 0, cowMemoryBytes: real.blockSize, rangeFillBlocks: 2 });
  // The budget full of dirty data: a flush from inside the request that needs room, as the
  // daemon's scheduler does (reason 'budget').
  engine.onSpacePressure = () => pressureFlush(real as Real, engine);
  return engine;
}

/** A flush started by a request waiting for room; the model learns the image it writes. */
async function pressureFlush(real: Real, engine: CacheEngine): Promise<void> {
  const model = real.model!;
  const image = Uint32Array.from(model.current);
  const alt = new Map<number, Set<number>>();
  const allow = (s: number, tag: number) => {
    let set = alt.get(s);
    if (!set) alt.set(s, (set = new Set()));
    set.add(tag);
  };
  const f = model.inflight;
  if (f) {
    for (let i = 0; i < f.count; i++) {
      image[f.first + i] = f.before[i]!;
      allow(f.first + i, f.tag);
    }
  }
  if (model.unverified) {
    for (let s = 0; s < model.sectors; s++) {
      if (!model.unverified[s]) continue;
      image[s] = model.stable[s]!;
      for (const t of model.since.get(s) ?? []) allow(s, t);
    }
  }
  model.flushing = image;
  model.flushingAlt = alt;
  await flushDirty(engine);
  completeEpoch(model, real);
}

/**
 * Dropping the cache entirely at this moment leaves the disk as the model says: every sector holds
 * the last completed epoch's content (or, after a crash mid-flush, that of the crashed epoch).
 */
function expectDiskIsEpochImage(model: Model, disk: Buffer, what: string): void {
  for (let s = 0; s < model.sectors; s++) {
    const got = decodeSector(disk.subarray(s * SECTOR, (s + 1) * SECTOR), s);
    if (got === model.image[s] || model.torn.get(s)?.has(got)) continue;
    expect.fail(
      `${what}: disk sector ${s} holds ${got === -1 ? 'garbage' : `write ${got}`}, but the last completed epoch has write ${model.image[s]}` +
        (model.torn.has(s) ? ` (or ${[...model.torn.get(s)!].join(', ')})` : ''),
    );
  }
}

/** An epoch completed: the disk is its image exactly (or, for sectors of flushingAlt, one of those). */
function completeEpoch(model: Model, real: Real): void {
  model.image = model.flushing!;
  model.flushing = null;
  model.torn = model.flushingAlt;
  model.flushingAlt = new Map();
  expectDiskIsEpochImage(model, real.world.file(real.backingPath).visible, 'after a completed flush');
}

function writeSectors(first: number, count: number, tag: number): Buffer {
  const parts: Buffer[] = [];
  for (let s = first; s < first + count; s++) parts.push(sectorBytes(tag, s));
  return Buffer.concat(parts);
}

function expectContent(buf: Buffer, firstSector: number, expected: (s: number) => number, what: string): void {
  for (let i = 0; i < buf.byteLength / SECTOR; i++) {
    const s = firstSector + i;
    const got = decodeSector(buf.subarray(i * SECTOR, (i + 1) * SECTOR), s);
    const want = expected(s);
    if (got !== want) expect.fail(`${what}: sector ${s} holds ${got === -1 ? 'garbage' : `write ${got}`}, expected write ${want}`);
  }
}

/**
 * Invariant 2 (and 1, 4): a present block that is not dirty holds exactly the backing disk's bytes.
 * Invariant 1: no present block lies over a hole of the cache file. The budget: the cache file
 * holds no more than the budget plus one eviction unit.
 */
function expectCleanBlocksMatchBacking(real: Real): void {
  const store = real.engine.store;
  const cacheFile = real.world.file(real.paths.cache);
  const cache = cacheFile.visible;
  const backing = real.world.file(real.backingPath).visible;
  for (const run of store.present.runs()) {
    for (let b = run.start; b < run.start + run.count; b++) {
      const off = b * real.blockSize;
      const len = Math.min(real.blockSize, real.size - off);
      if (cacheFile.hasHole(off, len)) expect.fail(`block ${b} is present over a hole of the cache file`);
      if (store.dirty.get(b)) continue;
      if (!cache.subarray(off, off + len).equals(backing.subarray(off, off + len))) {
        expect.fail(`block ${b} is present and clean but its cache copy differs from the backing disk`);
      }
    }
  }
  expectWithinBudget(real);
}

function expectWithinBudget(real: Real): void {
  if (real.budgetBlocks === undefined) return;
  const held = real.world.file(real.paths.cache).allocatedBytes();
  const limit = (real.budgetBlocks + real.unitBlocks) * real.blockSize;
  if (held > limit) expect.fail(`the cache file holds ${held} bytes, over the budget plus one unit (${limit})`);
}

/** Crash the world, reopen, and check that every sector holds a content the model allows. */
async function crashAndRecover(model: Model, real: Real, kind: CrashKind): Promise<void> {
  const epochBefore = real.engine.store.info.flushEpoch;
  await real.engine.store.abandon();
  await real.engine.source.close();
  real.world.crash(kind, real.rng);
  // Losing the cache now: every disk sector is the last epoch's or the one being flushed (never a
  // later write), at sector granularity.
  if (model.flushing) {
    for (let s = 0; s < model.sectors; s++) {
      const also = [...(model.flushingAlt.get(s) ?? [])];
      if (model.flushing[s] !== model.image[s]) also.push(model.flushing[s]!);
      if (also.length === 0) continue;
      let set = model.torn.get(s);
      if (!set) model.torn.set(s, (set = new Set()));
      for (const t of also) set.add(t);
    }
  }
  model.inflight = null;
  expectDiskIsEpochImage(model, real.world.file(real.backingPath).durable, `after a ${kind} crash`);
  for (let attempt = 0; ; attempt++) {
    // Half the time, crash once more in the middle of recovery itself.
    if (attempt === 0 && real.rng.int(2) === 0) real.world.armCrash(real.rng.int(4));
    try {
      real.engine = await openEngine(real);
      real.world.crashAt = Infinity;
      break;
    } catch (err) {
      // The store wraps what it was doing around the crash (IOFailedError with the crash as cause).
      if (!(err instanceof SimulatedCrash) && !real.world.crashed) throw err;
      real.world.crash(kind, real.rng);
    }
  }
  expect(real.engine.store.recoveredFromCrash).toBe(true);
  // The crashed epoch committed (its metadata transaction ran): the disk is its image exactly.
  if (model.flushing && real.engine.store.info.flushEpoch > epochBefore) {
    completeEpoch(model, real);
  }
  model.flushing = null;
  model.flushingAlt = new Map();
  expectCleanBlocksMatchBacking(real);
  // Read back block by block (a budget may be smaller than the disk, and a read may flush to
  // make room: sectors not read yet then count as any of their allowed contents).
  model.unverified = new Uint8Array(model.sectors).fill(1);
  const blockSectors = real.blockSize / SECTOR;
  for (let first = 0; first < model.sectors; first += blockSectors) {
    const count = Math.min(blockSectors, model.sectors - first);
    const buf = await real.engine.read(first * SECTOR, count * SECTOR);
    for (let s = first; s < first + count; s++) {
      const got = decodeSector(buf.subarray((s - first) * SECTOR, (s - first + 1) * SECTOR), s);
      const allowed = model.since.get(s);
      if (got !== model.stable[s] && !allowed?.has(got)) {
        expect.fail(
          `after a ${kind} crash sector ${s} holds ${got === -1 ? 'garbage' : `write ${got}`}; allowed: ${[model.stable[s], ...(allowed ?? [])].join(', ')}`,
        );
      }
      model.current[s] = got;
      model.stable[s] = got;
      model.since.delete(s);
      model.unverified[s] = 0;
    }
  }
  model.unverified = null;
  model.since.clear();
  expectCleanBlocksMatchBacking(real);
}

// --- commands ---------------------------------------------------------------------------------

export type Op =
  | { kind: 'read'; sector: number; count: number }
  | { kind: 'write'; sector: number; count: number; fua: boolean }
  | { kind: 'flush' }
  | { kind: 'discard'; sector: number; count: number }
  | { kind: 'zero'; sector: number; count: number; fua: boolean }
  | { kind: 'evict'; blocks: number }
  | { kind: 'writeback' }
  | { kind: 'writeback-racing'; sector: number; count: number; split: number; during: boolean }
  | { kind: 'write-during-commit'; sector: number; count: number; at: number; wcount: number };

function clip(model: Model, sector: number, count: number): [number, number] {
  const s = sector % model.sectors;
  return [s, Math.max(1, Math.min(count, model.sectors - s))];
}

/** Sectors [s, s + n) take content `tag`: acknowledged once `run` resolves, stable with `fua`. */
async function changeSectors(model: Model, s: number, n: number, tag: number, fua: boolean, run: () => Promise<void>): Promise<void> {
  model.inflight = { first: s, count: n, tag, before: model.current.slice(s, s + n) };
  for (let x = s; x < s + n; x++) {
    model.current[x] = tag;
    let set = model.since.get(x);
    if (!set) model.since.set(x, (set = new Set()));
    set.add(tag);
  }
  await run();
  model.inflight = null;
  if (fua) {
    for (let x = s; x < s + n; x++) {
      model.stable[x] = tag;
      model.since.delete(x);
    }
  }
}

/**
 * Runs `w` until it settles or waits for room in the budget (a write racing an open flush epoch
 * may wait for that epoch to end). True if it settled.
 */
async function settledOrWaiting(w: Promise<unknown>, engine: CacheEngine): Promise<boolean> {
  let settled = false;
  const done = w.then(
    () => (settled = true),
    () => (settled = true),
  );
  for (let i = 0; i < 100_000 && !settled; i++) {
    if (engine.spaceWaiters > 0) return false;
    await new Promise((resolve) => setImmediate(resolve));
  }
  await done;
  return true;
}

async function runOp(op: Op, model: Model, real: Real): Promise<void> {
  const engine = real.engine;
  switch (op.kind) {
    case 'read': {
      const [s, n] = clip(model, op.sector, op.count);
      const buf = await engine.read(s * SECTOR, n * SECTOR);
      expectContent(buf, s, (x) => model.current[x]!, 'read');
      return;
    }
    case 'write': {
      const [s, n] = clip(model, op.sector, op.count);
      const tag = model.nextTag++;
      await changeSectors(model, s, n, tag, op.fua, () => engine.write(s * SECTOR, writeSectors(s, n, tag), { fua: op.fua }));
      return;
    }
    case 'flush':
      await engine.flush();
      model.stable.set(model.current);
      model.since.clear();
      return;
    case 'discard': {
      // TRIM reads back zeros (issue 14, item 4a), durable as a write is: at the next FLUSH.
      const [s, n] = clip(model, op.sector, op.count);
      await changeSectors(model, s, n, ZERO_TAG, false, () => engine.discard(s * SECTOR, n * SECTOR));
      return;
    }
    case 'zero': {
      const [s, n] = clip(model, op.sector, op.count);
      await changeSectors(model, s, n, ZERO_TAG, op.fua, () => engine.zero(s * SECTOR, n * SECTOR, { fua: op.fua }));
      return;
    }
    case 'evict':
      await engine.evict(op.blocks);
      return;
    case 'writeback':
      model.flushing = Uint32Array.from(model.current);
      await flushDirty(engine);
      completeEpoch(model, real);
      expectCleanBlocksMatchBacking(real);
      return;
    case 'writeback-racing': {
      // A user write lands in the middle of copying the epoch's blocks to the backing disk: between
      // two extents, or while the flusher reads extent `split` (copy-on-write against readEpoch).
      // With a budget the write may have to wait for room until the epoch ends: then it completes
      // after the commit.
      model.flushing = Uint32Array.from(model.current);
      const epoch: Epoch = await engine.beginEpoch();
      const g = engine.geometry;
      const source = engine.source as FileSource;
      const split = epoch.extents.length === 0 ? 0 : op.split % (epoch.extents.length + 1);
      const copyOne = async (i: number) => {
        const e = epoch.extents[i]!;
        const buf = await engine.readEpoch(epoch, e.start, e.count);
        await source.writeAt(buf, g.blockOffset(e.start));
      };
      const zeroOne = async (i: number) => {
        const e = epoch.extents[i]!;
        // Blocks zeroed at the snapshot go to the disk as zeros, as flushDirty writes them.
        for (let b = e.start; b < e.start + e.count; b++) {
          if (epoch.isZero(b)) await source.writeAt(Buffer.alloc(g.extentBytes(b, 1)), g.blockOffset(b));
        }
      };
      const copy = async (i: number) => {
        await copyOne(i);
        await zeroOne(i);
      };
      let write: Promise<void> | null = null;
      try {
        for (let i = 0; i < split; i++) await copy(i);
        if (op.during && split < epoch.extents.length) {
          write = runOp({ kind: 'write', sector: op.sector, count: op.count, fua: false }, model, real);
          await copy(split);
          if (await settledOrWaiting(write, engine)) await write;
        } else {
          write = runOp({ kind: 'write', sector: op.sector, count: op.count, fua: false }, model, real);
          if (await settledOrWaiting(write, engine)) await write;
          if (split < epoch.extents.length) await copy(split);
        }
        for (let i = split + 1; i < epoch.extents.length; i++) await copy(i);
        await engine.commitEpoch(epoch);
      } catch (err) {
        engine.abortEpoch(epoch);
        await write?.catch(() => undefined);
        throw err;
      }
      completeEpoch(model, real);
      await write;
      expectCleanBlocksMatchBacking(real);
      return;
    }
    case 'write-during-commit': {
      // A read of sectors [s, s + n) fills the missing blocks there (2 or more: one run staged as a
      // range, rangeFillBlocks 2), then a FLUSH commits them, and while the commit's fdatasync runs
      // a write lands at sector s + at: a block of that run must leave the commit (staged dirty),
      // never come out present and clean over data the disk does not have (invariant 2).
      const [s, n] = clip(model, op.sector, op.count);
      const buf = await engine.read(s * SECTOR, n * SECTOR);
      expectContent(buf, s, (x) => model.current[x]!, 'read before the commit');
      const [ws, wn] = clip(model, s + (op.at % n), op.wcount);
      const tag = model.nextTag++;
      const store = engine.store;
      const syncData = store.syncData;
      let write: Promise<void> | null = null;
      let settled = false;
      // The flush's first cache sync (the commit's): the write starts once it is under way and is
      // awaited inside it, unless it has to wait for room (the budget full: it then waits for this
      // very commit, and completes after it).
      store.syncData = function (this: CacheStore): Promise<void> {
        store.syncData = syncData;
        const synced = syncData.call(store);
        // A crash at the sync rejects it while the write runs: handled here, returned below.
        synced.catch(() => undefined);
        write = changeSectors(model, ws, wn, tag, false, () => engine.write(ws * SECTOR, writeSectors(ws, wn, tag)));
        return (async () => {
          settled = await settledOrWaiting(write!, engine);
          if (settled) await write!.catch(() => undefined);
          return synced;
        })();
      };
      const before = Uint32Array.from(model.current);
      try {
        await engine.flush();
      } finally {
        store.syncData = syncData;
        if (write && !settled) await (write as Promise<void>).catch(() => undefined);
      }
      if (write) await write;
      // The FLUSH made durable what was acknowledged before it; the write during it is not covered.
      for (let x = 0; x < model.sectors; x++) {
        if (write && x >= ws && x < ws + wn) {
          model.stable[x] = before[x]!;
          model.since.set(x, new Set([tag]));
        } else {
          model.stable[x] = model.current[x]!;
          model.since.delete(x);
        }
      }
      expectCleanBlocksMatchBacking(real);
      return;
    }
  }
}

class OpCommand implements fc.AsyncCommand<Model, Real> {
  constructor(readonly op: Op) {}
  check(): boolean {
    return true;
  }
  async run(model: Model, real: Real): Promise<void> {
    await runOp(this.op, model, real);
    expectDiskIsEpochImage(model, real.world.file(real.backingPath).visible, `after ${this.op.kind}`);
  }
  toString(): string {
    return JSON.stringify(this.op);
  }
}

/** Arms a crash `after` persistence points into `op` (or after it, if it has fewer), then recovers. */
class CrashCommand implements fc.AsyncCommand<Model, Real> {
  constructor(
    readonly op: Op,
    readonly after: number,
    readonly crash: CrashKind,
  ) {}
  check(): boolean {
    return true;
  }
  async run(model: Model, real: Real): Promise<void> {
    real.world.armCrash(this.after);
    try {
      await runOp(this.op, model, real);
    } catch (err) {
      if (!(err instanceof SimulatedCrash) && !real.world.crashed) throw err;
    }
    await crashAndRecover(model, real, this.crash);
  }
  toString(): string {
    return `crash(${this.crash} after ${this.after} in ${JSON.stringify(this.op)})`;
  }
}

/** Clean close and reopen: everything acknowledged is there, exactly. */
class ReopenCommand implements fc.AsyncCommand<Model, Real> {
  check(): boolean {
    return true;
  }
  async run(model: Model, real: Real): Promise<void> {
    await real.engine.close();
    real.engine = await openEngine(real);
    expect(real.engine.store.recoveredFromCrash).toBe(false);
    expectCleanBlocksMatchBacking(real);
    const all = await real.engine.read(0, real.size);
    expectContent(all, 0, (s) => model.current[s]!, 'after reopen');
    expectDiskIsEpochImage(model, real.world.file(real.backingPath).visible, 'after reopen');
    model.stable.set(model.current);
    model.since.clear();
  }
  toString(): string {
    return 'reopen';
  }
}

function opArb(sectors: number, blockSectors: number, budget: boolean): fc.Arbitrary<Op> {
  const sector = fc.nat({ max: sectors - 1 });
  const count = fc.integer({ min: 1, max: blockSectors * 3 });
  return fc.oneof(
    { weight: 3, arbitrary: fc.record({ kind: fc.constant('read' as const), sector, count }) },
    { weight: 5, arbitrary: fc.record({ kind: fc.constant('write' as const), sector, count, fua: fc.boolean() }) },
    { weight: 2, arbitrary: fc.constant({ kind: 'flush' as const }) },
    { weight: 1, arbitrary: fc.record({ kind: fc.constant('discard' as const), sector, count }) },
    { weight: 1, arbitrary: fc.record({ kind: fc.constant('zero' as const), sector, count: fc.integer({ min: 1, max: blockSectors * 4 }), fua: fc.boolean() }) },
    { weight: budget ? 2 : 0, arbitrary: fc.record({ kind: fc.constant('evict' as const), blocks: fc.integer({ min: 1, max: 4 }) }) },
    { weight: 2, arbitrary: fc.constant({ kind: 'writeback' as const }) },
    {
      weight: 2,
      arbitrary: fc.record({
        kind: fc.constant('writeback-racing' as const),
        sector,
        count,
        split: fc.nat({ max: 8 }),
        during: fc.boolean(),
      }),
    },
    {
      weight: 2,
      arbitrary: fc.record({
        kind: fc.constant('write-during-commit' as const),
        sector,
        count: fc.integer({ min: blockSectors + 1, max: blockSectors * 4 }),
        at: fc.nat({ max: blockSectors * 4 }),
        wcount: fc.integer({ min: 1, max: blockSectors * 2 }),
      }),
    },
  );
}

/** One step of a model run. */
export type Step = { op: Op } | { crash: CrashKind; after: number; op: Op } | { reopen: true };

/** A whole model run: replayed exactly by runEngineModel. */
export interface ModelCase {
  steps: Step[];
  /** Seeds what a crash keeps, loses or tears (CrashWorld.crash), and whether recovery crashes too. */
  seed: number;
}

function commandOf(step: Step): fc.AsyncCommand<Model, Real> {
  if ('reopen' in step) return new ReopenCommand();
  if ('crash' in step) return new CrashCommand(step.op, step.after, step.crash);
  return new OpCommand(step.op);
}

function stepArb(config: ModelConfig): fc.Arbitrary<Step> {
  const size = config.blocks * config.blockSize - config.tail;
  const op = opArb(size / SECTOR, config.blockSize / SECTOR, config.budgetBlocks !== undefined);
  return fc.oneof(
    op.map((o): Step => ({ op: o })),
    fc.tuple(op, fc.nat({ max: 12 }), fc.constantFrom<CrashKind>('power', 'power', 'process')).map(([o, after, crash]): Step => ({ crash, after, op: o })),
    fc.constant<Step>({ reopen: true }),
  );
}

/** The property: every run of up to 24 steps keeps the model's guarantees. */
export function engineModelProperty(config: ModelConfig) {
  return fc.asyncProperty(fc.array(stepArb(config), { maxLength: 24 }), fc.integer({ min: 1, max: 2 ** 31 - 1 }), (steps, seed) =>
    runEngineModel(config, { steps, seed }),
  );
}

/**
 * Runs the property `runs` times. A failure is reported with its shrunk counterexample as a
 * ModelCase literal, to be kept as a named case next to the property.
 */
export async function assertEngineModel(config: ModelConfig, runs: number): Promise<void> {
  // A run that hangs (a deadlock) fails after 30 s and is shrunk like any other failure.
  const details = await fc.check(engineModelProperty(config), { numRuns: runs, timeout: 30_000 });
  if (!details.failed) return;
  const [steps, seed] = details.counterexample ?? [[], 0];
  const found = JSON.stringify({ seed, steps });
  throw new Error(
    `engine model failed after ${details.numRuns} runs (fast-check seed ${details.seed}, path ${JSON.stringify(details.counterexamplePath)}); ` +
      `keep the shrunk counterexample as a named case:\n  'WHAT IT SHOWS': ${found},\n${details.errorInstance instanceof Error ? details.errorInstance.message : String(details.errorInstance)}`,
    { cause: details.errorInstance },
  );
}

/** Replays one run on a fresh model disk and cache; throws at the first broken guarantee. */
export async function runEngineModel(config: ModelConfig, { steps, seed }: ModelCase): Promise<void> {
  const size = config.blocks * config.blockSize - config.tail;
  const sectors = size / SECTOR;
  const dir = mkdtempSync(join('/dev/shm', 'ulob-model-'));
  const world = new CrashWorld();
  const backingPath = join(dir, 'disk');
  await world.storage().open(backingPath, { create: true });
  const backing = world.file(backingPath);
  for (let s = 0; s < sectors; s++) backing.write(sectorBytes(BASE_TAG, s), s * SECTOR);
  backing.sync();
  const model: Model = {
    sectors,
    current: new Uint32Array(sectors).fill(BASE_TAG),
    stable: new Uint32Array(sectors).fill(BASE_TAG),
    since: new Map(),
    nextTag: BASE_TAG + 1,
    image: new Uint32Array(sectors).fill(BASE_TAG),
    flushing: null,
    flushingAlt: new Map(),
    inflight: null,
    unverified: null,
    torn: new Map(),
  };
  const partial: Omit<Real, 'engine'> = {
    world,
    rng: new Rng(seed),
    paths: { cache: join(dir, 'cache'), bitmap: join(dir, 'bitmap'), metadata: join(dir, 'meta.db') },
    backingPath,
    size,
    blockSize: config.blockSize,
    budgetBlocks: config.budgetBlocks,
    unitBlocks: config.unitBlocks ?? 1,
    model,
  };
  const real: Real = { ...partial, engine: await openEngine(partial) };
  try {
    await fc.asyncModelRun(() => ({ model, real }), steps.map(commandOf));
  } finally {
    await real.engine.store.abandon().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  }
}
