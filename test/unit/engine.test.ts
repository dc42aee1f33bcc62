// The cache engine (src/cache/engine.ts) with the store and the flusher on real files: what reads
// and writes do to the cache and to the backing disk, durability at FLUSH/FUA and across reopen,
// short last blocks, eviction, concurrency, write-back racing user writes, the commit timer, bad
// arguments, and the failed state after a failed sync.
import { createHash, randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CacheFullError, EngineClosedError, InvalidArgumentError, IOFailedError, MetadataFullError, ReadOnlyError, UlobError } from '../../src/errors.js';
import { CacheEngine, type EngineOptions } from '../../src/cache/engine.js';
import { posixStorage } from '../../src/storage/posix-storage.js';
import type { BlockFile, Storage } from '../../src/storage/storage.js';
import { CacheStore, type CachePaths, type MetadataFactory } from '../../src/cache/store.js';
import { Metadata } from '../../src/cache/metadata.js';
import { Bitmap } from '../../src/cache/bitmap.js';
import { openBacking } from '../../src/source/backing.js';
import type { FileSource } from '../../src/source/file-source.js';
import type { WritableSource } from '../../src/source/source.js';
import { flushDirty } from '../../src/writeback/flusher.js';
import { Hydrator } from '../../src/writeback/hydrate.js';
import { DiskHealth } from '../../src/source/health.js';
import { describeShrink } from '../../src/daemon/daemon.js';
import { formatBytes } from '../../src/units.js';

const KiB = 1024;

/** A Source that counts every call and can hold back writes to the backing disk. */
class CountingSource implements WritableSource {
  readonly size: number;
  readonly id: string;
  readonly description: string;
  readonly reads: [number, number][] = [];
  readonly writes: [number, number][] = [];
  syncs = 0;
  /** Source.missGranule, when the rig asks for one. */
  missGranule?: number;
  /** Called as each writeAt starts, before the gate. */
  onWrite: (() => void) | null = null;
  /** While set, every writeAt waits for it before writing. */
  writeGate: Promise<void> | null = null;

  constructor(readonly inner: WritableSource) {
    this.size = inner.size;
    this.id = inner.id;
    this.description = inner.description;
  }

  async readAt(buf: Uint8Array, position: number): Promise<void> {
    this.reads.push([position, buf.byteLength]);
    await this.inner.readAt(buf, position);
  }

  async writeAt(buf: Uint8Array, position: number): Promise<void> {
    this.writes.push([position, buf.byteLength]);
    this.onWrite?.();
    if (this.writeGate) await this.writeGate;
    await this.inner.writeAt(buf, position);
  }

  async sync(): Promise<void> {
    this.syncs++;
    await this.inner.sync();
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  /** Bytes read from the backing since the last reset. */
  get readBytes(): number {
    return this.reads.reduce((n, [, len]) => n + len, 0);
  }

  reset(): void {
    this.reads.length = 0;
    this.writes.length = 0;
    this.syncs = 0;
  }
}

/** posixStorage, except that the cache file's sync() can be told to fail once with EIO. */
function flakyStorage(target: () => string): { storage: Storage; failNextSync: boolean } {
  const state = { storage: undefined as unknown as Storage, failNextSync: false };
  state.storage = {
    ...posixStorage,
    async open(path, options) {
      const file = await posixStorage.open(path, options);
      if (path !== target()) return file;
      const wrapped: BlockFile = {
        path: file.path,
        read: (buf, pos) => file.read(buf, pos),
        write: (buf, pos) => file.write(buf, pos),
        async sync() {
          if (state.failNextSync) {
            state.failNextSync = false;
            throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO', errno: 5, syscall: 'fdatasync' });
          }
          await file.sync();
        },
        allocate: (length) => file.allocate(length),
        truncate: (length) => file.truncate(length),
        punchHole: (o, l) => file.punchHole(o, l),
        zeroRange: (o, l) => file.zeroRange(o, l),
        allocatedBytes: () => file.allocatedBytes(),
        nextData: (o) => file.nextData(o),
        size: () => file.size(),
        close: () => file.close(),
      };
      return wrapped;
    },
  };
  return state;
}

let dir: string;
let cleanups: (() => unknown)[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-engine-'));
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

interface RigOptions {
  size: number;
  blockSize: number;
  mode?: 'readonly' | 'writeback';
  engine?: EngineOptions;
  storage?: Storage;
  /** A cache budget in bytes, and its eviction unit. */
  budget?: number;
  evictionUnit?: number;
  /** Where the cache files go (default: the rig's temp dir). */
  cacheDir?: string;
  /** The source's missGranule (bytes), as an HTTP source declares one. */
  missGranule?: number;
  /** Bytes of the flash reserve (OpenStoreOptions.flashReserve); default 0, none: the rigs' flash is tiny. */
  flashReserve?: number;
}

interface Rig {
  engine: CacheEngine;
  store: CacheStore;
  source: CountingSource;
  file: FileSource;
  paths: CachePaths;
  disk: string;
  /** The disk's content when the rig was made. */
  initial: Buffer;
  options: RigOptions;
}

async function rig(options: RigOptions): Promise<Rig> {
  const sub = mkdtempSync(join(dir, 'rig-'));
  const disk = join(sub, 'disk.img');
  const initial = randomBytes(options.size);
  writeFileSync(disk, initial);
  const at = options.cacheDir ?? sub;
  const paths = { cache: join(at, 'cache'), bitmap: join(at, 'bitmap'), metadata: join(at, 'cache.meta') };
  const mode = options.mode ?? 'writeback';
  const file = await openBacking(disk, { writable: mode === 'writeback' });
  cleanups.push(() => file.close());
  const r = { file, paths, disk, initial, options } as Rig;
  await attach(r, mode);
  return r;
}

/** (Re)opens the store and engine over the rig's files, with a fresh counting source. */
async function attach(r: Rig, mode = r.options.mode ?? 'writeback', engineOptions = r.options.engine): Promise<void> {
  r.source = new CountingSource(r.file);
  if (r.options.missGranule !== undefined) r.source.missGranule = r.options.missGranule;
  r.store = await CacheStore.open({
    paths: r.paths,
    backing: r.source,
    mode,
    blockSize: r.options.blockSize,
    storage: r.options.storage,
    budget: r.options.budget,
    evictionUnit: r.options.evictionUnit,
    flashReserve: r.options.flashReserve ?? 0,
  });
  r.engine = new CacheEngine(r.store, r.source, { autoCommitMs: 0, ...engineOptions });
  const engine = r.engine;
  cleanups.push(() => engine.close());
}

/** Close cleanly, or drop everything as a crashed daemon would, then reopen. */
async function reopen(r: Rig, how: 'close' | 'abandon', engineOptions?: EngineOptions): Promise<void> {
  if (how === 'close') await r.engine.close();
  else await r.store.abandon();
  await attach(r, r.options.mode, engineOptions);
}

/**
 * Reopens the rig's cache over its disk file with the flush batch's one-request copy
 * (writeManyFrom: cache read and disk write in one native job) passed through `hook`, which gets
 * the real copy to run when it lets the batch go on. The tests hold a batch's copy there.
 */
async function reopenWithCopyHook(r: Rig, hook: (copy: () => Promise<void>) => Promise<void>): Promise<void> {
  await r.engine.close();
  const file = r.file;
  const gated: WritableSource = {
    size: file.size,
    id: file.id,
    description: file.description,
    readAt: (buf, position) => file.readAt(buf, position),
    writeAt: (buf, position) => file.writeAt(buf, position),
    writeMany: (buf, pieces) => file.writeMany(buf, pieces),
    sync: () => file.sync(),
    close: async () => undefined,
    writeManyFrom: (from, buf, pieces) => hook(() => file.writeManyFrom(from, buf, pieces)),
  };
  r.store = await CacheStore.open({ paths: r.paths, backing: gated, mode: 'writeback', blockSize: r.options.blockSize });
  r.engine = new CacheEngine(r.store, gated, { autoCommitMs: 0 });
  const engine = r.engine;
  cleanups.push(() => engine.close());
}

function diskBytes(r: Rig): Buffer {
  return readFileSync(r.disk);
}

function sha(buf: Uint8Array): string {
  return createHash('sha256').update(buf).digest('hex');
}

/** The outcome of a call that may throw synchronously or reject. */
async function outcome(fn: () => unknown): Promise<unknown> {
  try {
    await fn();
  } catch (err) {
    return err;
  }
  return undefined;
}

function expectCoded(err: unknown, cls: abstract new (...args: never[]) => UlobError, code: string): void {
  expect(err, String(err)).toBeInstanceOf(cls);
  expect((err as UlobError).code).toBe(code);
  expect((err as Error).message).not.toMatch(/\n/);
}

async function waitFor(cond: () => boolean, what: string, ms = 3000): Promise<void> {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Deterministic bytes for a write, different from random disk content with overwhelming odds. */
function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

// --- reads ----------------------------------------------------------------------------------------

describe('reads', () => {
  it('fill a cold cache from the backing, return its bytes, and are served from the cache the second time', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 32 * BS, blockSize: BS });
    const got = await r.engine.read(5000, 20000);
    expect(got.equals(r.initial.subarray(5000, 25000))).toBe(true);
    // Only the blocks touched were read: 1..6, as whole blocks.
    expect(r.source.reads.every(([pos, len]) => pos % BS === 0 && len % BS === 0)).toBe(true);
    expect(r.source.readBytes).toBe(6 * BS);
    expect(r.engine.stats().stagedBlocks).toBe(6);
    r.source.reset();
    expect((await r.engine.read(5000, 20000)).equals(got)).toBe(true);
    expect((await r.engine.read(BS, 6 * BS - 1)).equals(r.initial.subarray(BS, 7 * BS - 1))).toBe(true);
    await r.engine.flush();
    expect(r.engine.stats()).toMatchObject({ presentBlocks: 6, stagedBlocks: 0, dirtyBlocks: 0 });
    expect((await r.engine.read(5000, 20000)).equals(got)).toBe(true);
    expect(r.source.reads).toEqual([]);
    // The rest of the disk: only the missing blocks are fetched.
    expect((await r.engine.read(0, r.engine.size)).equals(r.initial)).toBe(true);
    expect(r.source.readBytes).toBe(26 * BS);
    for (const [pos, len] of r.source.reads) expect(pos >= 7 * BS || pos + len <= BS).toBe(true);
    expect(r.source.writes).toEqual([]);
  });

  it("without a budget, a source's missGranule makes a miss fill its aligned granule, and only the blocks of it still missing", async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 62 * BS, blockSize: BS, missGranule: 16 * KiB });
    const expectRead = async (offset: number, length: number) =>
      expect((await r.engine.read(offset, length)).equals(r.initial.subarray(offset, offset + length))).toBe(true);
    await expectRead(37 * BS + 100, 200); // a miss in block 37: blocks 36-39 come in one read
    await expectRead(38 * BS, 2 * BS); // hits in that granule
    await r.engine.write(41 * BS, Buffer.alloc(BS, 7)); // block 41 dirty (wholly written, never read)
    await expectRead(42 * BS, 10); // granule 40-43: 40 and 42-43 fetched, dirty 41 left alone
    await expectRead(59 * BS, 2 * BS); // across two granules: 56-61, the second cut at the disk's end
    expect(r.source.reads).toEqual([
      [36 * BS, 4 * BS],
      [40 * BS, BS],
      [42 * BS, 2 * BS],
      [56 * BS, 6 * BS],
    ]);
    expect((await r.engine.read(41 * BS, BS)).equals(Buffer.alloc(BS, 7))).toBe(true);
    expect(r.engine.stats()).toMatchObject({ readMisses: 3 });
  });

  it('keep present blocks across a clean close and reopen: no backing reads for them', async () => {
    const BS = 8 * KiB;
    const r = await rig({ size: 20 * BS, blockSize: BS });
    await r.engine.read(0, r.engine.size);
    await reopen(r, 'close');
    expect(r.store.recoveredFromCrash).toBe(false);
    expect(r.store.present.count()).toBe(20);
    expect((await r.engine.read(0, r.engine.size)).equals(r.initial)).toBe(true);
    expect(r.source.reads).toEqual([]);
  });
});

// --- writes and write-back ------------------------------------------------------------------------

describe('writes', () => {
  it('land in the cache and leave the backing alone until flushDirty, which makes it equal to the device', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 40 * BS, blockSize: BS });
    const model = Buffer.from(r.initial);
    const before = sha(diskBytes(r));
    const writes: [number, Buffer][] = [
      [0, pattern(BS, 1)], // whole missing block
      [3 * BS + 100, pattern(200, 2)], // part of a missing block
      [10 * BS - 7, pattern(2 * BS + 14, 3)], // blocks 9..12, partial at both ends
      [20 * BS, pattern(5 * BS, 4)], // several whole blocks
    ];
    await r.engine.read(30 * BS, 2 * BS);
    await r.engine.flush();
    writes.push([30 * BS + 1, pattern(BS, 5)]); // into present clean blocks
    for (const [off, data] of writes) {
      await r.engine.write(off, data);
      data.copy(model, off);
    }
    expect((await r.engine.read(0, r.engine.size)).equals(model)).toBe(true);
    await r.engine.flush();
    // FLUSH is satisfied on flash: the backing has not been written or synced.
    expect(r.source.writes).toEqual([]);
    expect(r.source.syncs).toBe(0);
    expect(sha(diskBytes(r))).toBe(before);
    const dirty = r.engine.stats().dirtyBlocks;
    expect(dirty).toBe(1 + 1 + 4 + 5 + 2);

    const result = await flushDirty(r.engine);
    expect(result).toMatchObject({ blocks: dirty, cleaned: dirty, kept: 0, bytes: dirty * BS });
    expect(diskBytes(r).equals(model)).toBe(true);
    expect(r.engine.stats().dirtyBlocks).toBe(0);
    expect(r.source.syncs).toBeGreaterThan(0);
    // Every backing write was inside a dirty block.
    for (const [pos, len] of r.source.writes) expect(pos % BS === 0 && (len % BS === 0 || pos + len === r.engine.size)).toBe(true);
    // And the clean state is durable.
    await reopen(r, 'abandon');
    expect(r.store.dirty.count()).toBe(0);
    expect(r.store.info.flushEpoch).toBe(1);
  });

  it('keep the rest of a missing block when only part of it is written', async () => {
    const BS = 64 * KiB;
    const r = await rig({ size: 8 * BS, blockSize: BS });
    const off = 2 * BS + 30000;
    const data = pattern(4 * KiB, 9);
    await r.engine.write(off, data);
    // The block was fetched once, whole, to keep its other 60 KiB.
    expect(r.source.reads).toEqual([[2 * BS, BS]]);
    const model = Buffer.from(r.initial);
    data.copy(model, off);
    expect((await r.engine.read(2 * BS, BS)).equals(model.subarray(2 * BS, 3 * BS))).toBe(true);
    await r.engine.flush();
    await reopen(r, 'abandon');
    expect((await r.engine.read(2 * BS, BS)).equals(model.subarray(2 * BS, 3 * BS))).toBe(true);
    expect(r.source.reads).toEqual([]);
    await flushDirty(r.engine);
    expect(diskBytes(r).equals(model)).toBe(true);
  });

  it('handle the short last block of a disk that is not a whole number of blocks', async () => {
    const BS = 16 * KiB;
    const size = 5 * BS + 5000; // not a multiple of 4 KiB either
    const r = await rig({ size, blockSize: BS });
    expect(r.engine.geometry.blockCount).toBe(6);
    expect(statSync(r.paths.cache).size).toBe(5 * BS + 8192);
    expect((await r.engine.read(size - 100, 100)).equals(r.initial.subarray(size - 100))).toBe(true);
    expect(r.source.reads).toEqual([[5 * BS, 5000]]);
    expect((await r.engine.read(size - 1, 1))[0]).toBe(r.initial[size - 1]);
    expect((await r.engine.read(size, 0)).byteLength).toBe(0);
    const model = Buffer.from(r.initial);
    const tail = pattern(10, 11);
    await r.engine.write(size - 10, tail);
    tail.copy(model, size - 10);
    // The whole short block written at once is a whole-block write: no fill needed.
    const r2 = await rig({ size, blockSize: BS });
    const whole = pattern(5000, 12);
    await r2.engine.write(5 * BS, whole);
    expect(r2.source.reads).toEqual([]);
    const model2 = Buffer.from(r2.initial);
    whole.copy(model2, 5 * BS);

    for (const [x, m] of [
      [r, model],
      [r2, model2],
    ] as const) {
      expect((await x.engine.read(0, size)).equals(m)).toBe(true);
      const res = await flushDirty(x.engine);
      expect(res.bytes).toBe(5000);
      // Written back without growing the disk.
      expect(statSync(x.disk).size).toBe(size);
      expect(diskBytes(x).equals(m)).toBe(true);
      expect(x.engine.stats().dirtyBlocks).toBe(0);
    }
  });

  it('FUA and FLUSH make written and filled blocks durable across a crash of the daemon', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 16 * BS, blockSize: BS });
    const model = Buffer.from(r.initial);
    const a = pattern(BS, 21);
    const b = pattern(1000, 22);
    await r.engine.write(3 * BS, a, { fua: true }); // whole missing block
    await r.engine.write(7 * BS + 50, b, { fua: true }); // part of a missing block
    a.copy(model, 3 * BS);
    b.copy(model, 7 * BS + 50);
    await reopen(r, 'abandon');
    expect(r.store.recoveredFromCrash).toBe(true);
    expect([...r.store.dirty.runs()]).toEqual([
      { start: 3, count: 1 },
      { start: 7, count: 1 },
    ]);
    expect((await r.engine.read(3 * BS, 5 * BS)).equals(model.subarray(3 * BS, 8 * BS))).toBe(true);
    // Blocks 4..6 were never cached; 3 and 7 came from the cache.
    expect(r.source.reads).toEqual([[4 * BS, 3 * BS]]);

    // FLUSH: a write and some fills, then one flush, then a crash.
    const c = pattern(2 * BS, 23);
    await r.engine.write(10 * BS, c);
    c.copy(model, 10 * BS);
    await r.engine.read(12 * BS, 2 * BS);
    await r.engine.flush();
    await reopen(r, 'abandon');
    expect(r.store.recoveredFromCrash).toBe(true);
    expect(r.store.dirty.allSet(10, 12)).toBe(true);
    expect(r.store.present.allSet(12, 14)).toBe(true);
    expect((await r.engine.read(10 * BS, 4 * BS)).equals(model.subarray(10 * BS, 14 * BS))).toBe(true);
    expect(r.source.reads).toEqual([]);
    expect(diskBytes(r).equals(r.initial)).toBe(true);

    // A write into a present clean block (12) is recorded dirty before it is acknowledged, so a
    // crash cannot leave the new bytes in a block that looks clean and is never written back.
    const d = pattern(300, 24);
    await r.engine.write(12 * BS + 10, d, { fua: true });
    d.copy(model, 12 * BS + 10);
    await reopen(r, 'abandon');
    expect(r.store.dirty.get(12)).toBe(true);
    await flushDirty(r.engine);
    expect(diskBytes(r).equals(model)).toBe(true);
  });

  it('are refused in read-only mode, changing nothing', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 16 * BS, blockSize: BS, mode: 'readonly' });
    expect(r.engine.readOnly).toBe(true);
    await r.engine.read(0, 4 * BS);
    await r.engine.flush();
    const stats = r.engine.stats();
    const cacheBefore = sha(readFileSync(r.paths.cache));
    for (const [off, len] of [
      [0, BS],
      [8 * BS + 3, 100],
    ]) {
      const err = await outcome(() => r.engine.write(off!, pattern(len!, 31), { fua: true }));
      expectCoded(err, ReadOnlyError, 'ULOB_E_READ_ONLY');
      expect((err as Error).message).toContain(r.disk);
    }
    expect(r.engine.stats()).toEqual(stats);
    expect(sha(readFileSync(r.paths.cache))).toBe(cacheBefore);
    expect(r.source.writes).toEqual([]);
    expect(r.source.readBytes).toBe(4 * BS);
    expect(diskBytes(r).equals(r.initial)).toBe(true);
    expect((await r.engine.read(0, r.engine.size)).equals(r.initial)).toBe(true);
  });
});

