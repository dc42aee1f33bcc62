// Model-based crash test of the uloop protocol's daemon side: fast-check drives a model of the
// kernel module's block state (kernel/uloop.c as docs/design.md tells it: present, dirty, pending;
// MISS, INTENT, take-then-sync FLUSH with a BARRIER, epochs with PRESERVE) that writes the cache
// file itself, and behind it the real UpcallHandler, kernelEpochs wiring, engine, store and
// metadata over crashable model files (test/support/crashable.ts), against a model disk that
// knows, per 512-byte sector, which contents a crash may leave (as test/support/engine-model.ts).
//
// Crashes: a power loss at the n-th persistence point (cache, bitmap, metadata, backing writes and
// syncs, the kernel's own writes and syncs, the barrier's and the epochs' transactions) loses the
// kernel's state with everything unsynced, and the cache is ADDed again from the store's bits; a
// daemon kill (kill -9) keeps the kernel's state and the page cache, reopens the store and
// re-attaches the way src/bdev/uloop.ts does (a FLUSH hands the pending blocks over). After a
// power loss every sector must hold a content the model allows; after a daemon kill, exactly what
// was acknowledged (the request in flight: old or new); after every completed flush the disk must
// be the device's image at the flush's start (invariant 7), also with a write racing the copy.
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import pino from 'pino';
import { expect } from 'vitest';
import { Bitmap } from '../../src/cache/bitmap.js';
import { CacheEngine } from '../../src/cache/engine.js';
import { CacheStore, type CachePaths } from '../../src/cache/store.js';
import { FileSource } from '../../src/source/file-source.js';
import type { BlockFile } from '../../src/storage/storage.js';
import { flushDirty } from '../../src/writeback/flusher.js';
import { kernelCredit, kernelEpochs } from '../../src/bdev/uloop.js';
import { UpcallHandler, type Upcall } from '../../src/bdev/upcalls.js';
import { CrashWorld, Rng, SECTOR, SimulatedCrash, type CrashKind } from './crashable.js';
import { decodeSector, sectorBytes, ZERO_TAG, type ModelConfig } from './engine-model.js';

const BASE_TAG = 1;
const silent = pino({ enabled: !!process.env.ULOB_MODEL_DEBUG });

class KernelError extends Error {
  constructor(
    readonly code: string,
    what: string,
  ) {
    super(`${code}: ${what}`);
  }
}

/** The kernel module's side, as a model: the block state and the request path of kernel/uloop.c. */
class KernelModel {
  readonly present: Bitmap;
  readonly dirty: Bitmap;
  pending: Bitmap;
  #barPending: Bitmap | null = null;
  #epoch = 0;
  #open = 0;
  #snap: Bitmap | null = null;
  #rewritten: Bitmap | null = null;
  #preserved: Bitmap | null = null;
  #epochFailed = false;
  #nextId = 1;
  /** Requests in flight per block (past their last prepare pass): EVICT leaves these blocks. */
  #inflight: Uint16Array;
  /** Requests between their first and last prepare pass per block: EVICT leaves these too. */
  #preparing: Uint16Array;
  /** Those requests' ranges in arrival order (dev->preparing): a pinned EVICT leaves the oldest's. */
  readonly #preparingList: [number, number][] = [];
  /** CREDIT's limit on unasked(), null: none (ADD, ATTACH). ULOB_MODEL_NO_CREDIT: ignored. */
  credit: number | null = null;
  /** Blocks written whole while missing by writes in flight; ROOM grants not yet taken. */
  #owned = 0;
  #granted = 0;
  handler: UpcallHandler | null = null;
  /** The daemon's credit policy (src/bdev/uloop.ts kernelCredit) while one is attached with a budget. */
  creditPolicy: ReturnType<typeof kernelCredit> | null = null;

  /** ULOOP_F_ACCESSED: one bit per unit, set on every request served. */
  readonly accessedBits: Bitmap | null;

  constructor(
    readonly file: BlockFile,
    readonly blockSize: number,
    readonly size: number,
    storePresent: Bitmap,
    storeDirty: Bitmap,
    /** ULOOP_F_ZERO: the present bitmap is taken as is (dirty without present: a zero block). */
    readonly zeroFlag = false,
    readonly unitBlocks = 0,
  ) {
    const n = storePresent.bits;
    this.present = new Bitmap(n);
    this.dirty = new Bitmap(n);
    this.pending = new Bitmap(n);
    this.#inflight = new Uint16Array(n);
    this.#preparing = new Uint16Array(n);
    this.accessedBits = unitBlocks > 0 ? new Bitmap(Math.ceil(n / unitBlocks)) : null;
    for (const r of storePresent.runs()) this.present.setRange(r.start, r.start + r.count);
    for (const r of storeDirty.runs()) {
      // ADD without ULOOP_F_ZERO: present is widened to include dirty.
      if (!zeroFlag) this.present.setRange(r.start, r.start + r.count);
      this.dirty.setRange(r.start, r.start + r.count);
    }
  }

