// The unit fill of a kernel frontend (issue 12, power): after a MISS is answered, the rest of its
// eviction unit(s) is fetched from the disk in the same spin and made present in the kernel, so
// the disk wakes less often. The asked request never waits for it: it starts after the reply.
// Which misses get it: one that finds the disk idle (no miss for 5 s, engine.noteMiss: it may have
// spun up for this one), and one that continues a recent miss (it starts where one of the last 16
// misses or fills ended: a sequential reader, which then misses once per unit, not per block).
// Other misses while the disk is busy fill only what they asked: scattered hot blocks with a
// granule or a unit each filled the budget with cold neighbours (bench/budget.js on the engine's
// path: hit ratio 0.55 with whole units), and the kernel serves the hits that would tell useful
// neighbours from cold ones without the daemon seeing them.
//
// The kernel decides which blocks may be filled, atomically: CLAIM returns the blocks it holds
// neither present, dirty nor busy, and keeps them busy (a request touching one waits) until
// FILLED. A block a writer touched before the CLAIM (dirty, or pending: written whole while
// missing) is never claimed, so never overwritten; a write that comes after the CLAIM waits and
// lands on the filled block (invariants 1, 2, 5). Data is written and synced before FILLED makes
// a block present on either side (invariant 1). The fill is reserved in the budget before the
// CLAIM (evicting first if it must; never waiting for a flush: the fill is a bonus, skipped when
// there is no room), so the budget bound holds.
import type { Logger } from 'pino';
import { Bitmap } from '../cache/bitmap.js';
import type { CacheEngine } from '../cache/engine.js';
import type { Extent } from '../cache/layout.js';
import { alignedBuffer } from '../native/io.js';
import { pausePoint } from '../sys.js';
import { FailureLog } from './upcalls.js';

/** Misses remembered to tell a sequential reader (one starting where a recent one ended). */
const RECENT = 16;

/** The kernel's claim ioctls, as a unit fill uses them (uloop.h: CLAIM, FILLED). */
export interface ClaimPort {
  /**
   * CLAIM of blocks [first, first + count): the blocks the kernel holds neither present, dirty
   * nor busy are set in `bits` (bit i: block first + i) and kept busy; returns the claim's id, 0
   * when none was free. Throws (EAGAIN: too many claims outstanding; ENODEV: device gone).
   */
  claim(first: number, count: number, bits: Buffer): number;
  /**
   * FILLED of claim `id` over the claim's range: blocks set in `bits` become present in the
   * kernel, the other claimed blocks are let go, still missing. Throws ENOENT, ENODEV.
   */
  filled(id: number, first: number, count: number, bits: Buffer): void;
  /** Largest `count` one CLAIM takes (ULOOP_MAX_RANGE_BLOCKS). */
  maxBlocks: number;
  /** True once the device is removed (no CLAIM is tried then). */
  gone(): boolean;
}

/** Unit fills since attach (status: kernel.unitFills...). */
export interface UnitFillStats {
  /** Fills that made blocks present around a MISS. */
  unitFills: number;
  /** Blocks those fills made present (beyond the blocks asked). */
  unitFillBlocks: number;
  /** Fills not done: no room in the budget without a flush, too many in flight, or failed. */
  unitFillsSkipped: number;
}

export interface UnitFillerOptions {
  engine: CacheEngine;
  port: ClaimPort;
  logger: Logger;
  /** For log lines: /dev/uloop0. */
  device: string;
  /** Fills running at once; a MISS past that fills only what it asked. Default 8. */
  maxInFlight?: number;
  /** The frontend's name in the fill's pause points (`uloop:unit-claim`, `ublk:unit-claim`...). Default 'uloop'. */
  pauseTag?: string;
}

/** What status shows for a device with no unit fill (no budget, no CLAIM, or switched off). */
export const NO_UNIT_FILLS: Readonly<UnitFillStats> = Object.freeze({ unitFills: 0, unitFillBlocks: 0, unitFillsSkipped: 0 });

/** The unit fill is on unless the daemon's environment says ULOBDEV_UNIT_FILL=0 (read when a device is added). */
export function unitFillWanted(env: NodeJS.ProcessEnv = process.env): boolean {
  return env.ULOBDEV_UNIT_FILL !== '0';
}

/** Fills around answered MISSes through a ClaimPort; one per device. */
export class UnitFiller {
  readonly #engine: CacheEngine;
  readonly #port: ClaimPort;
  readonly #failures: FailureLog;
  readonly #device: string;
  readonly #maxInFlight: number;
  readonly #pauseTag: string;
  readonly #inFlight = new Set<Promise<void>>();
  #closed = false;
  readonly #stats: UnitFillStats = { ...NO_UNIT_FILLS };

  constructor(options: UnitFillerOptions) {
    this.#engine = options.engine;
    this.#port = options.port;
    this.#failures = new FailureLog(options.logger);
    this.#device = options.device;
    this.#maxInFlight = options.maxInFlight ?? 8;
    this.#pauseTag = options.pauseTag ?? 'uloop';
  }