// --- counts before the commit ----------------------------------------------------------------

describe('dirty and cached counts of blocks staged for the next commit', () => {
  it('count writes at once, before the commit records them (detach, flush and --dirty-max read them), and stay equal after it', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 16 * BS, blockSize: BS });
    // Blocks 0..3 written whole while missing: staged dirty, the store knows nothing of them yet.
    await r.engine.write(0, pattern(4 * BS, 1));
    // Block 5 filled by a read (staged clean), then written in part: staged dirty.
    await r.engine.read(5 * BS, 10);
    await r.engine.write(5 * BS + 7, pattern(100, 2));
    // Block 6 filled by a read and left clean.
    await r.engine.read(6 * BS, 10);
    expect(r.store.dirty.count()).toBe(0);
    expect(r.engine.stats()).toMatchObject({ stagedBlocks: 6, presentBlocks: 0, cachedBlocks: 6, dirtyBlocks: 5, zeroBlocks: 0 });
    expect(r.engine.dirtyBlocks()).toBe(5);
    expect(r.engine.dirtyDataBlocks()).toBe(5);
    await r.engine.flush();
    expect(r.engine.stats()).toMatchObject({ stagedBlocks: 0, presentBlocks: 6, cachedBlocks: 6, dirtyBlocks: 5, zeroBlocks: 0 });
    expect(r.engine.dirtyBlocks()).toBe(5);
    expect(r.engine.dirtyDataBlocks()).toBe(5);
  });

  it('a long fill staged by range counts as cached before its commit, and a block written out of it as dirty', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 256 * BS, blockSize: BS });
    // 128 blocks: a range-staged fill (rangeFillBlocks), not 128 Map entries.
    await r.engine.prefetch(0, 128 * BS);
    expect(r.engine.stats()).toMatchObject({ stagedBlocks: 128, presentBlocks: 0, cachedBlocks: 128, dirtyBlocks: 0 });
    await r.engine.write(3 * BS + 1, pattern(10, 4));
    expect(r.engine.stats()).toMatchObject({ stagedBlocks: 128, presentBlocks: 0, cachedBlocks: 128, dirtyBlocks: 1 });
    await r.engine.flush();
    expect(r.engine.stats()).toMatchObject({ stagedBlocks: 0, presentBlocks: 128, cachedBlocks: 128, dirtyBlocks: 1 });
  });

  it('a whole-block write into zeroed blocks holds data before its commit: dirty as before, zeroed no more', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 16 * BS, blockSize: BS });
    await r.engine.zero(0, 8 * BS);
    expect(r.engine.stats()).toMatchObject({ dirtyBlocks: 8, zeroBlocks: 8, cachedBlocks: 0 });
    expect(r.engine.dirtyDataBlocks()).toBe(0);
    await r.engine.write(2 * BS, pattern(3 * BS, 3));
    expect(r.engine.stats()).toMatchObject({ stagedBlocks: 3, dirtyBlocks: 8, zeroBlocks: 5, cachedBlocks: 3 });
    expect(r.engine.dirtyBlocks()).toBe(8);
    expect(r.engine.dirtyDataBlocks()).toBe(3);
    await r.engine.flush();
    expect(r.engine.stats()).toMatchObject({ stagedBlocks: 0, dirtyBlocks: 8, zeroBlocks: 5, cachedBlocks: 3, presentBlocks: 3 });
    expect(r.engine.dirtyDataBlocks()).toBe(3);
  });
});

// --- TRIM and WRITE_ZEROES --------------------------------------------------------------------

describe('discard (TRIM) and zero (WRITE_ZEROES)', () => {
  it('read back zeros at once, for clean, dirty and missing blocks and the parts of blocks at the ends; the disk gets zeros at the next flush', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 24 * BS - 1000, blockSize: BS });
    const model = Buffer.from(r.initial);
    await r.engine.read(0, 8 * BS);
    const d = pattern(2 * BS, 41);
    await r.engine.write(5 * BS, d);
    d.copy(model, 5 * BS);
    await r.engine.flush();
    expect(r.engine.stats()).toMatchObject({ presentBlocks: 8, dirtyBlocks: 2, zeroBlocks: 0 });

    // [BS - 1, 4 * BS + 1): blocks 1..3 whole, a byte of block 0 and of block 4.
    await r.engine.discard(BS - 1, 3 * BS + 2);
    model.fill(0, BS - 1, 4 * BS + 1);
    // Over dirty blocks 5..6 and missing ones up to the short last block.
    await r.engine.zero(5 * BS + 100, r.engine.size - 5 * BS - 100);
    model.fill(0, 5 * BS + 100);
    expect((await r.engine.read(0, r.engine.size)).equals(model)).toBe(true);
    // Whole zeroed blocks are dirty, not present; the edges are written (blocks 0, 4, 5 dirty).
    expect([...r.store.dirty.runs()]).toEqual([{ start: 0, count: 24 }]);
    expect([...r.store.present.runs()]).toEqual([{ start: 0, count: 1 }, { start: 4, count: 2 }]);
    expect(r.engine.stats().zeroBlocks).toBe(21);

    // Durable when it resolves (the edges at the FLUSH), without another FLUSH for whole blocks.
    await r.engine.flush();
    await reopen(r, 'abandon');
    expect((await r.engine.read(0, r.engine.size)).equals(model)).toBe(true);

    const { bytes } = await flushDirty(r.engine);
    expect(bytes).toBe(r.engine.size);
    expect(diskBytes(r).equals(model)).toBe(true);
    expect(r.engine.stats()).toMatchObject({ dirtyBlocks: 0, zeroBlocks: 0 });
    await reopen(r, 'abandon');
    expect((await r.engine.read(0, r.engine.size)).equals(model)).toBe(true);
  });

  it('a write into part of a zeroed block keeps zeros around it; a whole-block write replaces them', async () => {
    const BS = 8 * KiB;
    const r = await rig({ size: 8 * BS, blockSize: BS });
    const model = Buffer.from(r.initial);
    await r.engine.zero(0, 8 * BS);
    model.fill(0);
    const a = pattern(100, 7);
    await r.engine.write(BS + 50, a);
    a.copy(model, BS + 50);
    const b = pattern(BS, 8);
    await r.engine.write(3 * BS, b);
    b.copy(model, 3 * BS);
    expect((await r.engine.read(0, 8 * BS)).equals(model)).toBe(true);
    await r.engine.flush();
    expect(r.engine.stats()).toMatchObject({ zeroBlocks: 6, presentBlocks: 2, dirtyBlocks: 8 });
    await reopen(r, 'abandon');
    expect((await r.engine.read(0, 8 * BS)).equals(model)).toBe(true);
    await flushDirty(r.engine);
    expect(diskBytes(r).equals(model)).toBe(true);
  });

  it('are refused in read-only mode, changing nothing', async () => {
    const r = await rig({ size: 64 * KiB, blockSize: 4 * KiB, mode: 'readonly' });
    expectCoded(await outcome(() => r.engine.discard(0, 8 * KiB)), ReadOnlyError, 'ULOB_E_READ_ONLY');
    expectCoded(await outcome(() => r.engine.zero(0, 8 * KiB)), ReadOnlyError, 'ULOB_E_READ_ONLY');
    expect((await r.engine.read(0, 64 * KiB)).equals(r.initial)).toBe(true);
  });
});

// --- the cache budget ----------------------------------------------------------------------------

/** What the filesystem charges for the cache file now. */
function held(r: Rig): number {
  return statSync(r.paths.cache).blocks * 512;
}