  #touch(first: number, end: number): void {
    if (!this.accessedBits) return;
    for (let u = Math.floor(first / this.unitBlocks); u <= Math.floor((end - 1) / this.unitBlocks); u++) this.accessedBits.set(u);
  }

  /** A MISS answered: present; a zero block (dirty, not present) also pending (review finding 2). */
  #missDone(blocks: number[]): void {
    for (const b of blocks) {
      if (this.dirty.get(b)) this.pending.set(b);
      this.present.set(b);
    }
  }

  /**
   * EVICT: of the blocks set in `bits`, those present, clean, not pending, not in flight and not in
   * a request still preparing (`pinned`, ULOOP_EVICT_F_PINNED: not in the oldest such request)
   * stop being served.
   */
  evict(first: number, count: number, bits: Buffer, pinned = false): number {
    const set = new Bitmap(count, bits);
    const oldest = this.#preparingList[0];
    // ULOB_MODEL_PINNED_ALL (a planted bug): a pinned EVICT leaves no request's blocks.
    const kept = (b: number) => (pinned ? !process.env.ULOB_MODEL_PINNED_ALL && oldest !== undefined && b >= oldest[0] && b < oldest[1] : this.#preparing[b] !== 0);
    let n = 0;
    for (let i = 0; i < count; i++) {
      if (!set.get(i)) continue;
      const b = first + i;
      // (The kernel waits for the requests in flight on them; refusing is the same to the store.)
      if (this.present.get(b) && !this.dirty.get(b) && !this.pending.get(b) && this.#inflight[b] === 0 && (!kept(b) || !!process.env.ULOB_MODEL_EVICT_PREPARING)) {
        this.present.clear(b);
        n++;
      } else set.clear(i);
    }
    return n;
  }

  /**
   * EVICT with ULOOP_EVICT_F_HOLD: as evict, and a claim id when anything was evicted. The model
   * runs one request at a time, and none between an eviction and its punch, so the hold (the
   * blocks busy until FILLED) changes nothing here; the daemon's side of it runs.
   */
  evictHeld(first: number, count: number, bits: Buffer, pinned = false): { done: number; id: number } {
    const done = this.evict(first, count, bits, pinned);
    return { done, id: done > 0 ? this.#nextId++ : 0 };
  }

  /** CLAIM: blocks of [first, first + count) neither present, dirty nor in a request into `bits`; the claim's id or 0. */
  claim(first: number, count: number, bits: Buffer): number {
    const out = new Bitmap(count, bits);
    let n = 0;
    for (let i = 0; i < count; i++) {
      const b = first + i;
      if (!this.present.get(b) && !this.dirty.get(b) && this.#inflight[b] === 0 && this.#preparing[b] === 0) {
        out.set(i);
        n++;
      }
    }
    return n > 0 ? this.#nextId++ : 0;
  }

  /** ACCESSED: units [first, first + count) into `bits`, cleared. */
  accessed(first: number, count: number, bits: Buffer): number {
    const out = new Bitmap(count, bits);
    let n = 0;
    for (let i = 0; i < count; i++) {
      if (this.accessedBits!.get(first + i)) {
        out.set(i);
        this.accessedBits!.clear(first + i);
        n++;
      }
    }
    return n;
  }

  /** What CREDIT limits (uloop_unasked): pending, handed to the barrier in flight, owned, granted. */
  unasked(): number {
    return this.pending.count() + (this.#barPending?.count() ?? 0) + this.#owned + this.#granted;
  }

  /** CREDIT: the limit (-1: none); returns it and unasked(). */
  setCredit(limit: number): { limit: number; unasked: number } {
    if (!Number.isInteger(limit) || limit < -1 || limit > this.blocks) throw new KernelError('EINVAL', `credit limit ${limit}`);
    this.credit = limit < 0 ? null : limit;
    return { limit, unasked: this.unasked() };
  }

  /** Runs uloop_prepare's passes with blocks [first, end) preparing (EVICT leaves them). */
  async #preparingRange<T>(first: number, end: number, passes: () => Promise<T>): Promise<T> {
    for (let b = first; b < end; b++) this.#preparing[b]!++;
    const entry: [number, number] = [first, end];
    this.#preparingList.push(entry);
    try {
      return await passes();
    } finally {
      for (let b = first; b < end; b++) this.#preparing[b]!--;
      this.#preparingList.splice(this.#preparingList.indexOf(entry), 1);
    }
  }

  /** Blocks dirty and not present. */
  zeroBlocks(): number {
    let n = 0;
    for (const r of this.dirty.runs()) n += r.count - this.present.count(r.start, r.start + r.count);
    return n;
  }

  /**
   * DISCARD / WRITE_ZEROES of [offset, offset + length) (ULOOP_F_ZERO): the parts of blocks at
   * either end are written with zeros; whole blocks are preserved for an open epoch first, then a
   * ZERO upcall, then they are dirty and not present.
   */
  async zero(offset: number, length: number): Promise<void> {
    const bs = this.blockSize;
    const end = offset + length;
    const wf = Math.ceil(offset / bs);
    const we = end === this.size ? Math.ceil(this.size / bs) : Math.floor(end / bs);
    if (wf >= we) return this.write(offset, Buffer.alloc(length));
    if (wf * bs > offset) await this.write(offset, Buffer.alloc(wf * bs - offset));
    await this.#preserve(wf, we);
    this.#touch(wf, we);
    // A ZERO the daemon read and never answered (it was killed) stays held, its blocks busy, and
    // goes to the next daemon (uloop_holds_detach): reissueZero.
    this.heldZero = [wf, we];
    await this.#ask('zero', wf, we);
    this.heldZero = null;
    this.#zeroApplied(wf, we);
    const tail = Math.min(end, we * bs);
    if (end > tail) await this.write(tail, Buffer.alloc(end - tail));
  }

  #zeroApplied(wf: number, we: number): void {
    for (let b = wf; b < we; b++) {
      this.present.clear(b);
      this.dirty.set(b);
      this.pending.clear(b);
    }
  }

  /** Blocks of a ZERO whose daemon was killed before answering: held (busy), sent again. */
  heldZero: [number, number] | null = null;

  /** After a re-attach: the held ZERO to the new daemon; applied when it answers. */
  async reissueZero(): Promise<void> {
    const z = this.heldZero;
    if (!z) return;
    await this.#ask('zero', z[0], z[1]);
    this.heldZero = null;
    this.#zeroApplied(z[0], z[1]);
  }

  async #preserve(first: number, end: number): Promise<void> {
    if (!this.#open || !this.#snap) return;
    const epoch = this.#open;
    const todo: number[] = [];
    for (let b = first; b < end; b++) {
      if (this.#snap.get(b)) this.#rewritten!.set(b);
      if (this.#snap.get(b) && !this.#preserved!.get(b)) todo.push(b);
    }
    try {
      await this.#askRuns('preserve', todo, epoch);
    } catch {
      if (this.#open === epoch) this.#epochFailed = true;
    }
    if (this.#open === epoch) for (const b of todo) this.#preserved!.set(b);
  }

  get blocks(): number {
    return this.present.bits;
  }

  async #ask(type: Upcall['type'], first: number, end: number, epoch = 0): Promise<void> {
    if (!this.handler) throw new KernelError('EIO', 'no daemon');
    const offset = first * this.blockSize;
    const length = Math.min(end * this.blockSize, this.size) - offset;
    const err = await this.handler.run({ id: this.#nextId++, type, offset, length, epoch });
    if (err < 0) throw new KernelError('EIO', `${type} failed (${err})`);
  }

  async #askRuns(type: Upcall['type'], blocks: number[], epoch = 0): Promise<void> {
    let i = 0;
    while (i < blocks.length) {
      let j = i + 1;
      while (j < blocks.length && blocks[j] === blocks[j - 1]! + 1) j++;
      await this.#ask(type, blocks[i]!, blocks[j - 1]! + 1, epoch);
      i = j;
    }
  }

  #range(offset: number, length: number): [number, number] {
    return [Math.floor(offset / this.blockSize), Math.ceil((offset + length) / this.blockSize)];
  }

  /** Runs `io` with blocks [first, end) in flight (after the request's last prepare pass). */
  async #inFlight<T>(first: number, end: number, io: () => Promise<T>): Promise<T> {
    for (let b = first; b < end; b++) this.#inflight[b]!++;
    try {
      return await io();
    } finally {
      for (let b = first; b < end; b++) this.#inflight[b]!--;
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const [first, end] = this.#range(offset, length);
    // uloop_prepare loops until a pass finds nothing to ask; the blocks of a request in its
    // passes are not evicted (a block filled for it would be filled again, for ever).
    let missed = false;
    await this.#preparingRange(first, end, async () => {
      for (;;) {
        const missing: number[] = [];
        for (let b = first; b < end; b++) if (!this.present.get(b)) missing.push(b);
        if (missing.length === 0) break;
        missed = true;
        await this.#askRuns('miss', missing);
        this.#missDone(missing);
      }
    });
    // As uloop.c: a read that missed is not a use.
    if (!missed) this.#touch(first, end);
    const buf = Buffer.alloc(length);
    await this.#inFlight(first, end, () => this.file.read(buf, offset));
    return buf;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    const [first, end] = this.#range(offset, data.byteLength);
    const whole = (b: number) => offset <= b * this.blockSize && offset + data.byteLength >= Math.min((b + 1) * this.blockSize, this.size);
    // uloop_prepare's passes, until one finds nothing to ask (a block filled or found present in
    // one pass is not evicted meanwhile: the request is preparing). `room`: its ROOM grant.
    let room = 0;
    let wholeMissing: number[] = [];
    try {
      await this.#preparingRange(first, end, async () => {
        for (;;) {
          // Rule 5: a partly written missing block is filled first.
          const partial: number[] = [];
          for (let b = first; b < end; b++) if (!this.present.get(b) && !whole(b)) partial.push(b);
          if (partial.length > 0) {
            await this.#askRuns('miss', partial);
            this.#missDone(partial);
            continue;
          }
          // Point-in-time epochs: the first change to a block of the snapshot waits for a PRESERVE.
          await this.#preserve(first, end);
          // Rule 3: a present clean block is made durably dirty before it changes.
          const intents: number[] = [];
          for (let b = first; b < end; b++) if (this.present.get(b) && !this.dirty.get(b)) intents.push(b);
          if (intents.length > 0) {
            await this.#askRuns('intent', intents);
            for (const b of intents) this.dirty.set(b);
            continue;
          }
          // The credit: whole missing blocks past the limit wait for ROOM (the range is their span,
          // `epoch` their count n, and the grant is n; its own unused grant is not counted twice).
          wholeMissing = [];
          for (let b = first; b < end; b++) if (!this.present.get(b)) wholeMissing.push(b);
          const n = wholeMissing.length;
          if (this.credit !== null && !process.env.ULOB_MODEL_NO_CREDIT && n > room && this.unasked() - room + n > this.credit) {
            await this.#ask('room', wholeMissing[0]!, wholeMissing[n - 1]! + 1, n);
            // The answer grants n and raises the limit by as much, in one step (uloop_reply).
            this.#granted += n - room;
            if (this.credit !== null) this.credit = Math.min(this.credit + (n - room), this.blocks);
            room = n;
            continue;
          }
          break;
        }
      });
    } catch (err) {
      this.#granted -= room;
      throw err;
    }
    // The last pass: the grant is used, the whole missing blocks owned until the write ends.
    this.#granted -= room;
    this.#owned += wholeMissing.length;
    this.#touch(first, end);
    let ok = false;
    try {
      await this.#inFlight(first, end, () => this.file.write(data, offset));
      ok = true;
    } finally {
      this.#owned -= wholeMissing.length;
      // Rule 4: whole missing blocks are written at once and handed over at the next barrier.
      if (ok) {
        for (const b of wholeMissing) {
          this.present.set(b);
          this.dirty.set(b);
          this.pending.set(b);
        }
      }
    }
  }

  /**
   * BARRIER (ULOOP_IOC_BARRIER, the daemon's own): what a FLUSH does to the pending set, with no
   * page cache written back first (the model has none: a FLUSH of the device is the same here).
   * Resolves with the blocks handed over.
   */
  async barrier(): Promise<number> {
    const n = this.pending.count();
    await this.flush();
    return n;
  }

  /** FLUSH: take the pending set, then sync (take-then-sync), then a BARRIER if anything was taken. */
  async flush(): Promise<void> {
    const taken = this.pending;
    this.pending = new Bitmap(this.blocks);
    try {
      await this.file.sync();
      if (taken.count() > 0) {
        this.#barPending = taken;
        await this.#ask('barrier', 0, 0);
      }
    } catch (err) {
      for (const r of taken.runs()) this.pending.setRange(r.start, r.start + r.count);
      throw err;
    } finally {
      this.#barPending = null;
    }
  }

  barrierBlocks(): Bitmap {
    if (!this.#barPending) throw new KernelError('ENOENT', 'no barrier outstanding');
    return this.#barPending.clone();
  }

  epochBegin(dirty: Buffer): number {
    this.#open = ++this.#epoch;
    this.#snap = this.dirty.clone();
    this.#rewritten = new Bitmap(this.blocks);
    this.#preserved = new Bitmap(this.blocks);
    this.#epochFailed = false;
    this.#snap.buffer.copy(dirty, 0, 0, Math.min(dirty.byteLength, this.#snap.buffer.byteLength));
    return this.#open;
  }

  epochCommit(epoch: number, flushed: Buffer): void {
    if (epoch !== this.#open) throw new KernelError('ESTALE', `epoch ${epoch} is not open`);
    const failed = this.#epochFailed;
    const cleared = new Bitmap(this.blocks, flushed);
    for (let b = 0; b < this.blocks; b++) {
      if (!cleared.get(b)) continue;
      if (failed || this.#rewritten!.get(b) || !this.dirty.get(b) || this.pending.get(b)) cleared.clear(b);
      else this.dirty.clear(b);
    }
    this.#open = 0;
    this.#snap = this.#rewritten = this.#preserved = null;
    if (failed) throw new KernelError('ECANCELED', 'a PRESERVE failed');
  }
}

interface Model {
  sectors: number;
  current: Uint32Array;
  stable: Uint32Array;
  since: Map<number, Set<number>>;
  nextTag: number;
  /** The disk's content whenever no flush runs: the last completed flush's image. */
  image: Uint32Array;
  /** The image of the flush running now (a crash may leave the disk torn between the two). */
  flushing: Uint32Array | null;
  /**
   * A flush started by a fill waiting for room in the budget runs now: the disk may take, per
   * sector, any content the device held since the last flush (checked by expectPressureImage).
   */
  pressure: boolean;
}

interface Real {
  world: CrashWorld;
  rng: Rng;
  paths: CachePaths;
  backingPath: string;
  size: number;
  blockSize: number;
  engine: CacheEngine;
  kernel: KernelModel;
  /** ULOOP_F_ZERO, and a budget of budgetBlocks in units of unitBlocks (ULOOP_F_ACCESSED, EVICT). */
  zero: boolean;
  budgetBlocks?: number;
  unitBlocks: number;
  model?: Model;
}

async function openEngine(real: Omit<Real, 'engine' | 'kernel'>, servedByKernel = false): Promise<CacheEngine> {
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
    servedByKernel,
    storage,
    metadata: real.world.metadata(),
  });
  // Fills of 2 blocks or more are staged and locked as ranges, single blocks one by one: both run.
  const engine = new CacheEngine(store, source, { autoCommitMs: 0, cowMemoryBytes: real.blockSize, rangeFillBlocks: 2 });
  // A fill waiting for room in a budget full of dirty data: a flush, as the scheduler's 'budget'.
  engine.onSpacePressure = () => pressureFlush(real as Real, engine);
  return engine;
}

