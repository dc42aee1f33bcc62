// The unit fill of a kernel frontend (src/bdev/unit-fill.ts) against a real engine and store with
// a budget, and a fake kernel that answers CLAIM and FILLED as uloop.ko does (uloop.h: CLAIM takes
// the blocks neither present, dirty nor busy; FILLED makes the set ones present, lets the rest go).
// The VM test (test/vm/uloop-unit-fill.test.ts) runs the same against the module.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { Bitmap } from '../../src/cache/bitmap.js';
import { CacheEngine } from '../../src/cache/engine.js';
import { CacheStore } from '../../src/cache/store.js';
import { UnitFiller, type ClaimPort } from '../../src/bdev/unit-fill.js';
import { openBacking } from '../../src/source/backing.js';
import type { Source } from '../../src/source/source.js';

const KiB = 1024;
const MiB = 1 << 20;
const SIZE = 16 * MiB;
const BS = 4 * KiB;
const UNIT = 64; // blocks of 4 KiB: 256 KiB
const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** A fake uloop.ko's block states and its CLAIM/FILLED. */
function fakeKernel(blocks: number) {
  const present = new Set<number>();
  const held = new Set<number>(); // dirty or pending: a writer's
  const busy = new Set<number>();
  const claims = new Map<number, number[]>();
  let next = 1;
  const log: string[] = [];
  const port: ClaimPort = {
    maxBlocks: 1 << 16,
    gone: () => false,
    claim(first, count, bits) {
      const b = new Bitmap(count, bits);
      const mine: number[] = [];
      for (let i = 0; i < count; i++) {
        const n = first + i;
        if (n < blocks && !present.has(n) && !held.has(n) && !busy.has(n)) {
          b.set(i);
          busy.add(n);
          mine.push(n);
        }
      }
      if (mine.length === 0) return 0;
      claims.set(next, mine);
      log.push(`claim ${mine.length}`);
      return next++;
    },
    filled(id, first, count, bits) {
      const mine = claims.get(id);
      if (!mine) throw Object.assign(new Error('ENOENT'), { code: 'ENOENT' });
      claims.delete(id);
      const b = new Bitmap(count, bits);
      let set = 0;
      for (const n of mine) {
        busy.delete(n);
        if (b.get(n - first)) {
          present.add(n);
          set++;
        }
      }
      log.push(`filled ${set}`);
    },
  };
  return { present, held, busy, claims, port, log };
}

async function setup(options: { budget?: number; failReads?: () => boolean } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'ulob-unitfill-'));
  dirs.push(dir);
  const disk = join(dir, 'disk.img');
  const data = randomBytes(SIZE);
  writeFileSync(disk, data);
  const file = await openBacking(disk, { writable: true });
  const source: Source = {
    ...file,
    size: file.size,
    id: file.id,
    description: file.description,
    readAt: async (buf, position) => {
      if (options.failReads?.()) throw Object.assign(new Error('EIO'), { code: 'EIO' });
      return file.readAt(buf, position);
    },
    copyInto: undefined,
    streamInto: undefined,
    close: () => file.close(),
  };
  const paths = { cache: join(dir, 'cache'), bitmap: join(dir, 'bitmap'), metadata: join(dir, 'cache.meta') };
  const store = await CacheStore.open({ paths, backing: source, mode: 'writeback', budget: options.budget ?? SIZE / 4, evictionUnit: UNIT * BS });
  const engine = new CacheEngine(store, source, { autoCommitMs: 0, diskIdleMs: 60_000 });
  const kernel = fakeKernel(SIZE / BS);
  const filler = new UnitFiller({ engine, port: kernel.port, logger: pino({ level: 'silent' }), device: '/dev/uloop9' });
  /** A MISS of block n answered: the engine filled it, the kernel serves it, then afterMiss. */
  const miss = async (n: number) => {
    await engine.prefetch(n * BS, BS);
    kernel.present.add(n);
    filler.afterMiss(n, n + 1);
    await filler.drain();
  };
  const cacheBlock = (n: number) => readFileSync(paths.cache).subarray(n * BS, (n + 1) * BS);
  const close = async () => {
    await filler.close();
    await engine.close();
    await file.close();
  };
  return { data, store, engine, kernel, filler, miss, cacheBlock, close };
}