describe('a cache budget', () => {
  const BS = 4 * KiB;
  const UNIT = 16 * KiB;

  it('holds a disk 4x its size: the cache file never passes the budget plus a unit, every byte read is right, a miss fills its whole unit', async () => {
    const r = await rig({ size: 256 * BS, blockSize: BS, budget: 64 * BS, evictionUnit: UNIT });
    let x = 7;
    for (let i = 0; i < 300; i++) {
      x = (x * 1103515245 + 12345) >>> 0;
      const offset = x % (r.engine.size - 3 * BS);
      const length = 1 + (x % (3 * BS));
      expect((await r.engine.read(offset, length)).equals(r.initial.subarray(offset, offset + length))).toBe(true);
      if (i % 10 === 0) await r.engine.flush();
      expect(held(r)).toBeLessThanOrEqual(64 * BS + UNIT);
    }
    // A miss reads its whole unit; only blocks left behind by an eviction (a read in flight pinned
    // them) make a fill start inside a unit.
    let inside = 0;
    for (const [pos, len] of r.source.reads) {
      if (pos % UNIT !== 0) inside++;
      expect(len % BS).toBe(0);
    }
    expect(inside).toBeLessThanOrEqual(r.source.reads.length / 10);
    const s = r.engine.stats();
    expect(s.evictedBlocks).toBeGreaterThan(0);
    expect(s.readMisses).toBeGreaterThan(0);
    expect(s.readHits).toBeGreaterThan(0);
    expect(s.usedBytes).toBeLessThanOrEqual(64 * BS);
    // A clean close and reopen keeps what is present, within the budget.
    await reopen(r, 'close');
    expect(held(r)).toBeLessThanOrEqual(64 * BS + UNIT);
    expect((await r.engine.read(0, r.engine.size)).equals(r.initial)).toBe(true);
  });

  it('a miss that finds the disk idle fills its whole unit; misses while it is busy fill their granule', async () => {
    const unit = 64 * KiB;
    const r = await rig({ size: 256 * BS, blockSize: BS, budget: 64 * BS, evictionUnit: unit, engine: { fillGranuleBytes: 16 * KiB, diskIdleMs: 1000 } });
    const readBlock = async (b: number) => expect((await r.engine.read(b * BS + 100, 200)).equals(r.initial.subarray(b * BS + 100, b * BS + 300))).toBe(true);
    await readBlock(5); // the first miss: the disk was idle
    await readBlock(37); // right after: busy, the aligned 16 KiB around block 37
    await readBlock(38); // a hit in that granule
    await new Promise((resolve) => setTimeout(resolve, 1100));
    await readBlock(70); // idle again
    expect(r.source.reads).toEqual([
      [0, unit],
      [36 * BS, 16 * KiB],
      [64 * BS, unit],
    ]);
    expect(r.engine.stats()).toMatchObject({ readMisses: 3, readHits: 1 });
  });

  it('busy misses whose neighbours go unread fill only what they ask; once neighbours are read again, the granule comes back', async () => {
    // 4096 blocks of 4 KiB, a 16 KiB granule (3 neighbours a miss), the disk never idle.
    const r = await rig({ size: 4096 * BS, blockSize: BS, budget: 2048 * BS, evictionUnit: 64 * KiB, engine: { fillGranuleBytes: 16 * KiB, diskIdleMs: 3_600_000 } });
    const readBlock = async (b: number) => expect((await r.engine.read(b * BS, BS)).equals(r.initial.subarray(b * BS, (b + 1) * BS))).toBe(true);
    await readBlock(4095); // the first miss of a rig counts as idle: a whole unit, out of the way
    r.source.reads.length = 0;
    // Scattered: one block in every other granule; no neighbour is ever read.
    for (let i = 0; i < 500; i++) await readBlock(i * 8);
    const sizes = r.source.reads.map(([, len]) => len);
    // At first (no evidence) the granule; once 512 neighbours went unread (171 misses), 4 KiB alone.
    expect(sizes.slice(0, 100).every((len) => len === 16 * KiB)).toBe(true);
    expect(sizes.slice(200).every((len) => len === BS)).toBe(true);
    // Local again: blocks read in order from block 4001 on, 4 per granule (a different phase
    // from the scattered reads' granules). The first misses ask alone; their neighbours' misses
    // are the evidence, and whole granules come back.
    r.source.reads.length = 0;
    const hitsBefore = r.engine.stats().readHits;
    for (let b = 2049; b < 2049 + 4 * 200; b++) await readBlock(b);
    const local = r.source.reads.map(([, len]) => len);
    // (Every 8th block is here from the scattered reads: a granule fill then reads 3 blocks, not 4.)
    expect(local.slice(-100).every((len) => len > BS)).toBe(true);
    // 800 blocks in 200 granules: at most 200 misses of one block before the granule came back
    // (it took 184: the ring still held the scattered reads' unread neighbours, which count).
    expect(local.length).toBeLessThan(200 + 200);
    // Every local read that did not go to the disk was a hit.
    expect(r.engine.stats().readHits - hitsBefore).toBe(800 - local.length);
  });

  it('writes 3x the budget: they wait for a flush (onSpacePressure) and never fail; the disk ends equal to the device', async () => {
    const r = await rig({ size: 256 * BS, blockSize: BS, budget: 64 * BS, evictionUnit: UNIT });
    let flushes = 0;
    r.engine.onSpacePressure = async () => {
      flushes++;
      await flushDirty(r.engine);
    };
    const model = Buffer.from(r.initial);
    for (let i = 0; i < 48; i++) {
      const d = pattern(4 * BS + 100, i);
      const offset = ((i * 37) % 60) * 4 * BS + 50;
      await r.engine.write(offset, d);
      d.copy(model, offset);
      expect(held(r)).toBeLessThanOrEqual(64 * BS + UNIT);
    }
    expect(flushes).toBeGreaterThan(0);
    expect((await r.engine.read(0, r.engine.size)).equals(model)).toBe(true);
    await flushDirty(r.engine);
    expect(diskBytes(r).equals(model)).toBe(true);
    expect(r.engine.stats().spaceError).toBeNull();
  });

  it('with nothing to flush it, a write that finds the budget full of dirty data fails with CacheFullError; the engine goes on', async () => {
    const r = await rig({ size: 256 * BS, blockSize: BS, budget: 64 * BS, evictionUnit: UNIT });
    await r.engine.write(0, pattern(64 * BS, 1));
    const err = await outcome(() => r.engine.write(100 * BS, pattern(BS, 2)));
    expectCoded(err, CacheFullError, 'ULOB_E_CACHE_FULL');
    expect((err as Error).message).toMatch(/full of dirty data .*--flush/);
    expect(r.engine.stats().spaceError).toMatch(/full of dirty data/);
    // Writes into dirty blocks need no room; after a flush there is room again.
    await r.engine.write(BS, pattern(BS, 3));
    await flushDirty(r.engine);
    await r.engine.write(100 * BS, pattern(BS, 2));
    expect((await r.engine.read(100 * BS, BS)).equals(pattern(BS, 2))).toBe(true);
  });

  it('a read of a block being evicted gets its data, never the punched hole: the punch waits for reads in flight', async () => {
    // The cache file's reads wait at a gate while it is closed.
    let gate: Promise<void> | null = null;
    let open!: () => void;
    let readsWaiting = 0;
    const storage: Storage = {
      ...posixStorage,
      async open(path, options) {
        const file = await posixStorage.open(path, options);
        if (!path.endsWith('/cache')) return file;
        return {
          ...bindFile(file),
          async read(buf, pos) {
            if (gate) {
              readsWaiting++;
              await gate;
              readsWaiting--;
            }
            return file.read(buf, pos);
          },
        };
      },
    };
    const r: Rig = await rig({ size: 64 * BS, blockSize: BS, budget: 16 * BS, evictionUnit: UNIT, storage });
    await r.engine.read(0, UNIT);
    await r.engine.flush();
    gate = new Promise((resolve) => (open = resolve));
    const reading = r.engine.read(0, BS);
    await waitFor(() => readsWaiting === 1, 'the read to reach the cache file');
    const evicting = r.engine.evict(4);
    // The eviction clears the present bits at once but holds its punch while the read waits.
    await waitFor(() => !r.store.present.get(0), 'the present bits to clear');
    await new Promise((resolve) => setTimeout(resolve, 50));
    gate = null;
    open();
    expect((await reading).equals(r.initial.subarray(0, BS))).toBe(true);
    expect(await evicting).toBe(4);
    expect(held(r)).toBe(0);
  });

  it('a smaller budget at the next attach evicts before the open returns; one below the dirty data is refused, changing nothing', async () => {
    const r = await rig({ size: 256 * BS, blockSize: BS, budget: 64 * BS, evictionUnit: UNIT });
    await r.engine.read(0, 48 * BS);
    await r.engine.write(100 * BS, pattern(12 * BS, 4));
    await r.engine.close();
    r.options.budget = 32 * BS;
    await attach(r);
    expect(r.store.budget).toBe(32 * BS);
    expect(held(r)).toBeLessThanOrEqual(32 * BS + UNIT);
    expect(r.engine.stats().dirtyBlocks).toBe(12);
    await r.engine.close();

    const before = statSync(r.paths.metadata).mtimeMs;
    r.options.budget = 8 * BS;
    const err = await outcome(() => attach(r));
    expectCoded(err, InvalidArgumentError, 'ULOB_E_INVALID_ARG');
    expect((err as Error).message).toMatch(/smaller than the 48 KiB of dirty data .*flush first/);
    expect(statSync(r.paths.metadata).mtimeMs).toBe(before);
    // Without --cache-size the cache keeps its own budget.
    r.options.budget = undefined;
    await attach(r);
    expect(r.store.budget).toBe(32 * BS);
  });

  it('a full mirror given a budget at the next attach (README: --cache-size again) evicts to it at open, gives the flash back, and writes past the budget finish', async () => {
    // No budget: a full, preallocated mirror. The whole disk is read into it, some of it written.
    // The mirror's eviction unit is the default 256 KiB (64 blocks); the budget is 4 of them.
    const BLOCKS = 1024;
    const BUDGET = 256;
    const MIRROR_UNIT = 256 * KiB;
    const r = await rig({ size: BLOCKS * BS, blockSize: BS });
    expect((await r.engine.read(0, r.engine.size)).equals(r.initial)).toBe(true);
    const model = Buffer.from(r.initial);
    const first = pattern(4 * BS, 9);
    await r.engine.write(8 * BS, first);
    first.copy(model, 8 * BS);
    await flushDirty(r.engine);
    await r.engine.close();
    expect(held(r)).toBeGreaterThanOrEqual(BLOCKS * BS);

    r.options.budget = BUDGET * BS;
    await attach(r);
    expect(r.store.budget).toBe(BUDGET * BS);
    // The mirror is evicted down to the budget before the device is served, and its flash given back.
    expect(r.store.usedBlocks).toBeLessThanOrEqual(BUDGET);
    // What went is counted apart (the daemon says it once; newuser8: status said "evicted 1.8 MiB").
    expect(r.store.shrunkBlocks).toBe(BLOCKS - r.store.usedBlocks);
    expect(held(r)).toBeLessThanOrEqual(BUDGET * BS + MIRROR_UNIT);
    let flushes = 0;
    // One flush at a time, a second caller joining the running one, as the daemon's scheduler does.
    let running: Promise<unknown> | null = null;
    r.engine.onSpacePressure = () => {
      flushes++;
      running ??= flushDirty(r.engine).finally(() => (running = null));
      return running;
    };
    // Twice the budget of new writes: they evict clean blocks and wait for flushes, never for ever.
    for (let i = 0; i < 32; i++) {
      const d = pattern(16 * BS, 100 + i);
      const offset = ((i * 37) % 63) * 16 * BS;
      await r.engine.write(offset, d);
      d.copy(model, offset);
      expect(held(r)).toBeLessThanOrEqual(BUDGET * BS + MIRROR_UNIT);
    }
    expect(flushes).toBeLessThan(100);
    expect((await r.engine.read(0, r.engine.size)).equals(model)).toBe(true);
    await flushDirty(r.engine);
    expect(diskBytes(r).equals(model)).toBe(true);
    expect(r.engine.stats().spaceError).toBeNull();
  }, 20_000);

  it('after a crash, fills that were never committed are punched at the next open', async () => {
    const r = await rig({ size: 256 * BS, blockSize: BS, budget: 128 * BS, evictionUnit: UNIT });
    await r.engine.read(0, 32 * BS);
    await r.engine.flush();
    await r.engine.read(64 * BS, 64 * BS);
    expect(held(r)).toBeGreaterThanOrEqual(96 * BS);
    // A commit may catch some of the second read's fills before the crash (timing: a slow machine
    // lets it run); what counts is that the ones still staged are punched, not kept as leftovers.
    const committed = r.store.space().presentBlocks;
    expect(r.engine.stats().stagedBlocks).toBeGreaterThanOrEqual(32);
    await reopen(r, 'abandon');
    expect(r.store.recoveredFromCrash).toBe(true);
    expect(r.store.space().presentBlocks).toBe(committed);
    expect(held(r)).toBeLessThanOrEqual(committed * BS + UNIT);
    expect((await r.engine.read(0, r.engine.size)).equals(r.initial)).toBe(true);
  });

  it('a smaller budget after a crash counts the uncommitted fills it punches in what it says it let go (newuser12)', async () => {
    const r = await rig({ size: 256 * BS, blockSize: BS, budget: 128 * BS, evictionUnit: UNIT });
    await r.engine.read(0, 64 * BS);
    await r.engine.flush();
    await r.engine.read(128 * BS, 64 * BS);
    expect(r.engine.stats().stagedBlocks).toBeGreaterThanOrEqual(32);
    const before = held(r);
    r.options.budget = 16 * BS;
    await reopen(r, 'abandon');
    expect(r.store.recoveredFromCrash).toBe(true);
    // The cache file went from `before` to `held(r)`: all of it is in the count, not just the
    // committed blocks evicted to fit (20.5 MiB said for 32 MiB gone, at the new user's).
    const gone = r.store.shrunkBlocks + r.store.droppedBlocks;
    // Some staged fills may be committed before the crash (timing): those are evicted instead.
    expect(r.store.shrunkBlocks).toBeGreaterThan(0);
    expect(r.store.droppedBlocks).toBeGreaterThan(0);
    expect(Math.abs(gone * BS - (before - held(r)))).toBeLessThanOrEqual(UNIT);
    expect(describeShrink(r.store)).toBe(
      `let go of ${formatBytes(gone * BS)} of cached blocks to fit the cache in its budget of 64 KiB: ` +
        `${formatBytes(r.store.shrunkBlocks * BS)} of clean blocks (reads of them go to the disk again) and ${formatBytes(r.store.droppedBlocks * BS)} the last daemon had not committed when it died`,
    );
    expect((await r.engine.read(0, r.engine.size)).equals(r.initial)).toBe(true);
  });

  it('the uncommitted fills alone bring the cache under a lowered budget: still said (review14)', async () => {
    const r = await rig({ size: 256 * BS, blockSize: BS, budget: 128 * BS, evictionUnit: UNIT });
    await r.engine.read(0, 8 * BS);
    await r.engine.flush();
    await r.engine.read(128 * BS, 96 * BS);
    expect(r.engine.stats().stagedBlocks).toBeGreaterThanOrEqual(64);
    const before = held(r);
    r.options.budget = 64 * BS;
    await reopen(r, 'abandon');
    const gone = r.store.shrunkBlocks + r.store.droppedBlocks;
    expect(r.store.droppedBlocks).toBeGreaterThan(0);
    expect(Math.abs(gone * BS - (before - held(r)))).toBeLessThanOrEqual(UNIT);
    const line = describeShrink(r.store);
    expect(line).toMatch(new RegExp(`^let go of ${formatBytes(gone * BS)} of cached blocks to fit the cache in its budget of 256 KiB: .*${formatBytes(r.store.droppedBlocks * BS)} the last daemon had not committed when it died$`));
    // The same crash with the budget kept: the leftovers go without a word, as at any recovery.
    r.options.budget = undefined;
    await r.engine.read(128 * BS, 32 * BS);
    await reopen(r, 'abandon');
    if (r.store.shrunkBlocks === 0) expect(describeShrink(r.store)).toBeNull();
  });

  it.runIf(process.getuid?.() === 0)('ENOSPC from the flash filesystem (another program filled it) evicts clean blocks and retries; with nothing clean left the write fails with CacheFullError', async () => {
    const mnt = join(dir, 'flash');
    mkdirSync(mnt);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', mnt]);
    cleanups.push(() => execFileSync('umount', ['-l', mnt]));
    const r = await rig({ size: 1024 * BS, blockSize: BS, budget: 192 * BS, evictionUnit: UNIT, cacheDir: mnt });
    await r.engine.read(0, 160 * BS);
    await r.engine.flush();
    // Another program takes what is left of the filesystem, and some more once it is freed.
    const filler = join(mnt, 'filler');
    try {
      execFileSync('dd', ['if=/dev/zero', `of=${filler}`, 'bs=4k', 'count=1024'], { stdio: 'ignore' });
    } catch {
      // ENOSPC: full, as intended
    }
    expect((await r.engine.read(512 * BS, 64 * BS)).equals(r.initial.subarray(512 * BS, 576 * BS))).toBe(true);
    expect(r.engine.stats().evictedBlocks).toBeGreaterThan(0);
    expect(r.engine.stats().spaceError).toMatch(/ran full/);
  });

  it.runIf(process.getuid?.() === 0)('a full flash filesystem and no clean block to evict: the write fails with CacheFullError, saying why', async () => {
    const mnt = join(dir, 'flash');
    mkdirSync(mnt);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', mnt]);
    cleanups.push(() => execFileSync('umount', ['-l', mnt]));
    const r = await rig({ size: 1024 * BS, blockSize: BS, budget: 192 * BS, evictionUnit: UNIT, cacheDir: mnt });
    await r.engine.write(0, pattern(120 * BS, 9));
    await r.engine.flush();
    try {
      execFileSync('dd', ['if=/dev/zero', `of=${join(mnt, 'filler')}`, 'bs=4k', 'count=1024'], { stdio: 'ignore' });
    } catch {
      // ENOSPC: full, as intended
    }
    const err = await outcome(() => r.engine.write(600 * BS, pattern(32 * BS, 10)));
    expectCoded(err, CacheFullError, 'ULOB_E_CACHE_FULL');
    expect((err as Error).message).toMatch(/is full and the cache holds no clean block to give back; free some space/);
    expect(r.engine.stats().spaceError).toMatch(/is full/);
    rmSync(join(mnt, 'filler'));
    await r.engine.write(600 * BS, pattern(32 * BS, 10));
    expect((await r.engine.read(0, 120 * BS)).equals(pattern(120 * BS, 9))).toBe(true);
  });
});


// --- a full filesystem under the metadata ----------------------------------------------------------