/**
 * A flush started by a fill that waits for room. The disk may then hold, per sector, any content
 * the device held since the last flush (the write in flight among them); whatever it holds
 * becomes the image the next checks compare with.
 */
async function pressureFlush(real: Real, engine: CacheEngine): Promise<void> {
  const model = real.model!;
  model.pressure = true;
  await flushDirty(engine);
  model.pressure = false;
  expectPressureImage(model, real.world.file(real.backingPath).visible, 'after a budget flush');
}

function expectPressureImage(model: Model, disk: Buffer, what: string): void {
  for (let s = 0; s < model.sectors; s++) {
    const got = decodeSector(disk.subarray(s * SECTOR, (s + 1) * SECTOR), s);
    const ok = [model.image[s]!, model.current[s]!, model.stable[s]!, ...(model.since.get(s) ?? []), ...(model.flushing ? [model.flushing[s]!] : [])];
    if (!ok.includes(got)) expect.fail(`${what}: disk sector ${s} holds ${got === -1 ? 'garbage' : `write ${got}`}; allowed: ${ok.join(', ')}`);
    model.image[s] = got;
  }
}

/** Binds the daemon side (the real handler and epoch wiring) to the kernel model: ADD or ATTACH. */
function attachDaemon(engine: CacheEngine, kernel: KernelModel): ReturnType<typeof kernelEpochs> {
  // ATTACH (and ADD) leave no limit; with a budget the daemon sets its credit before any upcall.
  kernel.credit = null;
  const credit = engine.store.budget !== null ? kernelCredit(engine, { credit: (limit) => kernel.setCredit(limit), limit: () => kernel.credit ?? -1, gone: () => false }) : null;
  kernel.creditPolicy = credit;
  credit?.update();
  const epochs = kernelEpochs(engine, {
    begin: (dirty) => kernel.epochBegin(dirty),
    commit: (epoch, flushed) => kernel.epochCommit(epoch, flushed),
    dirtyBlocks: () => kernel.dirty.count(),
    gone: () => false,
    device: '/dev/uloop0',
    zeroAndPending: () => ({ zeroBlocks: kernel.zeroBlocks(), pendingBlocks: kernel.pending.count() }),
    // The daemon takes the pending set with BARRIER (src/bdev/uloop.ts flushDevice).
    flush: () => kernel.barrier().then(() => undefined),
    ...(kernel.accessedBits
      ? {
          evict: (f: number, c: number, bits: Buffer, pinned?: boolean) => kernel.evict(f, c, bits, pinned === true),
          evictHeld: (f: number, c: number, bits: Buffer, pinned?: boolean) => kernel.evictHeld(f, c, bits, pinned === true),
          accessed: (f: number, c: number, bits: Buffer) => kernel.accessed(f, c, bits),
        }
      : {}),
    // FILLED with none set changes nothing in the model (no request waits on a claim here).
    ...(process.env.ULOB_MODEL_NO_PRESENT_RECONCILE ? {} : { claim: (f: number, c: number, bits: Buffer) => kernel.claim(f, c, bits), letGo: () => undefined }),
  });
  engine.externalEpochs = epochs.external;
  kernel.handler = new UpcallHandler({
    engine,
    logger: silent,
    device: '/dev/uloop0',
    port: {
      barrierBlocks: () => kernel.barrierBlocks(),
      preserve: (epoch, first, end) => epochs.preserve(epoch, first, end),
      ...(credit ? { room: (n: number) => credit.room(n), handedOver: (n: number) => credit.handedOver(n) } : {}),
    },
  });
  return epochs;
}

