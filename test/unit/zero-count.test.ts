// CacheStore.zeroBlocks() (zeroed blocks: dirty and not present) is a count kept where the bits
// change, not a walk of every dirty run per call: status and the write-back scheduler's tick call
// it, and with ~65k dirty runs the walk took ~10 ms of the event loop each time (session 11's
// profile). Checked here: the kept count equals a walk of the bitmaps after every step of a
// seeded mix of TRIMs, reads (fills), first writes, rewrites and flushes through the engine, and a
// call does not walk the dirty bitmap.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { CacheEngine } from '../../src/cache/engine.js';
import { CacheStore, type CachePaths } from '../../src/cache/store.js';
import { openBacking } from '../../src/source/backing.js';
import type { FileSource } from '../../src/source/file-source.js';
import { flushDirty } from '../../src/writeback/flusher.js';

const BS = 4096;
const BLOCKS = 96;

let dir: string;
let cleanups: (() => unknown)[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-zero-count-'));
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

async function rig(): Promise<{ engine: CacheEngine; store: CacheStore; source: FileSource }> {
  const disk = join(dir, 'disk.img');
  writeFileSync(disk, randomBytes(BLOCKS * BS));
  const paths: CachePaths = { cache: join(dir, 'c'), bitmap: join(dir, 'c.bitmap'), metadata: join(dir, 'c.meta') };
  const source = (await openBacking(disk, { writable: true })) as FileSource;
  cleanups.push(() => source.close());
  const store = await CacheStore.open({ paths, backing: source, mode: 'writeback', blockSize: BS });
  const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
  cleanups.push(() => engine.close());
  return { engine, store, source };
}

/** The count as the bitmaps say it, block by block. */
function walked(store: CacheStore): number {
  let n = 0;
  for (let b = 0; b < BLOCKS; b++) if (store.dirty.get(b) && !store.present.get(b)) n++;
  return n;
}

/** A small seeded generator (the mix is the same every run). */
function lcg(seed: number): () => number {
  let x = seed >>> 0;
  return () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return x / 2 ** 32;
  };
}

describe('CacheStore.zeroBlocks', () => {
  it('is kept equal to the bitmaps through TRIMs, fills, first writes, rewrites and flushes', async () => {
    const { engine, store } = await rig();
    expect(store.zeroBlocks()).toBe(0);
    const rnd = lcg(15);
    const steps: string[] = [];
    for (let i = 0; i < 160; i++) {
      const first = Math.floor(rnd() * BLOCKS);
      const count = 1 + Math.floor(rnd() * Math.min(8, BLOCKS - first));
      const r = rnd();
      if (r < 0.25) {
        await engine.zero(first * BS, count * BS);
        steps.push(`zero ${first}+${count}`);
      } else if (r < 0.45) {
        await engine.read(first * BS, count * BS);
        await engine.flush();
        steps.push(`read ${first}+${count}`);
      } else if (r < 0.85) {
        await engine.write(first * BS, randomBytes(count * BS));
        await engine.flush();
        steps.push(`write ${first}+${count}`);
      } else {
        await flushDirty(engine);
        steps.push('flush');
      }
      // The step list in the message says which step broke the count.
      expect({ step: i, last: steps.slice(-3), count: store.zeroBlocks() }).toEqual({ step: i, last: steps.slice(-3), count: walked(store) });
    }
    // The mix reached every state the count moves through.
    expect(steps.filter((s) => s.startsWith('zero')).length).toBeGreaterThan(15);
    expect(steps.filter((s) => s === 'flush').length).toBeGreaterThan(8);
  });

  it('does not walk the dirty runs per call; a bitmap written directly (changed()) is counted again', async () => {
    const { engine, store } = await rig();
    await engine.zero(0, 10 * BS);
    await engine.write(40 * BS, randomBytes(4 * BS));
    await engine.flush();
    expect(store.zeroBlocks()).toBe(10);
    const runs = vi.spyOn(store.dirty, 'runs');
    for (let i = 0; i < 100; i++) expect(store.zeroBlocks()).toBe(10);
    // A write into zeroed blocks and a TRIM elsewhere move the count by the range alone.
    await engine.write(2 * BS, randomBytes(3 * BS));
    await engine.flush();
    await engine.zero(60 * BS, 2 * BS);
    runs.mockClear();
    expect(store.zeroBlocks()).toBe(10 - 3 + 2);
    expect(runs).not.toHaveBeenCalled();
    // A zeroed block made present by a write the store did not see (uloop's committed runs:
    // src/bdev/uloop.ts calls markPresent for whole blocks the kernel wrote): no longer zeroed.
    store.markPresent([{ start: 61, count: 1 }]);
    expect(store.zeroBlocks()).toBe(10 - 3 + 1);
    expect(store.zeroBlocks()).toBe(walked(store));
    // Written behind the store's back (as a kernel's bitmap copy would be), then changed(): recounted.
    runs.mockClear();
    store.present.buffer[7] = 0xff; // blocks 56-63: 60 now reads as present too
    store.present.changed();
    expect(store.zeroBlocks()).toBe(walked(store));
    expect(runs).toHaveBeenCalledTimes(1);
    runs.mockRestore();
  });
});
