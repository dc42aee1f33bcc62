// A small fill's bytes go into the cache file in the turn its source read ends (CacheEngine
// #fillCache: store.writeDataNow, a buffered pwrite on the event loop), not through the threadpool:
// an HTTP image's 16 KiB miss granule then answers its read without a thread hand-off (bench/README
// "Session 13"). Larger fills, and a file that declines writeNow, take write() as before; either way
// the bytes read back right and are durable only after the commit's sync (invariant 1).
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CacheEngine } from '../../src/cache/engine.js';
import { CacheStore } from '../../src/cache/store.js';
import type { Source } from '../../src/source/source.js';
import { posixStorage } from '../../src/storage/posix-storage.js';
import type { BlockFile, Storage } from '../../src/storage/storage.js';

const KiB = 1024;
const BS = 4 * KiB;

/** An image in memory with a miss granule, as HttpSource declares one; no copyInto (readAt, then the engine writes). */
class MemorySource implements Source {
  readonly size: number;
  readonly id = 'memory-image';
  readonly description = 'an image in memory';
  readonly reads: [number, number][] = [];
  constructor(
    readonly bytes: Buffer,
    readonly missGranule: number,
  ) {
    this.size = bytes.byteLength;
  }
  async readAt(buf: Uint8Array, position: number): Promise<void> {
    this.reads.push([position, buf.byteLength]);
    buf.set(this.bytes.subarray(position, position + buf.byteLength));
  }
  async close(): Promise<void> {}
}

/** posixStorage, with the cache file's write() and writeNow() calls counted; writeNow can be made to decline. */
function countingStorage(cachePath: () => string) {
  const state = { writes: 0, nowCalls: 0, nowDone: 0, syncs: 0, declineNow: false, storage: undefined as unknown as Storage };
  state.storage = {
    ...posixStorage,
    async open(path, options) {
      const file = await posixStorage.open(path, options);
      if (path !== cachePath()) return file;
      const overrides: Partial<BlockFile> = {
        write: (buf, pos) => {
          state.writes++;
          return file.write(buf, pos);
        },
        writeNow: (buf, pos) => {
          state.nowCalls++;
          if (state.declineNow) return false;
          const done = file.writeNow?.(buf, pos) ?? false;
          if (done) state.nowDone++;
          return done;
        },
        sync: () => {
          state.syncs++;
          return file.sync();
        },
        // No batched or threadpool shortcut around write(): every fill write is one of the two above.
        writeMany: undefined,
        copyFrom: undefined,
      };
      const wrapped = new Proxy(file, {
        get(target, prop) {
          if (Object.prototype.hasOwnProperty.call(overrides, prop)) return (overrides as Record<PropertyKey, unknown>)[prop];
          const value: unknown = Reflect.get(target, prop, target);
          return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
        },
      });
      return wrapped;
    },
  };
  return state;
}

let dir: string;
let engine: CacheEngine | undefined;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-fill-now-'));
});

afterEach(async () => {
  await engine?.close().catch(() => undefined);
  engine = undefined;
  rmSync(dir, { recursive: true, force: true });
});

async function rig(size = 64 * BS, granule = 16 * KiB) {
  const image = randomBytes(size);
  const source = new MemorySource(image, granule);
  const paths = { cache: join(dir, 'cache'), bitmap: join(dir, 'bitmap'), metadata: join(dir, 'cache.meta') };
  const counts = countingStorage(() => paths.cache);
  const store = await CacheStore.open({ paths, backing: source, mode: 'readonly', blockSize: BS, storage: counts.storage, flashReserve: 0 });
  engine = new CacheEngine(store, source, { autoCommitMs: 0 });
  // Opening may have written the file (allocation, header): count from here.
  Object.assign(counts, { writes: 0, nowCalls: 0, nowDone: 0, syncs: 0 });
  return { image, source, store, engine, counts, paths };
}

describe('a small fill is written to the cache file in its turn (writeDataNow)', () => {
  it('a 4 KiB miss fills its 16 KiB granule with one writeNow and no write(); the bytes read back and are present only after the sync', async () => {
    const r = await rig();
    const got = await r.engine.read(5 * BS + 100, 2000);
    expect(got.equals(r.image.subarray(5 * BS + 100, 5 * BS + 2100))).toBe(true);
    expect(r.source.reads).toEqual([[4 * BS, 16 * KiB]]);
    expect(r.counts).toMatchObject({ nowCalls: 1, nowDone: 1, writes: 0 });
    // The granule's other blocks are hits now, read from the cache file (no second source read).
    const next = await r.engine.read(7 * BS, BS);
    expect(next.equals(r.image.subarray(7 * BS, 8 * BS))).toBe(true);
    expect(r.source.reads.length).toBe(1);
    // Staged, not present, until the commit's sync (invariant 1).
    expect(r.engine.stats().presentBlocks).toBe(0);
    await r.engine.flush();
    expect(r.counts.syncs).toBeGreaterThan(0);
    expect(r.engine.stats().presentBlocks).toBe(4);
    const onFile = readFileSync(r.paths.cache).subarray(4 * BS, 8 * BS);
    expect(onFile.equals(r.image.subarray(4 * BS, 8 * BS))).toBe(true);
  });

  it('a fill larger than writeNow takes (128 KiB) goes through write(), with the same bytes', async () => {
    const r = await rig(64 * BS, 0);
    const got = await r.engine.read(0, 32 * BS);
    expect(got.equals(r.image.subarray(0, 32 * BS))).toBe(true);
    expect(r.counts.nowDone).toBe(0);
    expect(r.counts.writes).toBeGreaterThan(0);
    await r.engine.flush();
    expect(readFileSync(r.paths.cache).subarray(0, 32 * BS).equals(r.image.subarray(0, 32 * BS))).toBe(true);
  });

  it('a cache file that declines writeNow gets write() with the same bytes; nothing is lost or doubled', async () => {
    const r = await rig();
    r.counts.declineNow = true;
    const got = await r.engine.read(9 * BS, BS);
    expect(got.equals(r.image.subarray(9 * BS, 10 * BS))).toBe(true);
    expect(r.counts).toMatchObject({ nowCalls: 1, nowDone: 0, writes: 1 });
    await r.engine.flush();
    expect(r.engine.stats().presentBlocks).toBe(4);
    expect(readFileSync(r.paths.cache).subarray(8 * BS, 12 * BS).equals(r.image.subarray(8 * BS, 12 * BS))).toBe(true);
  });
});