async function addDevice(real: Omit<Real, 'kernel'>): Promise<KernelModel> {
  const file = await real.world.storage().open(real.paths.cache);
  const kernel = new KernelModel(file, real.blockSize, real.size, real.engine.store.present, real.engine.store.dirty, real.zero, real.budgetBlocks === undefined ? 0 : real.unitBlocks);
  attachDaemon(real.engine, kernel);
  return kernel;
}

function writeSectors(first: number, count: number, tag: number): Buffer {
  const parts: Buffer[] = [];
  for (let s = first; s < first + count; s++) parts.push(sectorBytes(tag, s));
  return Buffer.concat(parts);
}

function expectDiskIsImage(model: Model, disk: Buffer, what: string): void {
  for (let s = 0; s < model.sectors; s++) {
    const got = decodeSector(disk.subarray(s * SECTOR, (s + 1) * SECTOR), s);
    if (got !== model.image[s]) expect.fail(`${what}: disk sector ${s} holds ${got === -1 ? 'garbage' : `write ${got}`}, the flush's image has write ${model.image[s]}`);
  }
}

/** Reads the whole device through the kernel; each sector must be one `allowed` says. */
async function expectDevice(model: Model, real: Real, allowed: (s: number) => number[], what: string): Promise<void> {
  // The kernel's requests are bounded (1 MiB) and a budget holds more than one: with a budget the
  // device is read a block per request, never in one miss larger than the whole budget.
  const step = real.budgetBlocks === undefined ? real.size : real.blockSize;
  const parts: Buffer[] = [];
  for (let off = 0; off < real.size; off += step) parts.push(await real.kernel.read(off, Math.min(step, real.size - off)));
  const all = Buffer.concat(parts);
  for (let s = 0; s < model.sectors; s++) {
    const got = decodeSector(all.subarray(s * SECTOR, (s + 1) * SECTOR), s);
    const ok = allowed(s);
    if (!ok.includes(got)) expect.fail(`${what}: sector ${s} holds ${got === -1 ? 'garbage' : `write ${got}`}; allowed: ${ok.join(', ')}`);
    model.current[s] = got;
  }
}