describe('a full filesystem under the metadata (SQLITE_FULL)', () => {
  const BS = 4 * KiB;

  /** A 1 MiB tmpfs holding the rig's cache files, and a filler that takes every page left of it. */
  function flash(size = '1m'): { mnt: string; fill: () => void; free: () => void } {
    const mnt = join(dir, 'flash');
    mkdirSync(mnt);
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', mnt]);
    cleanups.push(() => execFileSync('umount', ['-l', mnt]));
    const filler = join(mnt, 'filler');
    return {
      mnt,
      fill: () => {
        try {
          execFileSync('dd', ['if=/dev/zero', `of=${filler}`, 'bs=4k', 'count=1024'], { stdio: 'ignore' });
        } catch {
          // ENOSPC: full, as intended
        }
      },
      free: () => rmSync(filler),
    };
  }

  it.runIf(process.getuid?.() === 0)(
    'with nothing clean to give back, only the write that needs a dirty intent fails (ENOSPC); acked data stays readable, and once space returns writes work again without a re-attach',
    async () => {
      const f = flash();
      const r = await rig({ size: 256 * BS, blockSize: BS, budget: 128 * BS, evictionUnit: BS, cacheDir: f.mnt });
      // Acked, durable dirty data (a FLUSH went through), and one clean present block X.
      const acked = pattern(8 * BS, 21);
      await r.engine.write(0, acked);
      await r.engine.flush();
      const X = 100;
      await r.engine.read(X * BS, BS);
      await r.engine.flush();
      expect(r.engine.stats()).toMatchObject({ dirtyBlocks: 8, presentBlocks: 9 });
      f.fill();
      // The first write into X needs its dirty intent in the metadata, which cannot grow; X itself
      // cannot be given back (its intent is on the way), and every other block is dirty.
      const err = await outcome(() => r.engine.write(X * BS, pattern(BS, 22)));
      expectCoded(err, CacheFullError, 'ULOB_E_METADATA_FULL');
      expect((err as Error).message).toMatch(/cache\.meta: the filesystem holding it is full \(SQLITE_FULL\)/);
      expect(r.engine.stats().spaceError).toMatch(/^the flash filesystem is full: 1 requests failed; free space on it/);
      // Nothing else stopped: acked data reads back, a dirty block takes a rewrite (no intent).
      expect((await r.engine.read(0, 8 * BS)).equals(acked)).toBe(true);
      expect(r.store.failed).toBeNull();
      const rewrite = pattern(BS, 23);
      await r.engine.write(0, rewrite);
      expect((await r.engine.read(X * BS, BS)).equals(r.initial.subarray(X * BS, (X + 1) * BS))).toBe(true);
      // Space comes back: the same write just works, durably.
      f.free();
      const x = pattern(BS, 24);
      await r.engine.write(X * BS, x);
      await r.engine.flush();
      expect(r.engine.stats().spaceError).toMatch(/was full \(1 requests failed\) and has room again/);
      const model = Buffer.from(r.initial);
      acked.copy(model, 0);
      rewrite.copy(model, 0);
      x.copy(model, X * BS);
      await reopen(r, 'close');
      expect(r.store.recoveredFromCrash).toBe(false);
      expect(sha(await r.engine.read(0, r.engine.size))).toBe(sha(model));
      await flushDirty(r.engine);
      expect(sha(diskBytes(r))).toBe(sha(model));
    },
  );

  it.runIf(process.getuid?.() === 0)(
    'a write whose FLUSH could not be recorded and a detach while still full: the next attach keeps every flushed write and drops only that one (newuser10: dirty went down across the re-attach)',
    async () => {
      const f = flash('2m');
      // A full mirror: the cache file is preallocated, so the write itself needs no room.
      const r = await rig({ size: 128 * BS, blockSize: BS, cacheDir: f.mnt });
      const a = pattern(8 * BS, 50);
      await r.engine.write(0, a);
      await r.engine.flush();
      f.fill();
      const b = pattern(8 * BS, 51);
      await r.engine.write(64 * BS, b);
      expectCoded(await outcome(() => r.engine.flush()), CacheFullError, 'ULOB_E_METADATA_FULL');
      // status counts the staged write as dirty, though no FLUSH made it durable.
      expect(r.engine.stats().dirtyBlocks).toBe(16);
      expect((await r.engine.read(64 * BS, 8 * BS)).equals(b)).toBe(true);
      await outcome(() => r.engine.close());
      f.free();
      await attach(r);
      expect(r.engine.stats().dirtyBlocks).toBe(8);
      expect((await r.engine.read(0, 8 * BS)).equals(a)).toBe(true);
      expect((await r.engine.read(64 * BS, 8 * BS)).equals(r.initial.subarray(64 * BS, 72 * BS))).toBe(true);
    },
  );

  it('a kernel frontend: blocks whose clear could not be written after the kernel cleared them are cleared by the next commit (review10 F-1), unless an INTENT took them back first', async () => {
    const r = await rig({ size: 64 * BS, blockSize: BS, budget: 16 * BS, evictionUnit: BS });
    // The "kernel": its own dirty bits; an epoch takes blocks dirty on both sides.
    const kernel = new Bitmap(64);
    let onBegin: (() => void) | null = null;
    r.engine.externalEpochs = {
      begin(flushing) {
        for (let b = 0; b < 64; b++) if (!kernel.get(b)) flushing.clear(b);
        onBegin?.();
        onBegin = null;
      },
      commit(cleaned) {
        for (const run of cleaned.runs()) kernel.clearRange(run.start, run.start + run.count);
      },
    };
    const data = pattern(8 * BS, 60);
    await r.engine.write(0, data);
    kernel.setRange(0, 8);
    await r.engine.flush();
    const clear = r.store.clearFlushed.bind(r.store);
    let calls = 0;
    r.store.clearFlushed = (extents) => {
      if (calls++ === 0) throw new MetadataFullError('cannot write cache.meta: the filesystem holding it is full (SQLITE_FULL); free space on it', { path: 'cache.meta' });
      clear(extents);
    };
    expectCoded(await outcome(() => flushDirty(r.engine)), CacheFullError, 'ULOB_E_METADATA_FULL');
    expect(r.store.dirty.count()).toBe(8);
    expect(kernel.count()).toBe(0);
    // The next flush (room back) takes none of them (the kernel has them clean), and its commit
    // clears them. An INTENT for block 3 arrives after its snapshot (the kernel writes block 3 once
    // answered): block 3 must stay dirty in the store, the other 7 are cleared.
    let intent: Promise<void> | null = null;
    onBegin = () => {
      intent = r.engine.recordDirty([{ start: 3, count: 1 }], { skipDirty: true }).then(() => kernel.set(3));
    };
    await flushDirty(r.engine);
    await intent;
    expect(kernel.get(3)).toBe(true);
    expect([...r.store.dirty.runs()]).toEqual([{ start: 3, count: 1 }]);
    // And the flush after that takes block 3 as usual.
    await flushDirty(r.engine);
    expect(r.store.dirty.count()).toBe(0);
    expect(diskBytes(r).subarray(0, 8 * BS).equals(data)).toBe(true);
    await reopen(r, 'close');
    expect(r.engine.stats().dirtyBlocks).toBe(0);
  });

  it('a TRIM or a flush epoch that waits for the commit of staged blocks fails alone, counted in spaceError, when that commit cannot be written (newuser10b N2)', async () => {
    const r = await rig({ size: 64 * BS, blockSize: BS, budget: 16 * BS, evictionUnit: BS, autoCommitMs: 0 });
    // Block 5 written whole while missing: staged dirty, recorded at the next commit.
    await r.engine.write(5 * BS, pattern(BS, 70));
    const mark = r.store.markDirtyDurable.bind(r.store);
    let calls = 0;
    r.store.markDirtyDurable = (extents) => {
      if (calls++ === 0) return Promise.reject(new MetadataFullError('cannot write cache.meta: the filesystem holding it is full (SQLITE_FULL); free space on it', { path: 'cache.meta' }));
      return mark(extents);
    };
    // A TRIM of block 5 waits for that commit first.
    const err = await outcome(() => r.engine.zero(5 * BS, BS));
    expectCoded(err, CacheFullError, 'ULOB_E_METADATA_FULL');
    expect((err as Error).message).toMatch(/this request failed, the others go on/);
    expect(r.engine.stats().spaceError).toMatch(/^the flash filesystem is full: 1 requests failed/);
    expect((await r.engine.read(5 * BS, BS)).equals(pattern(BS, 70))).toBe(true);
    // So does a flush epoch's start.
    calls = 0;
    expectCoded(await outcome(() => r.engine.beginEpoch()), CacheFullError, 'ULOB_E_METADATA_FULL');
    expect(r.engine.stats().spaceError).toMatch(/^the flash filesystem is full: 2 requests failed/);
    // Room again: the TRIM goes through.
    await r.engine.zero(5 * BS, BS);
    await r.engine.flush();
    expect((await r.engine.read(5 * BS, BS)).equals(Buffer.alloc(BS))).toBe(true);
  });

  it.runIf(process.getuid?.() === 0)('clean blocks are given back to the filesystem and the metadata write tried again: the write succeeds', async () => {
    const f = flash();
    const r = await rig({ size: 256 * BS, blockSize: BS, budget: 128 * BS, evictionUnit: BS, cacheDir: f.mnt });
    await r.engine.read(32 * BS, 64 * BS);
    await r.engine.flush();
    f.fill();
    const model = Buffer.from(r.initial);
    // A first write into a clean block: its dirty intent is a transaction the WAL must grow for.
    const first = pattern(BS, 29);
    await r.engine.write(32 * BS, first);
    first.copy(model, 32 * BS);
    expect(r.engine.stats().spaceError).toMatch(/cache\.meta ran full \(another program filled it\): evicted [0-9.]+ [KM]iB/);
    expect(r.engine.stats().evictedBlocks).toBeGreaterThan(0);
    // More of them (some into blocks just given back: the cache file's own ENOSPC path then).
    for (let i = 1; i < 16; i++) {
      const data = pattern(BS, 30 + i);
      await r.engine.write((32 + i) * BS, data);
      data.copy(model, (32 + i) * BS);
    }
    await r.engine.flush();
    expect(sha(await r.engine.read(0, r.engine.size))).toBe(sha(model));
    f.free();
    await reopen(r, 'close');
    expect(sha(await r.engine.read(0, r.engine.size))).toBe(sha(model));
  });

  it.runIf(process.getuid?.() === 0)('a flush whose commit cannot be written fails and keeps its blocks dirty, reads with no room to cache come from the disk; the next flush, with room, cleans them', async () => {
    const f = flash();
    const r = await rig({ size: 256 * BS, blockSize: BS, budget: 128 * BS, evictionUnit: BS, cacheDir: f.mnt });
    const data = pattern(16 * BS, 40);
    await r.engine.write(0, data);
    await r.engine.flush();
    f.fill();
    const err = await outcome(() => flushDirty(r.engine));
    expectCoded(err, CacheFullError, 'ULOB_E_METADATA_FULL');
    expect(r.engine.stats().dirtyBlocks).toBe(16);
    expect(r.store.failed).toBeNull();
    expect((await r.engine.read(0, 16 * BS)).equals(data)).toBe(true);
    // Reads of blocks with no room to cache them come from the disk, uncached: alone, and mixed
    // with cached (dirty) blocks in one request.
    expect((await r.engine.read(100 * BS + 512, 8 * BS)).equals(r.initial.subarray(100 * BS + 512, 108 * BS + 512))).toBe(true);
    expect((await r.engine.read(8 * BS, 16 * BS)).equals(Buffer.concat([data.subarray(8 * BS), r.initial.subarray(16 * BS, 24 * BS)]))).toBe(true);
    expect(r.engine.stats()).toMatchObject({ presentBlocks: 16, stagedBlocks: 0 });
    f.free();
    await flushDirty(r.engine);
    expect(r.engine.stats().dirtyBlocks).toBe(0);
    expect(diskBytes(r).subarray(0, 16 * BS).equals(data)).toBe(true);
  });

  /**
   * newuser10b N1: a 4 MiB flash filesystem another program filled, a cache holding only dirty
   * blocks (acked by a FLUSH), a flash reserve of 256 KiB, and onSpacePressure flushing as the
   * daemon's scheduler does (recording the reason). The flush is held at its first disk write
   * until `go()`.
   */
  async function allDirtyFull(
    fs: 'tmpfs' | 'ext4' = 'tmpfs',
    engine?: EngineOptions,
  ): Promise<{ r: Rig; f: ReturnType<typeof flash>; model: Buffer; reasons: (string | undefined)[]; go: () => void }> {
    const f = fs === 'tmpfs' ? flash('4m') : ext4Flash();
    const r = await rig({ size: 1024 * BS, blockSize: BS, budget: 512 * BS, evictionUnit: 4 * BS, cacheDir: f.mnt, flashReserve: 256 * KiB, engine });
    expect(r.store.flashReserve!.status()).toEqual({ bytes: 256 * KiB, heldBytes: 256 * KiB, releases: 0 });
    const model = Buffer.from(r.initial);
    const acked = pattern(128 * BS, 70);
    await r.engine.write(0, acked);
    await r.engine.flush();
    acked.copy(model, 0);
    expect(r.engine.stats()).toMatchObject({ dirtyBlocks: 128, presentBlocks: 128 });
    const reasons: (string | undefined)[] = [];
    let go!: () => void;
    r.source.writeGate = new Promise<void>((resolve) => (go = resolve));
    r.engine.onSpacePressure = (reason) => {
      reasons.push(reason);
      return flushDirty(r.engine);
    };
    f.fill();
    return { r, f, model, reasons, go };
  }

  /** An 8 MiB ext4 (4 KiB blocks, loop-mounted) for the rig's cache files, and a filler that takes every block left (root: the reserved ones too). */
  function ext4Flash(): ReturnType<typeof flash> {
    const mnt = join(dir, 'flash');
    const img = join(dir, 'flash.img');
    mkdirSync(mnt);
    writeFileSync(img, Buffer.alloc(0));
    execFileSync('truncate', ['-s', '8M', img]);
    execFileSync('mkfs.ext4', ['-q', '-F', '-b', '4096', '-E', 'nodiscard', img]);
    execFileSync('mount', ['-o', 'loop', img, mnt]);
    cleanups.push(() => execFileSync('umount', [mnt]));
    const filler = join(mnt, 'filler');
    return {
      mnt,
      fill: () => {
        try {
          execFileSync('dd', ['if=/dev/zero', `of=${filler}`, 'bs=4k', 'count=4096', 'conv=fsync'], { stdio: 'ignore' });
        } catch {
          // ENOSPC: full, as intended
        }
      },
      free: () => rmSync(filler),
    };
  }

  it.runIf(process.getuid?.() === 0).each(['tmpfs', 'ext4'] as const)(
    'full flash (%s), only dirty blocks cached (newuser10b N1): writes wait while a flush runs on the flash reserve, reads go on, then every write completes and nothing fails',
    async (fs) => {
      const { r, f, model, reasons, go } = await allDirtyFull(fs);
      // New blocks need room in the cache file, a FLUSH needs room in the metadata: neither has any.
      const fresh = pattern(32 * BS, 71);
      const rewrite = pattern(BS, 72);
      const requests = [
        r.engine.write(512 * BS, fresh).then(() => r.engine.flush()),
        r.engine.write(700 * BS, pattern(BS, 73)),
        r.engine.write(3 * BS, rewrite),
      ];
      const settled = Promise.allSettled(requests);
      await waitFor(() => r.engine.stats().roomFlushes === 1 && r.source.writes.length > 0, 'the room flush to reach the disk');
      // The reserve is released for the flush; the writes wait (back-pressure), reads go on.
      const during = r.engine.stats();
      expect(during.flashReserve).toMatchObject({ heldBytes: 0, releases: 1 });
      expect(during.roomWaiters).toBeGreaterThan(0);
      expect(during.spaceError).toMatch(/is full and the cache holds only dirty blocks \(.*\): flushing them to the disk \(reason room\) on the flash reserve; writes that need room wait$/);
      expect((await r.engine.read(64 * BS, 64 * BS)).equals(model.subarray(64 * BS, 128 * BS))).toBe(true);
      go();
      const outcomes = await settled;
      expect(outcomes.map((o) => (o.status === 'rejected' ? String(o.reason) : 'ok'))).toEqual(['ok', 'ok', 'ok']);
      fresh.copy(model, 512 * BS);
      pattern(BS, 73).copy(model, 700 * BS);
      rewrite.copy(model, 3 * BS);
      await r.engine.flush();
      const after = r.engine.stats();
      expect(reasons).toContain('room');
      expect(after.failedRequests).toBe(0);
      expect(after.roomWaiters).toBe(0);
      // The room flush's line, or, when a later write met the still-full flash and evicted what
      // that flush made clean (timing: the writes retry while it commits), the eviction's line.
      expect(after.spaceError).toMatch(/ran full (with only dirty blocks cached: flushed them to the disk \(reason room\) and evicted|\(another program filled it\): evicted)/);
      // The reserve is taken back from what the flush made clean, with the flash still full.
      await waitFor(() => r.store.flashReserve!.heldBytes === 256 * KiB, 'the reserve to be taken back');
      expect((await r.engine.read(0, r.engine.size)).equals(model)).toBe(true);
      f.free();
      await reopen(r, 'close');
      expect(sha(await r.engine.read(0, r.engine.size))).toBe(sha(model));
      await flushDirty(r.engine);
      expect(sha(diskBytes(r))).toBe(sha(model));
    },
  );

  it.runIf(process.getuid?.() === 0)(
    "full flash, only dirty blocks cached: a flush asked for by hand ('flush --wait', newuser10b: rc 74 on SQLITE_FULL) commits on the flash reserve, and the reserve is taken back from the blocks it cleaned",
    async () => {
      const { r, model, go } = await allDirtyFull();
      go();
      const result = await flushDirty(r.engine);
      expect(result.blocks).toBe(128);
      expect(r.engine.stats()).toMatchObject({ dirtyBlocks: 0, failedRequests: 0 });
      expect(r.store.flashReserve!.status().releases).toBe(1);
      await waitFor(() => r.store.flashReserve!.heldBytes === 256 * KiB, 'the reserve to be taken back');
      expect(sha(diskBytes(r))).toBe(sha(model));
    },
  );

  it.runIf(process.getuid?.() === 0)(
    'a block rewritten while the flush commit waits for the flash reserve stays dirty (invariant 4): the retried commit leaves it out',
    async () => {
      const { r, model, go } = await allDirtyFull();
      go();
      const reserve = r.store.flashReserve!;
      const release = reserve.release.bind(reserve);
      const newer = pattern(BS, 78);
      // The commit's clearFlushed found the flash full and releases the reserve: a write lands now.
      reserve.release = async () => {
        await r.engine.write(3 * BS, newer);
        return release();
      };
      const result = await flushDirty(r.engine);
      expect(result.blocks).toBe(128);
      expect(r.store.flashReserve!.status().releases).toBe(1);
      expect(r.engine.stats().dirtyBlocks).toBe(1);
      expect(r.store.dirty.get(3)).toBe(true);
      newer.copy(model, 3 * BS);
      expect((await r.engine.read(0, 128 * BS)).equals(model.subarray(0, 128 * BS))).toBe(true);
      await flushDirty(r.engine);
      expect(sha(diskBytes(r))).toBe(sha(model));
    },
  );

  it.runIf(process.getuid?.() === 0)(
    'a room flush that takes longer than roomFlushWaitMs fails the waiting request with one line, counted; the flush goes on and the next write finds room',
    async () => {
      const { r, model, go } = await allDirtyFull('tmpfs', { roomFlushWaitMs: 300 });
      const first = outcome(() => r.engine.write(512 * BS, pattern(8 * BS, 79)));
      await waitFor(() => r.engine.stats().roomFlushes === 1, 'the room flush');
      // A write arriving while it runs waits for it too, with the same bound (review11 R-3).
      const second = outcome(() => r.engine.write(600 * BS, pattern(BS, 81)));
      for (const err of [await first, await second]) {
        expectCoded(err, CacheFullError, 'ULOB_E_CACHE_FULL');
        expect((err as Error).message).toMatch(/^waited 0\.3 s for the flush that makes room on the full flash filesystem( of .*)?; free space on it$/);
      }
      expect(r.engine.stats()).toMatchObject({ failedRequests: 2, roomFlushes: 1 });
      go();
      await waitFor(() => r.engine.stats().dirtyBlocks === 0, 'the room flush to end');
      const later = pattern(8 * BS, 80);
      await r.engine.write(512 * BS, later);
      await r.engine.flush();
      later.copy(model, 512 * BS);
      expect((await r.engine.read(0, r.engine.size)).equals(model)).toBe(true);
      expect(r.engine.stats().failedRequests).toBe(2);
    },
  );

  it.runIf(process.getuid?.() === 0)(
    "full flash, only dirty blocks cached: a kernel's INTENT (/dev/uloopN's first write) waits for the room flush and is recorded, while a BARRIER's record does not wait (review11 R-5 a, R-1)",
    async () => {
      const { r, go } = await allDirtyFull();
      // The INTENT handler's record (src/bdev/upcalls.ts): block 300 is not dirty in the store.
      let recorded = false;
      const intent = outcome(() => r.engine.recordDirty([{ start: 300, count: 1 }], { skipDirty: true, waitForRoom: true }).then(() => (recorded = true)));
      await waitFor(() => r.engine.stats().roomFlushes === 1 && r.source.writes.length > 0, 'the room flush to reach the disk');
      expect(recorded).toBe(false);
      // A BARRIER's record meanwhile: never waits for the flush (it may be what the flush waits
      // for: uloop's beforeEpoch): it is written on the released reserve, or fails, at once.
      const barrier = await Promise.race([outcome(() => r.engine.recordDirty([{ start: 301, count: 1 }])).then(() => 'settled'), new Promise((resolve) => setTimeout(() => resolve('waited'), 3000))]);
      expect(barrier).toBe('settled');
      expect(recorded).toBe(false);
      go();
      expect(await intent).toBeUndefined();
      expect(recorded).toBe(true);
      expect(r.store.dirty.get(300)).toBe(true);
      expect(r.engine.stats().roomWaiters).toBe(0);
    },
  );

  it.runIf(process.getuid?.() === 0)(
    'full flash, only dirty blocks cached, and the disk unreachable: the flush cannot help, so each request that needs room fails with one clear line, counted, and the cache goes on',
    async () => {
      const { r, f, model, go } = await allDirtyFull();
      go();
      const eio = () => Promise.reject(Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO', errno: 5, syscall: 'write' }));
      r.source.writeAt = eio;
      r.file.writeMany = eio;
      r.file.writeManyFrom = eio;
      const errors = await Promise.all([outcome(() => r.engine.write(512 * BS, pattern(8 * BS, 74))), outcome(() => r.engine.write(800 * BS, pattern(BS, 75)))]);
      for (const err of errors) {
        expectCoded(err, CacheFullError, 'ULOB_E_CACHE_FULL');
        expect((err as Error).message).toMatch(/is full, the cache holds only dirty blocks, and the flush that would free room failed: .*; free space on it, or bring the disk back$/);
      }
      const st = r.engine.stats();
      expect(st.failedRequests).toBe(2);
      expect(st.spaceError).toMatch(/the flush that would free room failed/);
      // Nothing else stopped: acked data reads, a dirty block takes a rewrite in place.
      expect(r.store.failed).toBeNull();
      expect((await r.engine.read(0, 128 * BS)).equals(model.subarray(0, 128 * BS))).toBe(true);
      await r.engine.write(5 * BS, pattern(BS, 76));
      pattern(BS, 76).copy(model, 5 * BS);
      // The disk back and space freed: everything works again.
      await reopenAfter(r, f);
      expect(sha(await r.engine.read(0, r.engine.size))).toBe(sha(model));
    },
  );

  it.runIf(process.getuid?.() === 0)(
    'a crash after the flash reserve was released and before the flush commit loses nothing (invariant 2): every acked write is there and still dirty, and the next open takes the reserve again',
    async () => {
      const { r, f, model, go } = await allDirtyFull();
      const pending = outcome(() => r.engine.write(512 * BS, pattern(16 * BS, 77)));
      // The flush has taken the reserve and is writing the disk: its commit is not made.
      await waitFor(() => r.store.flashReserve!.heldBytes === 0 && r.source.writes.length > 0, 'the room flush to write the disk');
      await r.store.abandon();
      go();
      await pending;
      f.free();
      await attach(r);
      expect(r.store.recoveredFromCrash).toBe(true);
      expect(r.store.flashReserve!.status()).toMatchObject({ bytes: 256 * KiB, heldBytes: 256 * KiB });
      expect(r.engine.stats().dirtyBlocks).toBe(128);
      expect((await r.engine.read(0, 128 * BS)).equals(model.subarray(0, 128 * BS))).toBe(true);
      await flushDirty(r.engine);
      // The write in flight at the crash was never acked: either version of its blocks may be there.
      const disk = diskBytes(r);
      expect(disk.subarray(0, 128 * BS).equals(model.subarray(0, 128 * BS))).toBe(true);
    },
  );
});

/** Frees the rig's flash, gives the disk back (writes as before) and reopens the cache. */
async function reopenAfter(r: Rig, f: { free: () => void }): Promise<void> {
  f.free();
  await r.engine.close();
  r.file = await openBacking(r.disk, { writable: true });
  const file = r.file;
  cleanups.push(() => file.close());
  await attach(r);
}

/** A BlockFile's methods bound to it, to override some. */
function bindFile(file: BlockFile): BlockFile {
  return {
    path: file.path,
    read: (b, p) => file.read(b, p),
    write: (b, p) => file.write(b, p),
    sync: () => file.sync(),
    allocate: (l) => file.allocate(l),
    truncate: (l) => file.truncate(l),
    punchHole: (o, l) => file.punchHole(o, l),
    zeroRange: (o, l) => file.zeroRange(o, l),
    allocatedBytes: () => file.allocatedBytes(),
    nextData: (o) => file.nextData(o),
    size: () => file.size(),
    close: () => file.close(),
  };
}

// --- concurrency ----------------------------------------------------------------------------------

type COp =
  | { kind: 'read'; offset: number; length: number }
  | { kind: 'write'; offset: number; length: number; seed: number }
  | { kind: 'flush' }
  | { kind: 'discard'; offset: number; length: number }
  | { kind: 'writeback' };

describe('concurrency', () => {
  it('64 concurrent reads and writes per batch end as a sequential model; reads see old or new bytes', async () => {
    const geometryArb = fc.record({
      blockSize: fc.constantFrom(4 * KiB, 8 * KiB, 16 * KiB),
      blocks: fc.integer({ min: 4, max: 24 }),
      tail: fc.nat({ max: 16 * KiB - 1 }),
    });
    const rangeArb = fc.record({ x: fc.double({ min: 0, max: 1, noNaN: true }), length: fc.integer({ min: 1, max: 40 * KiB }) });
    const opArb = fc.oneof(
      { weight: 6, arbitrary: rangeArb.map((r) => ({ kind: 'read' as const, ...r })) },
      { weight: 6, arbitrary: fc.tuple(rangeArb, fc.nat()).map(([r, seed]) => ({ kind: 'write' as const, ...r, seed })) },
      { weight: 1, arbitrary: fc.constant({ kind: 'flush' as const }) },
      { weight: 1, arbitrary: rangeArb.map((r) => ({ kind: 'discard' as const, ...r })) },
      { weight: 1, arbitrary: fc.constant({ kind: 'writeback' as const }) },
    );
    const batchArb = fc.array(opArb, { minLength: 64, maxLength: 64 });

    await fc.assert(
      fc.asyncProperty(geometryArb, fc.array(batchArb, { minLength: 1, maxLength: 3 }), async (geo, batches) => {
        const size = Math.max(1, geo.blocks * geo.blockSize - (geo.tail % geo.blockSize));
        const r = await rig({ size, blockSize: geo.blockSize });
        const model = Buffer.from(r.initial);
        for (const batch of batches) {
          // Concrete ops: ranges inside the disk; writes that overlap an earlier write of the
          // batch become reads (their order would be unknowable), and one write-back per batch.
          const ops: COp[] = [];
          const written: [number, number][] = [];
          let writeback = false;
          for (const op of batch) {
            if (op.kind === 'flush') ops.push(op);
            else if (op.kind === 'writeback') {
              ops.push(writeback ? { kind: 'flush' } : op);
              writeback = true;
            } else {
              const offset = Math.min(size - 1, Math.floor(op.x * size));
              const length = Math.min(op.length, size - offset);
              // A discard zeroes its range: it changes content as a write does.
              if ((op.kind === 'write' || op.kind === 'discard') && !written.some(([o, l]) => offset < o + l && o < offset + length)) {
                written.push([offset, length]);
                ops.push(op.kind === 'write' ? { kind: 'write', offset, length, seed: op.seed } : { kind: 'discard', offset, length });
              } else ops.push({ kind: 'read', offset, length });
            }
          }
          const before = Buffer.from(model);
          for (const op of ops) {
            if (op.kind === 'write') pattern(op.length, op.seed).copy(model, op.offset);
            if (op.kind === 'discard') model.fill(0, op.offset, op.offset + op.length);
          }
          const results = await Promise.all(
            ops.map(async (op) => {
              switch (op.kind) {
                case 'read':
                  return r.engine.read(op.offset, op.length);
                case 'write':
                  return r.engine.write(op.offset, pattern(op.length, op.seed));
                case 'flush':
                  return r.engine.flush();
                case 'discard':
                  return r.engine.discard(op.offset, op.length);
                case 'writeback':
                  return flushDirty(r.engine);
              }
            }),
          );
          ops.forEach((op, i) => {
            if (op.kind !== 'read') return;
            const got = results[i] as Buffer;
            for (let j = 0; j < op.length; j++) {
              const p: number = op.offset + j;
              if (got[j] !== before[p] && got[j] !== model[p]) {
                expect.fail(`read ${op.offset}+${op.length}: byte ${p} is ${got[j]}, neither old ${before[p]} nor new ${model[p]}`);
              }
            }
          });
        }
        await r.engine.flush();
        expect((await r.engine.read(0, size)).equals(model)).toBe(true);
        await flushDirty(r.engine);
        expect(r.engine.stats().dirtyBlocks).toBe(0);
        expect(diskBytes(r).equals(model)).toBe(true);
        await reopen(r, 'close');
        expect((await r.engine.read(0, size)).equals(model)).toBe(true);
        await r.engine.close();
      }),
      // A failure is shrunk for at most a minute, then reported as it stands.
      { numRuns: 12, interruptAfterTimeLimit: 60_000, markInterruptAsFailure: true },
    );
  }, 120_000);

  it('a write into a block the flusher is copying keeps it dirty; the next flushDirty writes it back', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 16 * BS, blockSize: BS });
    const model = Buffer.from(r.initial);
    const first = pattern(8 * BS, 51);
    await r.engine.write(0, first);
    first.copy(model, 0);
    await r.engine.flush();
    expect(r.engine.stats().dirtyBlocks).toBe(8);

    // Hold the flusher at its first backing write (block 0, one block per write).
    let release!: () => void;
    r.source.writeGate = new Promise<void>((resolve) => (release = resolve));
    let copying!: () => void;
    const atFirstWrite = new Promise<void>((resolve) => (copying = resolve));
    r.source.onWrite = () => copying();
    const flushing = flushDirty(r.engine, { maxIoBytes: BS });
    await atFirstWrite;
    // Rewrite block 0 (being copied), block 5 (not yet copied) and block 12 (not in the epoch).
    const a = pattern(BS, 52);
    const b = pattern(100, 53);
    const c = pattern(BS, 54);
    await r.engine.write(0, a);
    await r.engine.write(5 * BS + 7, b);
    await r.engine.write(12 * BS, c);
    a.copy(model, 0);
    b.copy(model, 5 * BS + 7);
    c.copy(model, 12 * BS);
    r.source.writeGate = null;
    r.source.onWrite = null;
    release();
    const result = await flushing;
    expect(result).toMatchObject({ blocks: 8, cleaned: 6, kept: 2 });
    expect(r.store.dirty.get(0)).toBe(true);
    expect(r.store.dirty.get(5)).toBe(true);
    for (const blk of [1, 2, 3, 4, 6, 7]) expect(r.store.dirty.get(blk)).toBe(false);
    // Block 0 on the disk is the first version: clearing its dirty bit would have lost `a`.
    expect(diskBytes(r).subarray(0, BS).equals(first.subarray(0, BS))).toBe(true);
    // Everything the disk lacks is still dirty (invariant 4).
    await r.engine.flush();
    expectDiskLagsOnlyInDirtyBlocks(r, model);

    const second = await flushDirty(r.engine);
    expect(second.cleaned).toBe(3);
    expect(diskBytes(r).equals(model)).toBe(true);
    expect(r.engine.stats().dirtyBlocks).toBe(0);
  });

  it('a write during a batch copied cache→disk in one request goes ahead, and the disk still gets the epoch version', async () => {
    // A real FileSource has writeManyFrom: the batch's cache read and disk write are one native
    // job. Hold that job before it starts, write into its blocks (the write must not wait for the
    // job), then let it read the new content: the saved epoch version must end up on the disk.
    const BS = 4 * KiB;
    const r = await rig({ size: 16 * BS, blockSize: BS });
    const model = Buffer.from(r.initial);
    const first = pattern(8 * BS, 61);
    await r.engine.write(0, first);
    first.copy(model, 0);
    await r.engine.flush();
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    let reached!: () => void;
    const atCopy = new Promise<void>((resolve) => (reached = resolve));
    let copies = 0;
    await reopenWithCopyHook(r, async (copy) => {
      copies++;
      reached();
      await gate;
      return copy();
    });
    const flushing = flushDirty(r.engine, { maxIoBytes: 8 * BS });
    await atCopy;
    const a = pattern(BS, 62);
    await r.engine.write(2 * BS, a);
    a.copy(model, 2 * BS);
    release();
    const result = await flushing;
    expect(copies).toBe(1);
    expect(result).toMatchObject({ blocks: 8, cleaned: 7, kept: 1 });
    expect(r.store.dirty.get(2)).toBe(true);
    // The disk is the image at the flush's start: block 2 as it was, not `a`.
    expect(diskBytes(r).subarray(0, 8 * BS).equals(first)).toBe(true);
    await r.engine.flush();
    expectDiskLagsOnlyInDirtyBlocks(r, model);
    await flushDirty(r.engine);
    expect(diskBytes(r).equals(model)).toBe(true);
  });

  it('a save still running when a batch copied cache→disk in one request ends: the disk gets the epoch version, the block stays dirty', async () => {
    // The one-request path (FlushEpoch.copyOut with io.copy) with a write's save of the epoch
    // version still in flight when the copy resolves, and a second write into the same block
    // queued behind that save. Held: the batch's copy (writeManyFrom) until both writes are under
    // way, and the save's cache read until the copy has resolved.
    const BS = 4 * KiB;
    const r = await rig({ size: 16 * BS, blockSize: BS });
    const model = Buffer.from(r.initial);
    const first = pattern(8 * BS, 71);
    await r.engine.write(0, first);
    first.copy(model, 0);
    await r.engine.flush();
    let releaseCopy!: () => void;
    const copyGate = new Promise<void>((resolve) => (releaseCopy = resolve));
    let copyReached!: () => void;
    const atCopy = new Promise<void>((resolve) => (copyReached = resolve));
    let copyEnded!: () => void;
    const copied = new Promise<void>((resolve) => (copyEnded = resolve));
    await reopenWithCopyHook(r, async (copy) => {
      copyReached();
      await copyGate;
      await copy();
      copyEnded();
    });
    // The epoch's saves read the cache through store.readData (the copy reads the cache file
    // itself): hold the first read of block 2 made while `holdSave` is set.
    const store = r.store;
    const readData = store.readData.bind(store);
    let holdSave = false;
    let releaseSave!: () => void;
    const saveGate = new Promise<void>((resolve) => (releaseSave = resolve));
    let saveReached!: () => void;
    const atSave = new Promise<void>((resolve) => (saveReached = resolve));
    store.readData = async (buf, position) => {
      if (holdSave && position === 2 * BS) {
        holdSave = false;
        saveReached();
        await saveGate;
      }
      return readData(buf, position);
    };
    let progressed = 0;
    const flushing = flushDirty(r.engine, { maxIoBytes: 8 * BS, onProgress: () => progressed++ });
    await atCopy;
    holdSave = true;
    const a = pattern(BS, 72);
    const b = pattern(200, 73);
    const writingA = r.engine.write(2 * BS, a);
    await atSave;
    // Queued behind the save in flight: it must not land before the save has read the block.
    const writingB = r.engine.write(2 * BS + 1000, b);
    let landed = false;
    void Promise.all([writingA, writingB]).then(() => (landed = true));
    releaseCopy();
    await copied;
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(landed).toBe(false);
    // copyOut settles with the saves of its blocks (a failed save fails the batch, not only the
    // commit): the batch is not done while one is in flight.
    expect(progressed).toBe(0);
    releaseSave();
    await Promise.all([writingA, writingB]);
    a.copy(model, 2 * BS);
    b.copy(model, 2 * BS + 1000);
    const result = await flushing;
    expect(progressed).toBe(1);
    expect(result).toMatchObject({ blocks: 8, cleaned: 7, kept: 1 });
    // Invariant 7: the disk is the image at the flush's start (block 2 as it was, not a or b) ...
    expect(diskBytes(r).subarray(0, 8 * BS).equals(first)).toBe(true);
    // ... and the rewritten block stays dirty, with both writes in the cache.
    expect(r.store.dirty.get(2)).toBe(true);
    expect((await r.engine.read(2 * BS, BS)).equals(model.subarray(2 * BS, 3 * BS))).toBe(true);
    await r.engine.flush();
    expectDiskLagsOnlyInDirtyBlocks(r, model);
    await flushDirty(r.engine);
    expect(diskBytes(r).equals(model)).toBe(true);
    expect(r.engine.stats().dirtyBlocks).toBe(0);
  });

  it('writes issued right after flushDirty starts are never lost, whatever the interleaving', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 32 * BS, blockSize: BS });
    const model = Buffer.from(r.initial);
    for (let round = 0; round < 20; round++) {
      for (let i = 0; i < 6; i++) {
        const off = ((round * 7 + i * 5) % 30) * BS + ((round + i) % 3) * 1000;
        const data = pattern(BS + 500, round * 100 + i);
        await r.engine.write(off, data);
        data.copy(model, off);
      }
      await r.engine.flush();
      const flushing = flushDirty(r.engine, { maxIoBytes: 2 * BS });
      const racing: Promise<void>[] = [];
      for (let i = 0; i < 4; i++) {
        const off = ((round * 3 + i * 8) % 31) * BS + 17 * i;
        const data = pattern(BS, 1e6 + round * 10 + i);
        data.copy(model, off);
        racing.push(r.engine.write(off, data));
        if (i === 1) await new Promise((res) => setImmediate(res));
      }
      await Promise.all(racing);
      await flushing;
      await r.engine.flush();
      expectDiskLagsOnlyInDirtyBlocks(r, model);
    }
    await flushDirty(r.engine);
    expect(diskBytes(r).equals(model)).toBe(true);
    expect(r.engine.stats().dirtyBlocks).toBe(0);
  });
});