  /**
   * A MISS of blocks [first, end) was answered (successfully): with a budget, fills the rest of
   * its eviction unit(s) in the background when the disk was idle or the miss continues a recent
   * one (see the top of this file). Call it for every answered MISS: each one restarts the
   * engine's idle clock. Never throws; a failure is logged (once a minute per kind) and counted
   * as skipped.
   */
  afterMiss(first: number, end: number): void {
    if (this.#closed) return;
    const store = this.#engine.store;
    if (!store.clock) return; // no budget: no eviction units (a miss fills what it asked)
    const idle = this.#engine.noteMiss();
    const stream = this.#ends.has(first);
    const unit = store.unitBlocks;
    const from = Math.floor(first / unit) * unit;
    const to = Math.min(this.#engine.geometry.blockCount, Math.ceil(end / unit) * unit);
    this.#remember(idle || stream ? to : end);
    if (!idle && !stream) return;
    const span = { start: from, count: to - from };
    if (span.start === first && span.count === end - first) return;
    if (this.#inFlight.size >= this.#maxInFlight) {
      this.#stats.unitFillsSkipped++;
      return;
    }
    const count = Math.min(span.count, this.#port.maxBlocks);
    const start = Math.max(span.start, Math.min(first, span.start + span.count - count));
    const p = this.#fill(start, count, first, end).catch((err: unknown) => {
      this.#stats.unitFillsSkipped++;
      if (this.#closed) return;
      const code = (err as { code?: string }).code ?? 'error';
      this.#failures.warn(`unit-fill:${code}`, `${this.#device}: the fill around a miss at block ${first} failed (${(err as Error).message}); the miss was answered, its neighbours stay missing`);
    });
    this.#inFlight.add(p);
    void p.finally(() => this.#inFlight.delete(p));
  }

  /** Where the last RECENT misses (or their fills) ended, oldest first: a miss starting at one continues it. */
  readonly #ends = new Set<number>();

  #remember(end: number): void {
    this.#ends.delete(end);
    this.#ends.add(end);
    if (this.#ends.size > RECENT) this.#ends.delete(this.#ends.values().next().value!);
  }

  /** Counts since attach. */
  stats(): UnitFillStats {
    return { ...this.#stats };
  }

  /** Resolves once the fills running now have ended (a detach, before it removes the device). */
  async drain(): Promise<void> {
    await Promise.all([...this.#inFlight]);
  }

  /** Stops new fills and resolves once the running ones have ended (before the channel's fd closes). */
  async close(): Promise<void> {
    this.#closed = true;
    await this.drain();
  }

  /** One fill of the blocks of [start, start + count) the store and the kernel both hold missing, bar the asked [askFirst, askEnd). */
  async #fill(start: number, count: number, askFirst: number, askEnd: number): Promise<void> {
    const engine = this.#engine;
    const store = engine.store;
    if (process.env.ULOBDEV_PAUSE_FILE) await pausePoint(`${this.#pauseTag}:unit-claim`);
    if (this.#closed || this.#port.gone() || store.failed) return;
    // Candidates: missing in the store, not zeroed, not asked; reserved for now. The kernel
    // narrows them (CLAIM); none is added later (a block evicted meanwhile is not reserved).
    const want = (b: number) => (b < askFirst || b >= askEnd) && !store.present.get(b) && !store.dirty.get(b);
    const bytes = Math.ceil(count / 8);
    const candidates = new Bitmap(count, Buffer.alloc(bytes));
    let reserved = 0;
    for (let b = start; b < start + count; b++) {
      if (want(b)) {
        candidates.set(b - start);
        reserved++;
      }
    }
    if (reserved === 0) return;
    if (!store.reserve(reserved)) {
      // Room by eviction only (clean units the clock picks); a budget full of dirty data gets no
      // fill: waiting for a flush for a bonus would hold the disk's reads back.
      await engine.evict(store.usedBlocks + reserved - store.budgetBlocks);
      if (!store.reserve(reserved)) {
        this.#stats.unitFillsSkipped++;
        return;
      }
    }
    let id = 0;
    let filled = false;
    try {
      const claimed = new Bitmap(count, Buffer.alloc(bytes));
      id = this.#port.claim(start, count, claimed.buffer);
      if (id === 0) return;
      // What the kernel let us have among the candidates, still missing in the store (looked at
      // again: a commit may have changed it while eviction made room).
      const take = new Bitmap(count, Buffer.alloc(bytes));
      let n = 0;
      for (const r of claimed.runs()) {
        for (let i = r.start; i < r.start + r.count; i++) {
          if (candidates.get(i) && want(start + i)) {
            take.set(i);
            n++;
          }
        }
      }
      store.release(reserved - n);
      reserved = n;
      if (n === 0) return;
      if (process.env.ULOBDEV_PAUSE_FILE) await pausePoint(`${this.#pauseTag}:unit-write`);
      const runs: Extent[] = [...take.runs()].map((r) => ({ start: start + r.start, count: r.count }));
      // One read of the disk from the first block taken to the last (one seek), written where taken.
      const g = engine.geometry;
      const from = runs[0]!.start;
      const last = runs[runs.length - 1]!;
      const to = last.start + last.count;
      const length = g.extentBytes(from, to - from);
      const buf = alignedBuffer(Math.ceil(length / 4096) * 4096).subarray(0, length);
      await engine.source.readAt(buf, g.blockOffset(from));
      for (const r of runs) {
        const at = g.blockOffset(r.start) - g.blockOffset(from);
        await store.writeData(buf.subarray(at, at + g.extentBytes(r.start, r.count)), g.blockOffset(r.start));
      }
      // Synced before either side calls them present (invariant 1).
      await store.syncData();
      if (this.#port.gone()) return;
      this.#port.filled(id, start, count, take.buffer);
      filled = true;
      store.markPresent(runs);
      store.release(n);
      reserved = 0;
      this.#stats.unitFills++;
      this.#stats.unitFillBlocks += n;
      store.notifySpace();
      engine.evictAhead();
    } finally {
      if (reserved > 0) store.release(reserved);
      // A failed fill lets the claimed blocks go, still missing (FILLED with none set).
      if (id !== 0 && !filled && !this.#port.gone()) {
        try {
          this.#port.filled(id, start, count, Buffer.alloc(bytes));
        } catch {
          // The claim ended with the daemon's fd or the device.
        }
      }
    }
  }
}