export type UloopOp =
  | { kind: 'read'; sector: number; count: number }
  | { kind: 'write'; sector: number; count: number; fua: boolean }
  | { kind: 'flush' }
  | { kind: 'writeback' }
  | { kind: 'writeback-racing'; sector: number; count: number; split: number }
  | { kind: 'zero'; sector: number; count: number }
  | { kind: 'evict'; blocks: number };

function clip(model: Model, sector: number, count: number): [number, number] {
  const s = sector % model.sectors;
  return [s, Math.max(1, Math.min(count, model.sectors - s))];
}

/** Sectors the op writes (for a crash in its middle: old or new). */
function written(model: Model, op: UloopOp): [number, number] | null {
  return op.kind === 'write' || op.kind === 'writeback-racing' || op.kind === 'zero' ? clip(model, op.sector, op.count) : null;
}

/** The model's side of a write of `tag` (0: zeros) to sectors [sector, sector + count). */
function noteWrite(model: Model, sector: number, count: number, tag: number): void {
  for (let x = sector; x < sector + count; x++) {
    model.current[x] = tag;
    let set = model.since.get(x);
    if (!set) model.since.set(x, (set = new Set()));
    set.add(tag);
  }
}

async function kernelWrite(model: Model, real: Real, sector: number, count: number, fua: boolean): Promise<void> {
  const tag = model.nextTag++;
  noteWrite(model, sector, count, tag);
  await real.kernel.write(sector * SECTOR, writeSectors(sector, count, tag));
  if (fua) {
    await real.kernel.flush();
    for (let x = sector; x < sector + count; x++) {
      model.stable[x] = tag;
      model.since.delete(x);
    }
  }
}