describe('requests done now (readNow, writeNow: the NBD server answers them in the turn they arrive)', () => {
  it('readNow serves present blocks with their bytes and counts the hit; a miss, a bad range or a closed engine is declined, changing nothing', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 16 * BS, blockSize: BS });
    const buf = Buffer.alloc(2 * BS);
    // Missing: declined, no fill started, no hit or miss counted.
    expect(r.engine.readNow(buf, 3 * BS)).toBe(false);
    expect(r.source.reads).toEqual([]);
    expect(r.engine.stats()).toMatchObject({ readHits: 0, readMisses: 0, presentBlocks: 0 });
    await r.engine.read(0, 4 * BS);
    // The fills are committed (present) by the next commit; until then readInto reads them.
    await r.engine.flush();
    // Block 4 is still missing: a read across it is declined as a whole.
    expect(r.engine.readNow(buf, 3 * BS)).toBe(false);
    const hits = r.engine.stats().readHits;
    expect(r.engine.readNow(buf, BS + 100)).toBe(true);
    expect(buf.equals(r.initial.subarray(BS + 100, 3 * BS + 100))).toBe(true);
    expect(r.engine.stats().readHits).toBe(hits + 1);
    // A rewritten dirty block reads back its new bytes.
    const w = pattern(BS, 61);
    await r.engine.write(2 * BS, w);
    expect(r.engine.readNow(buf.subarray(0, BS), 2 * BS)).toBe(true);
    expect(buf.subarray(0, BS).equals(w)).toBe(true);
    // Zeroed blocks (dirty, not present) are left to readInto.
    await r.engine.discard(0, BS);
    expect(r.engine.readNow(buf.subarray(0, BS), 0)).toBe(false);
    expect(r.engine.readNow(buf, 15 * BS)).toBe(false);
    expect(r.engine.readNow(buf, -1)).toBe(false);
    expect(r.engine.readNow(Buffer.alloc(0), 0)).toBe(false);
    expect(r.source.reads.length).toBe(1);
    await r.engine.close();
    expect(r.engine.readNow(buf.subarray(0, BS), BS)).toBe(false);
  });

  it('writeNow rewrites only durably dirty blocks; a clean, missing, staged, zeroed or locked block is declined and left as it was', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 16 * BS, blockSize: BS });
    const cacheAt = (blk: number) => readFileSync(r.paths.cache).subarray(blk * BS, (blk + 1) * BS);
    await r.engine.read(0, 8 * BS);
    await r.engine.flush();
    // Clean and present: its first write needs a durable intent first (invariant 2).
    expect(r.engine.writeNow(BS, pattern(BS, 71))).toBe(false);
    expect(cacheAt(1).equals(r.initial.subarray(BS, 2 * BS))).toBe(true);
    expect(r.engine.stats().dirtyBlocks).toBe(0);
    // Missing.
    expect(r.engine.writeNow(12 * BS, pattern(BS, 72))).toBe(false);
    // Written whole while missing: staged dirty until the next commit.
    await r.engine.write(10 * BS, pattern(BS, 73));
    expect(r.engine.writeNow(10 * BS, pattern(BS, 74))).toBe(false);
    // Durably dirty (and present): done now, and reads give the new bytes.
    await r.engine.write(2 * BS, pattern(2 * BS, 75));
    await r.engine.flush();
    const w = pattern(BS + 300, 76);
    expect(r.engine.writeNow(2 * BS + 100, w)).toBe(true);
    expect((await r.engine.read(2 * BS + 100, w.byteLength)).equals(w)).toBe(true);
    // A range reaching a clean block is declined as a whole.
    expect(r.engine.writeNow(3 * BS, pattern(2 * BS, 77))).toBe(false);
    expect(cacheAt(4).equals(r.initial.subarray(4 * BS, 5 * BS))).toBe(true);
    // A dirty block being zeroed (locked by a discard under way) is the discard's until it ends.
    await r.engine.write(6 * BS, pattern(BS, 80));
    await r.engine.flush();
    const zeroing = r.engine.discard(6 * BS, BS);
    expect(r.engine.writeNow(6 * BS, pattern(BS, 81))).toBe(false);
    await zeroing;
    expect((await r.engine.read(6 * BS, BS)).equals(Buffer.alloc(BS))).toBe(true);
    // Zeroed blocks: dirty, not present.
    await r.engine.discard(2 * BS, BS);
    expect(r.engine.writeNow(2 * BS, pattern(BS, 78))).toBe(false);
    expect((await r.engine.read(2 * BS, BS)).equals(Buffer.alloc(BS))).toBe(true);
    // FUA-free rewrites are not durable until flush(), as write(): a crash may lose them, but a
    // clean close keeps them.
    await r.engine.close();
    await attach(r);
    expect((await r.engine.read(3 * BS, 300)).equals(w.subarray(BS - 100, BS + 200))).toBe(true);
    await r.engine.close();
    expect(r.engine.writeNow(3 * BS, pattern(BS, 79))).toBe(false);
  });

  it('a rewrite done now during a flush keeps its block dirty, and the disk still gets the version of the flush', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 16 * BS, blockSize: BS });
    const model = Buffer.from(r.initial);
    const first = pattern(8 * BS, 81);
    await r.engine.write(0, first);
    first.copy(model, 0);
    await r.engine.flush();
    // Hold the flusher at its first backing write (block 0, one block per write).
    let release!: () => void;
    r.source.writeGate = new Promise<void>((resolve) => (release = resolve));
    let copying!: () => void;
    const atFirstWrite = new Promise<void>((resolve) => (copying = resolve));
    r.source.onWrite = () => copying();
    const flushing = flushDirty(r.engine, { maxIoBytes: BS });
    await atFirstWrite;
    // Block 0 is being copied, block 5 not yet: each written now where the engine can, else as write().
    let now = 0;
    for (const [at, seed] of [[0, 82], [5 * BS + 7, 83]] as const) {
      const data = pattern(at === 0 ? BS : 100, seed);
      if (r.engine.writeNow(at, data)) now++;
      else await r.engine.write(at, data);
      data.copy(model, at);
    }
    r.source.writeGate = null;
    r.source.onWrite = null;
    release();
    await flushing;
    // Block 0 was saved by the copy under way (done now); block 5 needs its epoch version saved first.
    expect(now).toBeGreaterThanOrEqual(1);
    expect(r.store.dirty.get(0)).toBe(true);
    expect(r.store.dirty.get(5)).toBe(true);
    // The disk holds the flush's version of both: the point-in-time epoch was kept.
    expect(diskBytes(r).subarray(0, 8 * BS).equals(first)).toBe(true);
    await r.engine.flush();
    expectDiskLagsOnlyInDirtyBlocks(r, model);
    await flushDirty(r.engine);
    expect(diskBytes(r).equals(model)).toBe(true);
  });
});