describe('UnitFiller', () => {
  // Planted (afterMiss returns at once): 'expected 1 to be 64' (the kernel's present count).
  it('a miss with the disk idle makes its whole unit present on both sides, holding the disk bytes, within the budget', async () => {
    const t = await setup();
    try {
      await t.miss(UNIT * 3 + 5);
      expect(t.kernel.present.size).toBe(UNIT);
      for (let n = UNIT * 3; n < UNIT * 4; n++) expect(t.kernel.present.has(n), `block ${n}`).toBe(true);
      await t.engine.flush(); // the asked block's commit
      expect(t.store.present.count(UNIT * 3, UNIT * 4)).toBe(UNIT);
      for (let n = UNIT * 3; n < UNIT * 4; n++) expect(t.cacheBlock(n).equals(t.data.subarray(n * BS, (n + 1) * BS)), `block ${n}`).toBe(true);
      expect(t.filler.stats()).toEqual({ unitFills: 1, unitFillBlocks: UNIT - 1, unitFillsSkipped: 0 });
      expect(t.store.usedBlocks).toBeLessThanOrEqual(t.store.budgetBlocks);
      expect(t.store.space().reservedBlocks).toBe(0);
      expect(t.kernel.busy.size).toBe(0);
    } finally {
      await t.close();
    }
  });

  // Planted (stream always false): 'expected 1 to be 64' (unit 4 after the miss at its start);
  // planted (every busy miss filled): 'expected 64 to be 1' (unit 9 after a scattered miss).
  it('while the disk is busy, a miss that continues a recent one (a sequential reader) gets its unit; a scattered one only what it asked', async () => {
    const t = await setup();
    try {
      const inUnit = (u: number) => [...t.kernel.present].filter((n) => n >= u * UNIT && n < (u + 1) * UNIT).length;
      await t.miss(UNIT * 3 + 5); // the disk idle: unit 3
      expect(inUnit(3)).toBe(UNIT);
      await t.miss(UNIT * 4); // busy, where the fill of unit 3 ended: unit 4
      expect(inUnit(4)).toBe(UNIT);
      await t.miss(UNIT * 9 + 17); // busy, scattered: block 593 alone
      expect(inUnit(9)).toBe(1);
      await t.miss(UNIT * 9 + 18); // busy, where that miss ended: a reader going on, unit 9
      expect(inUnit(9)).toBe(UNIT);
      expect(t.filler.stats()).toEqual({ unitFills: 3, unitFillBlocks: 3 * UNIT - 4, unitFillsSkipped: 0 });
    } finally {
      await t.close();
    }
  });

  // Planted (the span's blocks taken, not the claim's): the written block's bytes were replaced
  // by the disk's ('expected false to be true', block 70).
  it("never fills a block the kernel holds for a writer (dirty or pending), nor takes it from the kernel", async () => {
    const t = await setup();
    try {
      // Block 70 written whole while missing: the kernel put the writer's bytes in the cache file.
      const written = Buffer.alloc(BS, 0xab);
      t.kernel.held.add(UNIT + 6);
      await t.store.writeData(written, (UNIT + 6) * BS);
      await t.miss(UNIT + 5);
      expect(t.cacheBlock(UNIT + 6).equals(written)).toBe(true);
      expect(t.kernel.present.has(UNIT + 6)).toBe(false);
      expect(t.store.present.get(UNIT + 6)).toBe(false);
      expect(t.kernel.present.size).toBe(UNIT - 1);
      expect(t.filler.stats().unitFillBlocks).toBe(UNIT - 2);
    } finally {
      await t.close();
    }
  });

  // Planted (store.reserve and its eviction skipped): 'expected 0 to be greater than or equal to
  // 63' (no eviction made room; the budget was passed by the 63 blocks filled).
  it('a budget full of clean blocks evicts before the fill; one full of dirty data skips it; the budget is never passed', async () => {
    const budget = 4 * UNIT * BS; // 256 blocks
    const t = await setup({ budget });
    try {
      // The budget full of clean present blocks: 4 whole units by prefetch.
      for (let u = 0; u < 4; u++) {
        await t.engine.prefetch(u * UNIT * BS, UNIT * BS);
        for (let n = u * UNIT; n < (u + 1) * UNIT; n++) t.kernel.present.add(n);
      }
      await t.engine.flush();
      await t.engine.evict(0); // the background eviction the fills started (evictAhead) has ended
      // The rest of the budget taken, as by fills in flight.
      const free = t.store.budgetBlocks - t.store.usedBlocks;
      expect(t.store.reserve(free)).toBe(true);
      const evicted = t.engine.stats().evictedBlocks;
      // The asked block answered outside the store's count (as a kernel's present, uncommitted
      // fill): the unit fill alone needs 63 blocks of room.
      t.kernel.present.add(10 * UNIT + 1);
      t.filler.afterMiss(10 * UNIT + 1, 10 * UNIT + 2);
      await t.filler.drain();
      expect(t.store.usedBlocks).toBeLessThanOrEqual(t.store.budgetBlocks);
      expect(t.engine.stats().evictedBlocks - evicted).toBeGreaterThanOrEqual(UNIT - 1);
      expect(t.filler.stats()).toEqual({ unitFills: 1, unitFillBlocks: UNIT - 1, unitFillsSkipped: 0 });
      t.store.release(free);
    } finally {
      await t.close();
    }
    const d = await setup({ budget });
    try {
      // All but 2 blocks dirty: no eviction can make room, and the fill does not wait for a flush.
      await d.engine.write(0, Buffer.alloc((4 * UNIT - 2) * BS, 1));
      await d.miss(10 * UNIT + 1);
      expect(d.store.usedBlocks).toBeLessThanOrEqual(d.store.budgetBlocks);
      expect(d.filler.stats()).toEqual({ unitFills: 0, unitFillBlocks: 0, unitFillsSkipped: 1 });
      expect(d.kernel.busy.size).toBe(0);
      expect(d.kernel.present.size).toBe(1);
    } finally {
      await d.close();
    }
  }, 30_000);

  // Planted (no FILLED in the finally): the claimed blocks stayed busy ('expected 63 to be 0').
  it('a failed disk read lets the claimed blocks go, still missing, and gives the reservation back', async () => {
    let fail = false;
    const t = await setup({ failReads: () => fail });
    try {
      await t.engine.prefetch(5 * BS, BS);
      t.kernel.present.add(5);
      const reserved = t.store.space().reservedBlocks; // the asked block's staged fill
      fail = true;
      t.filler.afterMiss(5, 6);
      await t.filler.drain();
      expect(t.kernel.busy.size).toBe(0);
      expect(t.kernel.claims.size).toBe(0);
      expect(t.kernel.present.size).toBe(1);
      expect(t.store.space().reservedBlocks).toBe(reserved);
      expect(t.filler.stats()).toEqual({ unitFills: 0, unitFillBlocks: 0, unitFillsSkipped: 1 });
    } finally {
      fail = false;
      await t.close();
    }
  });
});