async function runOp(op: UloopOp, model: Model, real: Real): Promise<void> {
  const { engine, kernel } = real;
  switch (op.kind) {
    case 'read': {
      const [s, n] = clip(model, op.sector, op.count);
      const buf = await kernel.read(s * SECTOR, n * SECTOR);
      for (let i = 0; i < n; i++) {
        const got = decodeSector(buf.subarray(i * SECTOR, (i + 1) * SECTOR), s + i);
        if (got !== model.current[s + i]) expect.fail(`read: sector ${s + i} holds ${got}, expected write ${model.current[s + i]}`);
      }
      return;
    }
    case 'write': {
      const [s, n] = clip(model, op.sector, op.count);
      await kernelWrite(model, real, s, n, op.fua);
      return;
    }
    case 'zero': {
      const [s, n] = clip(model, op.sector, op.count);
      noteWrite(model, s, n, ZERO_TAG);
      await kernel.zero(s * SECTOR, n * SECTOR);
      return;
    }
    case 'evict': {
      // What the daemon's poll does: the kernel's pending blocks count as used; evict ahead.
      kernel.creditPolicy?.update();
      await engine.evict(op.blocks);
      return;
    }
    case 'flush':
      await kernel.flush();
      model.stable.set(model.current);
      model.since.clear();
      return;
    case 'writeback': {
      const image = Uint32Array.from(model.current);
      const exact = kernel.pending.count() === 0;
      model.flushing = image;
      await flushDirty(engine);
      model.flushing = null;
      // Only blocks the store had recorded (barrier, intent) are flushed: the rest keep the old image.
      mergeImage(model, real, image, exact);
      expectDiskIsImage(model, real.world.file(real.backingPath).visible, 'after a flush');
      return;
    }
    case 'writeback-racing': {
      // A write to the device while the flusher copies the epoch's blocks: the write waits for a
      // PRESERVE of each block of the epoch it changes; the disk must get the epoch's version.
      const image = Uint32Array.from(model.current);
      const exact = kernel.pending.count() === 0;
      model.flushing = image;
      const epoch = await engine.beginEpoch();
      const source = engine.source as FileSource;
      const g = engine.geometry;
      const split = epoch.extents.length === 0 ? 0 : op.split % (epoch.extents.length + 1);
      const copy = async (i: number) => {
        const e = epoch.extents[i]!;
        await source.writeAt(await engine.readEpoch(epoch, e.start, e.count), g.blockOffset(e.start));
      };
      const [s, n] = clip(model, op.sector, op.count);
      let committed = false;
      try {
        for (let i = 0; i < split; i++) await copy(i);
        // Both settle before anything else runs: a crash must not leave one of them in flight.
        // The flusher commits without waiting for the write, as the daemon's does: with a budget
        // the write's fill may wait for room that only the commit (clean blocks) makes.
        // A copy that fails (a crash) ends the epoch at once, as the daemon's flusher does: the
        // write may be waiting for room that only the end of the epoch gives back (awaiting both
        // first hung for ever; the budget property's idle run at full scale, session 9).
        const both = await Promise.allSettled([
          kernelWrite(model, real, s, n, false),
          (async () => {
            try {
              for (let i = split; i < epoch.extents.length; i++) await copy(i);
              await engine.commitEpoch(epoch);
              committed = true;
            } catch (err) {
              if (!committed && !process.env.ULOB_MODEL_LATE_ABORT) engine.abortEpoch(epoch);
              throw err;
            }
          })(),
        ]);
        for (const r of both) if (r.status === 'rejected') throw r.reason;
      } catch (err) {
        if (!committed) engine.abortEpoch(epoch);
        throw err;
      }
      model.flushing = null;
      mergeImage(model, real, image, exact);
      expectDiskIsImage(model, real.world.file(real.backingPath).visible, 'after a flush with a racing write');
      return;
    }
  }
}

/**
 * The disk after a completed flush: blocks the flush copied hold the image at its start, the
 * others the previous image (never a later write: expectDiskIsImage catches that). With nothing
 * pending in the kernel at the start, the store had every dirty block, so the disk must be the
 * image exactly.
 */
function mergeImage(model: Model, real: Real, image: Uint32Array, exact: boolean): void {
  const disk = real.world.file(real.backingPath).visible;
  for (let s = 0; s < model.sectors; s++) {
    const got = decodeSector(disk.subarray(s * SECTOR, (s + 1) * SECTOR), s);
    if (exact || got === image[s]) model.image[s] = image[s]!;
  }
}