describe('the flusher', () => {
  /**
   * The backing file as the flusher sees it: every write is recorded, and it reaches the file only
   * after `delayMs`, as a write queued behind others at a disk would (and, like the I/O thread,
   * reads its buffer only then: a buffer reused too early would put the wrong bytes on the disk).
   */
  class SlowDisk implements WritableSource {
    readonly size: number;
    readonly id: string;
    readonly description = 'slow disk';
    /** [kind, positions of the request] in issue order. */
    readonly requests: Array<['one' | 'many', number[]]> = [];
    inflight = 0;
    maxInflight = 0;
    /** The n-th request (from 0) fails with EIO; -1: none. */
    failAt = -1;
    constructor(
      readonly inner: FileSource,
      readonly delayMs: number,
    ) {
      this.size = inner.size;
      this.id = inner.id;
    }
    readAt(buf: Uint8Array, position: number): Promise<void> {
      return this.inner.readAt(buf, position);
    }
    async #request(kind: 'one' | 'many', positions: number[], write: () => Promise<void>): Promise<void> {
      const n = this.requests.push([kind, positions]) - 1;
      this.maxInflight = Math.max(this.maxInflight, ++this.inflight);
      try {
        await new Promise((resolve) => setTimeout(resolve, this.delayMs));
        if (n === this.failAt) throw Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO', errno: 5, syscall: 'pwrite' });
        await write();
      } finally {
        this.inflight--;
      }
    }
    writeAt(buf: Uint8Array, position: number): Promise<void> {
      return this.#request('one', [position], () => this.inner.writeAt(Buffer.from(buf), position));
    }
    writeMany(buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<void> {
      const copy = () => this.inner.writeMany(Buffer.from(buf), pieces);
      return this.#request('many', pieces.map(([, , position]) => position), copy);
    }
    sync(): Promise<void> {
      return this.inner.sync();
    }
    close(): Promise<void> {
      return this.inner.close();
    }
  }

  async function slowRig(blocks: number, delayMs: number, storage?: Storage) {
    const BS = 4 * KiB;
    const r = await rig({ size: blocks * BS, blockSize: BS });
    await r.engine.close();
    const disk = new SlowDisk(r.file, delayMs);
    r.store = await CacheStore.open({ paths: r.paths, backing: disk, mode: 'writeback', blockSize: BS, storage });
    r.engine = new CacheEngine(r.store, disk, { autoCommitMs: 0 });
    const engine = r.engine;
    cleanups.push(() => engine.close());
    return { r, disk, BS };
  }

  it('copies scattered blocks in a few requests, in disk order, each with its own bytes', async () => {
    const { r, disk, BS } = await slowRig(2048, 2);
    const model = Buffer.from(r.initial);
    // Every third block dirty: 683 one-block extents.
    for (let b = 0; b < 2048; b += 3) {
      const data = pattern(BS, b + 1);
      await r.engine.write(b * BS, data);
      data.copy(model, b * BS);
    }
    await r.engine.flush();
    const result = await flushDirty(r.engine, { depth: 2 });
    expect(result).toMatchObject({ blocks: 683, cleaned: 683, kept: 0 });
    expect(disk.requests.every(([kind]) => kind === 'many')).toBe(true);
    expect(disk.requests.length).toBeLessThanOrEqual(Math.ceil(683 / 256));
    const positions = disk.requests.flatMap(([, p]) => p);
    expect(positions).toEqual([...positions].sort((a, b) => a - b));
    expect(positions.length).toBe(683);
    expect(diskBytes(r).equals(model)).toBe(true);
  });

  it('keeps several large writes in flight, issued in disk order, through reused buffers', async () => {
    // Every other piece is slow to read from the cache: the writes must still go out in order.
    let slowReads = false;
    const storage: Storage = {
      ...posixStorage,
      async open(path, options) {
        const file = await posixStorage.open(path, options);
        if (!path.endsWith('cache')) return file;
        return Object.assign(Object.create(Object.getPrototypeOf(file) as object) as BlockFile, file, {
          path: file.path,
          read: async (buf: Uint8Array, pos: number) => {
            if (slowReads && pos % (8 * KiB * 4) === 0) await new Promise((resolve) => setTimeout(resolve, 15));
            return file.read(buf, pos);
          },
          write: (buf: Uint8Array, pos: number) => file.write(buf, pos),
          writeNow: (buf: Uint8Array, pos: number) => file.writeNow?.(buf, pos) ?? false,
          sync: () => file.sync(),
          allocate: (length: number) => file.allocate(length),
          size: () => file.size(),
          close: () => file.close(),
        });
      },
    };
    const { r, disk, BS } = await slowRig(256, 5, storage);
    slowReads = true;
    const data = pattern(256 * BS, 7);
    await r.engine.write(0, data);
    await r.engine.flush();
    // 64 pieces of 4 blocks through 3 buffers: each buffer is refilled about 21 times.
    const result = await flushDirty(r.engine, { maxIoBytes: 4 * BS, depth: 3 });
    expect(result.cleaned).toBe(256);
    expect(disk.requests.length).toBe(64);
    expect(disk.maxInflight).toBeGreaterThan(1);
    const positions = disk.requests.map(([, [p]]) => p!);
    expect(positions).toEqual(positions.map((_, i) => i * 4 * BS));
    expect(diskBytes(r).equals(data)).toBe(true);
  });

  it('a failed write aborts the flush once the writes in flight settle; every block stays dirty', async () => {
    const { r, disk, BS } = await slowRig(256, 3);
    const model = Buffer.from(r.initial);
    const data = pattern(256 * BS, 9);
    await r.engine.write(0, data);
    data.copy(model, 0);
    await r.engine.flush();
    disk.failAt = 5;
    const err = await outcome(() => flushDirty(r.engine, { maxIoBytes: 8 * BS, depth: 4 }));
    expect((err as { code?: string }).code).toBe('EIO');
    expect(disk.inflight).toBe(0);
    // No more batches were started after the failure was seen.
    expect(disk.requests.length).toBeLessThan(32);
    expect(r.engine.stats().dirtyBlocks).toBe(256);
    expectDiskLagsOnlyInDirtyBlocks(r, model);
    disk.failAt = -1;
    expect((await flushDirty(r.engine)).cleaned).toBe(256);
    expect(diskBytes(r).equals(model)).toBe(true);
  });
});