/** Invariant 1: no block the store or the kernel holds present lies over a hole of the cache file. */
function expectNoPresentOverHole(real: Real): void {
  const file = real.world.file(real.paths.cache);
  for (const [who, bits] of [['store', real.engine.store.present], ['kernel', real.kernel.present]] as const) {
    for (const run of bits.runs()) {
      for (let b = run.start; b < run.start + run.count; b++) {
        const off = b * real.blockSize;
        if (file.hasHole(off, Math.min(real.blockSize, real.size - off))) expect.fail(`block ${b} is present in the ${who} over a hole of the cache file`);
      }
    }
  }
}

/**
 * Between steps every block the store holds dirty is dirty in the kernel too: a block dirty only
 * in the store is taken by no flush epoch (an epoch takes blocks dirty on both sides) and, with a
 * budget, never evicted.
 */
function expectStoreDirtyInKernel(real: Real): void {
  const kdirty = real.kernel.dirty;
  for (const r of real.engine.store.dirty.runs()) {
    for (const g of kdirty.gaps(r.start, r.start + r.count)) expect.fail(`blocks ${g.start}..${g.start + g.count - 1} are dirty in the store and clean in the kernel`);
  }
}

/**
 * With a budget, between steps (nothing in flight): the cache file holds at most the budget plus
 * one eviction unit (kernelCredit: the store counts the kernel's unasked blocks as of its last
 * look, and the kernel's credit lets it add at most one unit unseen). After a daemon kill too:
 * the re-attach's reconcile evicts and punches what the dead daemon filled and never recorded,
 * and punches data neither side holds (src/bdev/uloop.ts kernelEpochs.reconcile).
 */
function expectSpaceBound(real: Real): void {
  if (real.budgetBlocks === undefined) return;
  const allocated = Math.ceil(real.world.file(real.paths.cache).allocatedBytes() / real.blockSize);
  const bound = real.budgetBlocks + real.unitBlocks;
  if (allocated > bound) expect.fail(`the cache file holds ${allocated} blocks, over the budget of ${real.budgetBlocks} plus one unit of ${real.unitBlocks} (kernel: ${real.kernel.unasked()} unasked, credit ${real.kernel.credit})`);
}

type Crash = CrashKind | 'daemon';

async function crashAndRecover(model: Model, real: Real, kind: Crash, op: UloopOp): Promise<void> {
  await real.engine.store.abandon();
  await real.engine.source.close();
  if (kind === 'daemon') {
    // A budget flush died with the daemon: the disk holds, per sector, one of the contents since.
    if (model.pressure) {
      model.pressure = false;
      expectPressureImage(model, real.world.file(real.backingPath).visible, 'a budget flush cut by a daemon kill');
    }
    // The flush died with the daemon; the disk may be torn between the two images.
    if (model.flushing) {
      const disk = real.world.file(real.backingPath).visible;
      for (let s = 0; s < model.sectors; s++) if (decodeSector(disk.subarray(s * SECTOR, (s + 1) * SECTOR), s) === model.flushing[s]) model.image[s] = model.flushing[s]!;
      model.flushing = null;
    }
    // kill -9: the kernel keeps its bits and the page cache keeps every write.
    real.world.crash('process', real.rng);
    // The kernel kept the device: the daemon's attach opens the store as uloop.ts's caller does.
    real.engine = await openEngine(real, true);
    real.kernel.handler = null;
    const epochs = attachDaemon(real.engine, real.kernel);
    // As src/bdev/uloop.ts after ATTACH, before it reads an upcall: blocks dirty in the store and
    // clean in the kernel are cleared in the store (ULOB_MODEL_NO_RECONCILE: the bug it fixes).
    if (!process.env.ULOB_MODEL_NO_RECONCILE) await epochs.reconcile();
    await real.kernel.reissueZero();
    if (real.kernel.pending.count() > 0) await real.kernel.flush();
    const w = written(model, op);
    await expectDevice(model, real, (s) => (w && s >= w[0] && s < w[0] + w[1] ? [model.current[s]!, ...(model.since.get(s) ?? []), model.stable[s]!] : [model.current[s]!]), 'after a daemon kill');
    return;
  }
  real.world.crash(kind, real.rng);
  // The disk: the last flush's image, or (a crash during a flush) per sector that or the running
  // flush's image, until the next flush rewrites the blocks it left dirty.
  const disk = real.world.file(real.backingPath).durable;
  if (model.pressure) {
    model.pressure = false;
    expectPressureImage(model, disk, `a budget flush cut by a ${kind} crash`);
  }
  for (let s = 0; s < model.sectors; s++) {
    const got = decodeSector(disk.subarray(s * SECTOR, (s + 1) * SECTOR), s);
    if (model.flushing && got === model.flushing[s]) model.image[s] = got;
  }
  model.flushing = null;
  expectDiskIsImage(model, disk, `after a ${kind} crash (the disk)`);
  real.engine = await openEngine(real);
  real.kernel = await addDevice(real);
  await expectDevice(model, real, (s) => [model.stable[s]!, ...(model.since.get(s) ?? [])], `after a ${kind} crash`);
  model.stable.set(model.current);
  model.since.clear();
}

export type UloopStep = { op: UloopOp } | { crash: Crash; after: number; op: UloopOp };
export interface UloopModelCase {
  steps: UloopStep[];
  seed: number;
}

class StepCommand implements fc.AsyncCommand<Model, Real> {
  constructor(readonly step: UloopStep) {}
  check(): boolean {
    return true;
  }
  async run(model: Model, real: Real): Promise<void> {
    const step = this.step;
    if (!('crash' in step)) {
      try {
        await runOp(step.op, model, real);
      } finally {
        real.kernel.heldZero = null; // no daemon died: a failed ZERO was answered (an error), not held
      }
      // What the daemon's poll does (every 200 ms): the credit back to its share, the count exact.
      real.kernel.creditPolicy?.update();
      expectNoPresentOverHole(real);
      expectStoreDirtyInKernel(real);
      expectSpaceBound(real);
      return;
    }
    real.world.armCrash(step.after);
    try {
      await runOp(step.op, model, real);
    } catch (err) {
      if (!(err instanceof SimulatedCrash) && !real.world.crashed && !(err instanceof KernelError)) throw err;
    }
    await crashAndRecover(model, real, step.crash, step.op);
    real.kernel.creditPolicy?.update();
    expectNoPresentOverHole(real);
    expectStoreDirtyInKernel(real);
    expectSpaceBound(real);
  }
  toString(): string {
    return JSON.stringify(this.step);
  }
}

export type UloopModelConfig = ModelConfig & { zero?: boolean };

function stepArb(config: UloopModelConfig): fc.Arbitrary<UloopStep> {
  const sectors = (config.blocks * config.blockSize - config.tail) / SECTOR;
  const sector = fc.nat({ max: sectors - 1 });
  const count = fc.integer({ min: 1, max: (config.blockSize / SECTOR) * 3 });
  const op: fc.Arbitrary<UloopOp> = fc.oneof(
    { weight: 3, arbitrary: fc.record({ kind: fc.constant('read' as const), sector, count }) },
    { weight: 5, arbitrary: fc.record({ kind: fc.constant('write' as const), sector, count, fua: fc.boolean() }) },
    { weight: 2, arbitrary: fc.constant({ kind: 'flush' as const }) },
    { weight: 2, arbitrary: fc.constant({ kind: 'writeback' as const }) },
    { weight: 2, arbitrary: fc.record({ kind: fc.constant('writeback-racing' as const), sector, count, split: fc.nat({ max: 8 }) }) },
    { weight: config.zero ? 3 : 0, arbitrary: fc.record({ kind: fc.constant('zero' as const), sector, count }) },
    { weight: config.budgetBlocks !== undefined ? 2 : 0, arbitrary: fc.record({ kind: fc.constant('evict' as const), blocks: fc.integer({ min: 1, max: 4 }) }) },
  );
  return fc.oneof(
    { weight: 3, arbitrary: op.map((o): UloopStep => ({ op: o })) },
    { weight: 2, arbitrary: fc.tuple(op, fc.nat({ max: 12 }), fc.constantFrom<Crash>('power', 'daemon')).map(([o, after, crash]): UloopStep => ({ crash, after, op: o })) },
  );
}

/** Replays one run on a fresh model disk and cache; throws at the first broken guarantee. */
export async function runUloopModel(config: UloopModelConfig, { steps, seed }: UloopModelCase): Promise<void> {
  const size = config.blocks * config.blockSize - config.tail;
  const sectors = size / SECTOR;
  const dir = mkdtempSync(join('/dev/shm', 'ulob-umodel-'));
  const world = new CrashWorld();
  const backingPath = join(dir, 'disk');
  await world.storage().open(backingPath, { create: true });
  const backing = world.file(backingPath);
  for (let s = 0; s < sectors; s++) backing.write(sectorBytes(BASE_TAG, s), s * SECTOR);
  backing.sync();
  const partial = {
    world,
    rng: new Rng(seed),
    paths: { cache: join(dir, 'cache'), bitmap: join(dir, 'bitmap'), metadata: join(dir, 'meta.db') },
    backingPath,
    size,
    blockSize: config.blockSize,
    zero: config.zero ?? false,
    budgetBlocks: config.budgetBlocks,
    unitBlocks: config.unitBlocks ?? 1,
  };
  const engine = await openEngine(partial);
  const real: Real = { ...partial, engine, kernel: await addDevice({ ...partial, engine }) };
  const model: Model = {
    sectors,
    current: new Uint32Array(sectors).fill(BASE_TAG),
    stable: new Uint32Array(sectors).fill(BASE_TAG),
    since: new Map(),
    nextTag: BASE_TAG + 1,
    image: new Uint32Array(sectors).fill(BASE_TAG),
    flushing: null,
    pressure: false,
  };
  // The first engine's pressure flush looks the model up on the object it was opened with.
  real.model = model;
  (partial as { model?: Model }).model = model;
  try {
    await fc.asyncModelRun(() => ({ model, real }), steps.map((s) => new StepCommand(s)));
  } finally {
    await real.engine.store.abandon().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Runs the property `runs` times; a failure prints its shrunk case, ready to keep as a named one. */
export async function assertUloopModel(config: UloopModelConfig, runs: number): Promise<void> {
  const property = fc.asyncProperty(fc.array(stepArb(config), { maxLength: 20 }), fc.integer({ min: 1, max: 2 ** 31 - 1 }), (steps, seed) => runUloopModel(config, { steps, seed }));
  const details = await fc.check(property, { numRuns: runs, timeout: 20_000, endOnFailure: !!process.env.ULOB_MODEL_NO_SHRINK });
  if (!details.failed) return;
  const [steps, seed] = details.counterexample ?? [[], 0];
  throw new Error(
    `uloop model failed after ${details.numRuns} runs (fast-check seed ${details.seed}); keep the shrunk counterexample as a named case:\n  'WHAT IT SHOWS': ${JSON.stringify({ seed, steps })},\n${details.errorInstance instanceof Error ? details.errorInstance.message : String(details.errorInstance)}`,
    { cause: details.errorInstance },
  );
}