describe('dirty intents', () => {
  /** Metadata whose WAL fsyncs (the intents' durability) wait until released. */
  function gatedMetadata() {
    const gate = { held: false, waiting: [] as (() => void)[], syncs: 0, transactions: [] as number[] };
    const wrap = (m: Metadata): Metadata => {
      const syncWal = m.syncWal.bind(m);
      const addDirtyUnsynced = m.addDirtyUnsynced.bind(m);
      m.addDirtyUnsynced = (extents) => {
        gate.transactions.push(extents.reduce((n, e) => n + e.count, 0));
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

  async function gatedRig(blocks: number) {
    const BS = 4 * KiB;
    const r = await rig({ size: blocks * BS, blockSize: BS });
    await r.engine.close();
    const g = gatedMetadata();
    r.store = await CacheStore.open({ paths: r.paths, backing: r.source, mode: 'writeback', blockSize: BS, metadata: g.factory });
    r.engine = new CacheEngine(r.store, r.source, { autoCommitMs: 0 });
    const engine = r.engine;
    cleanups.push(() => engine.close());
    return { r, BS, ...g };
  }

  it('writes into clean blocks wait for their intent fsync, and share one while it runs', async () => {
    const { r, BS, gate, release } = await gatedRig(64);
    await r.engine.read(0, 64 * BS);
    await r.engine.flush();
    gate.held = true;
    // 16 first writes to clean blocks, issued across several turns while the fsync is held.
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 16; i++) {
      writes.push(r.engine.write(i * 4 * BS, pattern(BS, i)));
      if (i % 4 === 3) await new Promise((resolve) => setImmediate(resolve));
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
    // Nothing is written and nothing counts as dirty before the intent is durable (rule 3).
    expect(r.engine.stats().dirtyBlocks).toBe(0);
    for (let i = 0; i < 16; i++) expect(readFileSync(r.paths.cache).subarray(i * 4 * BS, i * 4 * BS + BS).equals(r.initial.subarray(i * 4 * BS, i * 4 * BS + BS))).toBe(true);
    const held = gate.syncs;
    release();
    await Promise.all(writes);
    expect(r.engine.stats().dirtyBlocks).toBe(16);
    // Everything that queued behind the held fsync went out in one more.
    expect(gate.syncs).toBeLessThanOrEqual(held + 1);
    expect(held).toBeLessThanOrEqual(1);
  });

  it('intents that arrive while a round fsyncs wait for the next round, which records them in one transaction', async () => {
    const { r, BS, gate, release } = await gatedRig(16);
    await r.engine.read(0, 16 * BS);
    await r.engine.flush();
    const turn = () => new Promise((resolve) => setImmediate(resolve));
    const unchanged = (b: number) => readFileSync(r.paths.cache).subarray(b * BS, (b + 1) * BS).equals(r.initial.subarray(b * BS, (b + 1) * BS));
    gate.held = true;
    const a = r.engine.write(1 * BS, pattern(BS, 1));
    await turn();
    expect(gate.syncs).toBe(1);
    // Two more first writes in two later turns, while round 1's fsync runs: its transaction did
    // not carry them, so its fsync may not let them go ahead (rule 3).
    const b = r.engine.write(5 * BS, pattern(BS, 5));
    await turn();
    const c = r.engine.write(9 * BS, pattern(BS, 9));
    await turn();
    gate.waiting.shift()!();
    await a;
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(r.store.dirty.get(1)).toBe(true);
    expect(unchanged(1)).toBe(false);
    expect(gate.syncs).toBe(2);
    for (const blk of [5, 9]) {
      expect(r.store.dirty.get(blk)).toBe(false);
      expect(unchanged(blk)).toBe(true);
    }
    release();
    await Promise.all([b, c]);
    expect([5, 9].map((blk) => r.store.dirty.get(blk))).toEqual([true, true]);
    // One transaction per round: block 1 alone, then blocks 5 and 9 together.
    expect(gate.transactions).toEqual([1, 2]);
    expect(gate.syncs).toBe(2);
    // status `intents` counts the same: 2 rounds, 3 blocks, and the 20 ms round 2's fsync was held.
    const intents = r.engine.stats().intents;
    expect({ rounds: intents.rounds, blocks: intents.blocks }).toEqual({ rounds: 2, blocks: 3 });
    expect(intents.syncMs).toBeGreaterThanOrEqual(19);
    await reopen(r, 'abandon');
    expect([1, 5, 9].map((blk) => r.store.dirty.get(blk))).toEqual([true, true, true]);
  });

  it('a first write\'s data is written at once when its intent is durable (writeDataNow), not before', async () => {
    const { r, BS, gate, release } = await gatedRig(16);
    await r.engine.read(0, 16 * BS);
    await r.engine.flush();
    const calls: string[] = [];
    const store = r.store;
    const writeDataNow = store.writeDataNow.bind(store);
    const writeData = store.writeData.bind(store);
    store.writeDataNow = (buf, position) => {
      const done = writeDataNow(buf, position);
      calls.push(`now ${position / BS} ${done}`);
      return done;
    };
    store.writeData = (buf, position) => {
      calls.push(`threadpool ${position / BS}`);
      return writeData(buf, position);
    };
    gate.held = true;
    const data = pattern(BS, 3);
    const writing = r.engine.write(3 * BS, data);
    await new Promise((resolve) => setTimeout(resolve, 10));
    expect(calls).toEqual([]);
    release();
    await writing;
    // One buffered pwrite on the event loop, no threadpool job.
    expect(calls).toEqual(['now 3 true']);
    expect(readFileSync(r.paths.cache).subarray(3 * BS, 4 * BS).equals(data)).toBe(true);
    expect(r.store.dirty.get(3)).toBe(true);
  });

  it('status intents counts rounds, the blocks they made dirty (not extents) and their fsync time', async () => {
    const { r, BS } = await gatedRig(16);
    await r.engine.read(0, 16 * BS);
    await r.engine.flush();
    expect(r.engine.stats().intents).toEqual({ rounds: 0, blocks: 0, syncMs: 0, gathered: 0, gatherTimeouts: 0 });
    // One write over three clean blocks (one extent), then a rewrite of one of them (no intent).
    await r.engine.write(2 * BS, pattern(3 * BS, 1));
    await r.engine.write(3 * BS, pattern(BS, 2));
    const intents = r.engine.stats().intents;
    expect({ rounds: intents.rounds, blocks: intents.blocks }).toEqual({ rounds: 1, blocks: 3 });
    expect(intents.syncMs).toBeGreaterThan(0);
  });

  it('an intent still being synced stays in the dirty table a flush epoch rewrites meanwhile', async () => {
    const { r, BS, gate, release } = await gatedRig(16);
    await r.engine.read(0, 16 * BS);
    await r.engine.write(5 * BS, pattern(BS, 1));
    await r.engine.flush();
    expect(r.engine.stats().dirtyBlocks).toBe(1);
    // A first write into clean block 0 waits for its intent's fsync...
    gate.held = true;
    const data = pattern(BS, 2);
    const writing = r.engine.write(0, data);
    await new Promise((resolve) => setTimeout(resolve, 10));
    // ...while a flush of block 5 commits its epoch and rewrites the whole dirty table.
    gate.held = false;
    const flushed = await flushDirty(r.engine);
    expect(flushed.cleaned).toBe(1);
    release();
    await writing;
    expect(r.store.dirty.get(0)).toBe(true);
    // A daemon crash now: block 0's new bytes are in the cache file, so it must come back dirty.
    await reopen(r, 'abandon');
    expect(r.store.dirty.get(0)).toBe(true);
    expect((await r.engine.read(0, BS)).equals(data)).toBe(true);
  });
});

describe('the hydrator', () => {
  it('keeps several fills in flight, in ascending order, and fetches a failed chunk again', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 256 * BS, blockSize: BS });
    let inflight = 0;
    let maxInflight = 0;
    let failOnce = 40 * BS;
    const read = r.source.readAt.bind(r.source);
    const issued: number[] = [];
    r.source.readAt = async (buf, position) => {
      issued.push(position / BS);
      maxInflight = Math.max(maxInflight, ++inflight);
      try {
        await new Promise((resolve) => setTimeout(resolve, 3));
        if (position === failOnce) {
          failOnce = -1;
          throw Object.assign(new Error('EIO: i/o error, read'), { code: 'EIO' });
        }
        await read(buf, position);
      } finally {
        inflight--;
      }
    };
    const errors: string[] = [];
    const h = new Hydrator(r.engine, { quietMs: 0, chunkBytes: 8 * BS, depth: 4, retryMs: 1, onError: (e) => errors.push(e.message) });
    await h.start();
    expect(errors).toEqual(['EIO: i/o error, read']);
    expect(h.progress()).toMatchObject({ done: true, percent: 100 });
    expect(maxInflight).toBe(4);
    // One pass up the disk, then the failed chunk again; nothing else twice.
    expect(issued.filter((b) => b === 40)).toHaveLength(2);
    const firstPass = issued.slice(0, issued.lastIndexOf(40));
    expect(firstPass).toEqual(Array.from({ length: firstPass.length }, (_, i) => i * 8));
    expect(issued.length).toBe(256 / 8 + 1);
    expect(r.source.readBytes).toBe(256 * BS);
    r.source.reset();
    expect((await r.engine.read(0, 256 * BS)).equals(r.initial)).toBe(true);
    expect(r.source.readBytes).toBe(0);
  });
});

describe('long fills staged and locked as ranges (rangeFillBlocks)', () => {
  it('a write into a block of a long fill in flight waits for the fill, then wins over it', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 256 * BS, blockSize: BS });
    const data = randomBytes(BS);
    // 128 blocks: one range-locked fill, its disk read held back while the write to its block 10
    // goes as far as it can.
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    const readAt = r.source.readAt.bind(r.source);
    r.source.readAt = async (buf, position) => {
      await gate;
      return readAt(buf, position);
    };
    const fill = r.engine.prefetch(0, 128 * BS);
    const write = r.engine.write(10 * BS, data);
    await new Promise((resolve) => setTimeout(resolve, 50));
    open();
    await Promise.all([fill, write]);
    await r.engine.flush();
    expect(r.store.dirty.get(10)).toBe(true);
    expect(r.store.present.count(0, 128)).toBe(128);
    expect(r.store.dirty.count()).toBe(1);
    expect(r.engine.stats().stagedBlocks).toBe(0);
    const model = Buffer.from(r.initial);
    data.copy(model, 10 * BS);
    expect((await r.engine.read(0, 256 * BS)).equals(model)).toBe(true);
  });

  it("a write into a long fill's block while the commit syncs leaves it out of that commit: staged dirty, never present clean", async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 256 * BS, blockSize: BS });
    await r.engine.prefetch(0, 128 * BS);
    expect(r.engine.stats().stagedBlocks).toBe(128);
    const data = randomBytes(BS);
    let during: (() => Promise<void>) | null = () => r.engine.write(20 * BS, data);
    const store = r.store;
    const syncData = store.syncData.bind(store);
    store.syncData = async () => {
      const synced = syncData();
      const hook = during;
      during = null;
      if (hook) await hook();
      return synced;
    };
    await r.engine.flush();
    expect(during).toBeNull();
    // The commit's snapshot held block 20 clean; the write made it dirty during the sync: it must
    // not come out present and clean (the cache holds data the disk does not).
    expect(store.present.get(20) && !store.dirty.get(20)).toBe(false);
    expect(store.present.count(0, 128)).toBe(127);
    expect(r.engine.stats().stagedBlocks).toBe(1);
    await r.engine.flush();
    expect(store.present.get(20)).toBe(true);
    expect(store.dirty.get(20)).toBe(true);
    expect(r.engine.stats().stagedBlocks).toBe(0);
    const model = Buffer.from(r.initial);
    data.copy(model, 20 * BS);
    expect((await r.engine.read(0, 256 * BS)).equals(model)).toBe(true);
  });
});

describe('fills in one request (Source.copyInto)', () => {
  it('hydrate a file-backed disk through copyInto; a failed cache write leaves its blocks missing, is retried, and is not the disk failing', async () => {
    const BS = 4 * KiB;
    const failAt = 40 * BS;
    let failures = 1;
    const copies: number[] = [];
    // The cache file's copyFrom fails once at failAt after writing garbage there, as a write that
    // reached part of the file before its error would.
    const storage: Storage = {
      ...posixStorage,
      async open(path, options) {
        const file = await posixStorage.open(path, options);
        if (!path.endsWith('cache')) return file;
        const copyFrom = file.copyFrom!.bind(file);
        return Object.assign(file, {
          copyFrom: async (src: BlockFile, buf: Uint8Array, srcPosition: number, position: number) => {
            copies.push(position / BS);
            if (position === failAt && failures-- > 0) {
              await file.write(Buffer.alloc(buf.byteLength, 0x5a), position);
              throw Object.assign(new Error('EIO: i/o error, pwrite'), { code: 'EIO', errno: 5, syscall: 'pwrite' });
            }
            return copyFrom(src, buf, srcPosition, position);
          },
        });
      },
    };
    const r = await rig({ size: 256 * BS, blockSize: BS, storage });
    await r.engine.close();
    const health = new DiskHealth();
    const disk = health.watch(r.file);
    r.store = await CacheStore.open({ paths: r.paths, backing: disk, mode: 'writeback', blockSize: BS, storage });
    const engine = new CacheEngine(r.store, disk, { autoCommitMs: 0 });
    cleanups.push(() => engine.close());
    const errors: string[] = [];
    const presentAtError: boolean[] = [];
    const h = new Hydrator(engine, {
      quietMs: 0,
      chunkBytes: 8 * BS,
      retryMs: 1,
      onError: (e) => {
        errors.push(e.message);
        // Invariant 1: the chunk whose cache write failed is not present, even after a commit.
        void engine.flush().then(() => presentAtError.push(r.store.present.get(40), r.store.present.get(47)));
      },
    });
    await h.start();
    expect(errors).toEqual(['EIO: i/o error, pwrite']);
    expect(presentAtError).toEqual([false, false]);
    expect(health.status()).toMatchObject({ state: 'ok', errors: 0 });
    // One request per chunk, the failed one twice.
    expect(copies.filter((b) => b === 40)).toHaveLength(2);
    expect(copies).toHaveLength(256 / 8 + 1);
    expect(h.progress()).toMatchObject({ done: true, percent: 100 });
    expect(readFileSync(r.paths.cache).subarray(0, 256 * BS).equals(r.initial)).toBe(true);
    expect((await engine.read(0, 256 * BS)).equals(r.initial)).toBe(true);
  });

  it('a hydration chunk larger than a fill buffer is one stream through it (Source.streamInto); a stream failing halfway leaves the whole chunk missing and is retried', async () => {
    const BS = 4 * KiB;
    const failAt = 64 * BS;
    let failures = 1;
    const streams: Array<[number, number, number]> = [];
    // The cache file's copyStreamFrom copies the first half of the chunk at failAt, then fails
    // after writing garbage into the second half, as a stream whose cache write broke would.
    const storage: Storage = {
      ...posixStorage,
      async open(path, options) {
        const file = await posixStorage.open(path, options);
        if (!path.endsWith('cache')) return file;
        const copyStreamFrom = file.copyStreamFrom!.bind(file);
        return Object.assign(file, {
          copyStreamFrom: async (src: BlockFile, buf: Uint8Array, srcPosition: number, position: number, length: number, sequential?: boolean) => {
            streams.push([position / BS, length / BS, buf.byteLength / BS]);
            if (position === failAt && failures-- > 0) {
              await copyStreamFrom(src, buf, srcPosition, position, length / 2, sequential);
              await file.write(Buffer.alloc(length / 2, 0x5a), position + length / 2);
              throw Object.assign(new Error('EIO: i/o error, pwrite'), { code: 'EIO', errno: 5, syscall: 'pwrite' });
            }
            return copyStreamFrom(src, buf, srcPosition, position, length, sequential);
          },
        });
      },
    };
    const r = await rig({ size: 256 * BS, blockSize: BS, storage });
    await r.engine.close();
    const health = new DiskHealth();
    const disk = health.watch(r.file);
    r.store = await CacheStore.open({ paths: r.paths, backing: disk, mode: 'writeback', blockSize: BS, storage });
    // Fill buffers of 4 blocks, chunks of 32: each chunk streams through one buffer in 8 pieces.
    const engine = new CacheEngine(r.store, disk, { autoCommitMs: 0, maxFillBytes: 4 * BS });
    cleanups.push(() => engine.close());
    const errors: string[] = [];
    const presentAtError: boolean[] = [];
    const h = new Hydrator(engine, {
      quietMs: 0,
      chunkBytes: 32 * BS,
      retryMs: 1,
      onError: (e) => {
        errors.push(e.message);
        // Invariant 1: no block of the chunk is present, the half copied well included.
        void engine.flush().then(() => presentAtError.push(r.store.present.get(64), r.store.present.get(80), r.store.present.get(95)));
      },
    });
    await h.start();
    expect(errors).toEqual(['EIO: i/o error, pwrite']);
    expect(presentAtError).toEqual([false, false, false]);
    expect(health.status()).toMatchObject({ state: 'ok', errors: 0 });
    // One stream per chunk through a 4-block buffer, the failed one twice.
    expect(streams.every(([, count, bufBlocks]) => count === 32 && bufBlocks === 4)).toBe(true);
    expect(streams.filter(([b]) => b === 64)).toHaveLength(2);
    expect(streams).toHaveLength(256 / 32 + 1);
    expect(h.progress()).toMatchObject({ done: true, percent: 100 });
    expect(readFileSync(r.paths.cache).subarray(0, 256 * BS).equals(r.initial)).toBe(true);
    expect((await engine.read(0, 256 * BS)).equals(r.initial)).toBe(true);
  });

  it('a read failure of the disk during a copy fails the fill and counts against the disk', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 64 * BS, blockSize: BS });
    await r.engine.close();
    const health = new DiskHealth();
    const inner = r.file;
    // The disk's reads fail from block 32 on, for copies as for plain reads.
    const disk = health.watch({
      ...({ size: inner.size, id: inner.id, description: inner.description } as const),
      readAt: async (buf: Uint8Array, position: number) => {
        if (position >= 32 * BS) throw Object.assign(new Error('EIO: i/o error, pread'), { code: 'EIO', syscall: 'pread' });
        return inner.readAt(buf, position);
      },
      copyInto: async (into: BlockFile, buf: Uint8Array, position: number, intoPosition: number) => {
        if (position >= 32 * BS) throw Object.assign(new Error('EIO: i/o error, pread'), { code: 'EIO', syscall: 'pread' });
        return inner.copyInto(into, buf, position, intoPosition);
      },
      writeAt: (buf: Uint8Array, position: number) => inner.writeAt(buf, position),
      sync: () => inner.sync(),
      close: async () => undefined,
    } as WritableSource);
    r.store = await CacheStore.open({ paths: r.paths, backing: disk, mode: 'writeback', blockSize: BS });
    const engine = new CacheEngine(r.store, disk, { autoCommitMs: 0 });
    cleanups.push(() => engine.close());
    expect((await engine.read(0, 8 * BS)).equals(r.initial.subarray(0, 8 * BS))).toBe(true);
    await expect(engine.read(32 * BS, 8 * BS)).rejects.toThrow(/EIO/);
    await engine.flush();
    expect(r.store.present.get(0)).toBe(true);
    expect(r.store.present.get(32)).toBe(false);
    expect(health.status()).toMatchObject({ state: 'failing', errors: 1 });
  });
});

/** Invariant 4: every block where the backing differs from the device's content is dirty. */
function expectDiskLagsOnlyInDirtyBlocks(r: Rig, model: Buffer): void {
  const g = r.engine.geometry;
  const onDisk = diskBytes(r);
  for (let blk = 0; blk < g.blockCount; blk++) {
    const off = g.blockOffset(blk);
    const end = off + g.blockLength(blk);
    if (!onDisk.subarray(off, end).equals(model.subarray(off, end)) && !r.store.dirty.get(blk)) {
      expect.fail(`block ${blk} differs on the backing disk but is not dirty`);
    }
  }
}

// --- the commit timer -----------------------------------------------------------------------------

describe('the background commit timer', () => {
  it('persists fills and writes without a FLUSH', async () => {
    const BS = 4 * KiB;
    // Without the timer nothing is committed however long one waits.
    const idle = await rig({ size: 16 * BS, blockSize: BS, engine: { autoCommitMs: 0 } });
    await idle.engine.read(0, 4 * BS);
    await new Promise((res) => setTimeout(res, 100));
    expect(idle.engine.stats().stagedBlocks).toBe(4);
    expect(readFileSync(idle.paths.bitmap)[0]).toBe(0);

    const r = await rig({ size: 16 * BS, blockSize: BS, engine: { autoCommitMs: 20 } });
    // Fills alone start the timer: the bitmap file on disk gets their present bits.
    await r.engine.read(0, 4 * BS);
    expect(r.engine.stats().stagedBlocks).toBe(4);
    await waitFor(() => readFileSync(r.paths.bitmap)[0] === 0x0f, 'the present bits in the bitmap file');
    // A write alone starts it too: the metadata gets the dirty bit.
    const w = pattern(BS, 61);
    await r.engine.write(9 * BS, w);
    expect(r.engine.stats().stagedBlocks).toBe(1);
    // (The engine counts it dirty at once; the store, which the metadata follows, at the commit.)
    expect(r.engine.stats().dirtyBlocks).toBe(1);
    await waitFor(() => r.store.dirty.count() === 1 && r.engine.stats().stagedBlocks === 0, 'the dirty bit');
    await reopen(r, 'abandon', { autoCommitMs: 20 });
    expect(r.store.recoveredFromCrash).toBe(true);
    expect(r.store.present.allSet(0, 4)).toBe(true);
    expect(r.store.dirty.get(9)).toBe(true);
    expect((await r.engine.read(0, 4 * BS)).equals(r.initial.subarray(0, 4 * BS))).toBe(true);
    expect((await r.engine.read(9 * BS, BS)).equals(w)).toBe(true);
    expect(r.source.reads).toEqual([]);
  });
});

// --- refusals and the failed state ----------------------------------------------------------------

describe('refusals', () => {
  it('reject bad arguments with InvalidArgumentError before any I/O', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 8 * BS + 100, blockSize: BS });
    const size = r.engine.size;
    const e = r.engine as unknown as {
      read(o: unknown, l: unknown): Promise<Buffer>;
      write(o: unknown, d: unknown): Promise<void>;
      discard(o: unknown, l: unknown): Promise<void>;
    };
    const cacheBefore = sha(readFileSync(r.paths.cache));
    const calls: [string, () => Promise<unknown>][] = [
      ['read at a negative offset', () => e.read(-1, 10)],
      ['read of a negative length', () => e.read(0, -1)],
      ['read at a fractional offset', () => e.read(1.5, 10)],
      ['read at NaN', () => e.read(Number.NaN, 10)],
      ['read at a string offset', () => e.read('0', 10)],
      ['read at the end', () => e.read(size, 1)],
      ['read across the end', () => e.read(size - 1, 2)],
      ['read far beyond', () => e.read(2 ** 53, 1)],
      ['write at a negative offset', () => e.write(-1, Buffer.alloc(1))],
      ['write at the end', () => e.write(size, Buffer.alloc(1))],
      ['write across the end', () => e.write(size - 10, Buffer.alloc(11))],
      ['write of a string', () => e.write(0, 'abc')],
      ['write of an array', () => e.write(0, [1, 2, 3])],
      ['write of null', () => e.write(0, null)],
      ['write of an ArrayBuffer', () => e.write(0, new ArrayBuffer(8))],
      ['discard at a negative offset', () => e.discard(-4096, 4096)],
      ['discard across the end', () => e.discard(0, size + 1)],
    ];
    for (const [what, call] of calls) {
      const err = await outcome(call);
      expect(err, what).toBeInstanceOf(InvalidArgumentError);
      expect((err as UlobError).code, what).toBe('ULOB_E_INVALID_ARG');
    }
    expect(r.source.reads).toEqual([]);
    expect(r.source.writes).toEqual([]);
    expect(r.engine.stats()).toMatchObject({ presentBlocks: 0, stagedBlocks: 0, dirtyBlocks: 0 });
    expect(sha(readFileSync(r.paths.cache))).toBe(cacheBefore);
  });

  it('reject every operation after close with EngineClosedError', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 8 * BS, blockSize: BS });
    await r.engine.write(0, pattern(BS, 71));
    await r.engine.close();
    await r.engine.close(); // idempotent
    r.source.reset();
    const ops: [string, () => unknown][] = [
      ['read', () => r.engine.read(0, 1)],
      ['write', () => r.engine.write(0, Buffer.alloc(1))],
      ['flush', () => r.engine.flush()],
      ['discard', () => r.engine.discard(0, BS)],
      ['beginEpoch', () => r.engine.beginEpoch()],
      ['readCache', () => r.engine.readCache(Buffer.alloc(BS), 0)],
      ['flushDirty', () => flushDirty(r.engine)],
    ];
    for (const [what, op] of ops) {
      const err = await outcome(op);
      expect(err, what).toBeInstanceOf(EngineClosedError);
      expect((err as UlobError).code, what).toBe('ULOB_E_CLOSED');
    }
    expect(r.source.reads).toEqual([]);
    expect(r.source.writes).toEqual([]);
    // The write was committed by the close.
    await reopen(r, 'close');
    expect(r.store.recoveredFromCrash).toBe(false);
    expect(r.store.dirty.get(0)).toBe(true);
  });

  it('recovers from a failed cache sync without a restart: staged blocks dropped, the cache synced again', async () => {
    const BS = 4 * KiB;
    let cachePath = '';
    const flaky = flakyStorage(() => cachePath);
    const r = await rig({ size: 16 * BS, blockSize: BS });
    await r.engine.close();
    cachePath = r.paths.cache;
    r.options.storage = flaky.storage;
    await attach(r);
    // Block 0: dirty and flushed before the fault. Block 2: a whole-block write staged (rule 4),
    // block 4: a fill staged (rule 1); both only in pages the failed sync may have lost.
    await r.engine.write(0, pattern(BS, 1));
    await r.engine.flush();
    await r.engine.write(0, pattern(BS, 2)); // a rewrite of a dirty block, not flushed
    await r.engine.write(2 * BS, pattern(BS, 3));
    await r.engine.read(4 * BS, BS);
    flaky.failNextSync = true;
    await expect(r.engine.flush()).rejects.toMatchObject({ code: 'ULOB_E_IO' });
    expect(r.store.dataSyncFailed).toBe(true);
    await expect(r.engine.read(8 * BS, 1)).rejects.toMatchObject({ code: 'ULOB_E_CLOSED' });
    // The sync fails again: still failed, nothing dropped twice.
    flaky.failNextSync = true;
    let dropped: unknown[] = [];
    expect(await r.engine.recoverSyncError(async (e) => void (dropped = e))).toBe(false);
    expect(dropped).toEqual([{ start: 2, count: 1 }, { start: 4, count: 1 }]);
    expect(r.store.failed).not.toBeNull();
    // The cause is gone: the store serves again.
    expect(await r.engine.recoverSyncError()).toBe(true);
    expect(r.store.failed).toBeNull();
    // Neither dropped block is present or dirty (never recorded over a page that may be lost);
    // block 0 stays dirty.
    for (const b of [2, 4]) expect([r.store.present.get(b), r.store.dirty.get(b)], `block ${b}`).toEqual([false, false]);
    expect(r.store.dirty.get(0)).toBe(true);
    // Requests work again; the dropped fill is fetched from the source anew.
    r.source.reset();
    await r.engine.read(4 * BS, BS);
    expect(r.source.reads.length).toBe(1);
    await r.engine.write(6 * BS, pattern(BS, 4));
    await r.engine.flush();
    expect(r.store.dirty.get(6)).toBe(true);
    await r.engine.close();
    r.options.storage = undefined;
    await attach(r);
    expect(r.store.recoveredFromCrash).toBe(false);
    expect(r.store.dirty.get(6)).toBe(true);
  });

  it('does not recover when more than the data sync failed', async () => {
    const BS = 4 * KiB;
    const r = await rig({ size: 16 * BS, blockSize: BS });
    await r.engine.write(0, pattern(BS, 1));
    await r.store.abandon();
    expect(r.store.dataSyncFailed).toBe(false);
    await expect(r.engine.recoverSyncError()).rejects.toMatchObject({ code: 'ULOB_E_CLOSED' });
  });

  it('after a failed cache sync the engine refuses everything with EngineClosedError', async () => {
    const BS = 4 * KiB;
    let cachePath = '';
    const flaky = flakyStorage(() => cachePath);
    const r = await (async () => {
      // The rig's paths are known only once it exists; the target is read at each open.
      const x = await rig({ size: 16 * BS, blockSize: BS });
      await x.engine.close();
      cachePath = x.paths.cache;
      x.options.storage = flaky.storage;
      await attach(x);
      return x;
    })();
    await r.engine.write(0, pattern(BS, 81));
    await r.engine.read(4 * BS, BS);
    flaky.failNextSync = true;
    const err = await outcome(() => r.engine.flush());
    expect(err).toBeInstanceOf(IOFailedError);
    expect(err).toMatchObject({ code: 'ULOB_E_IO', cause: { code: 'EIO' } });
    expect((err as Error).message).toMatch(/^cannot sync the cache .*: EIO \(fdatasync\)$/);
    expect(r.store.failed).toBe(err);
    r.source.reset();
    const ops: [string, () => unknown][] = [
      ['read', () => r.engine.read(8 * BS, 1)],
      ['read of a staged block', () => r.engine.read(0, 1)],
      ['write', () => r.engine.write(0, Buffer.alloc(1))],
      ['write with FUA', () => r.engine.write(BS, Buffer.alloc(BS), { fua: true })],
      ['flush', () => r.engine.flush()],
      ['discard', () => r.engine.discard(0, 16 * BS)],
      ['beginEpoch', () => r.engine.beginEpoch()],
      ['flushDirty', () => flushDirty(r.engine)],
    ];
    for (const [what, op] of ops) {
      const e = await outcome(op);
      expect(e, what).toBeInstanceOf(EngineClosedError);
      expect((e as UlobError).code, what).toBe('ULOB_E_CLOSED');
      expect((e as Error).message, what).toContain('EIO');
    }
    // The sync was not retried (it could report success over lost pages), and nothing reached the disk.
    expect(r.source.reads).toEqual([]);
    expect(r.source.writes).toEqual([]);
    expect(flaky.failNextSync).toBe(false);
    // Close does not pretend the shutdown was clean.
    await r.engine.close();
    r.options.storage = undefined;
    await attach(r);
    expect(r.store.recoveredFromCrash).toBe(true);
  });
});
