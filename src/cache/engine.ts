// The userspace data path every frontend (NBD, loop-over-FUSE) calls: serves reads and writes from
// the cache file, fills misses from the source, and keeps the durability order of docs/design.md.
//
// Block states, per cache block:
//   missing      not in the cache; reads fill it from the source
//   staged       its data is in the cache file but not yet synced; readable, not yet present.
//                'clean' (a fill) or 'dirty' (a write into a block that was missing or staged clean)
//   present      durable in the cache and equal to the backing disk      (store.present)
//   dirty        durable in the cache, newer than the backing disk       (store.dirty)
// A commit (FLUSH, FUA, or the background timer) syncs the cache file, then turns staged blocks
// into present or dirty ones. A write into a present clean block first makes it durably dirty.
import { EngineClosedError, ReadOnlyError } from '../errors.js';
import { assertBytes, assertRange } from '../validate.js';
import type { Bitmap } from './bitmap.js';
import { Coalescer } from './coalesce.js';
import { FlushEpoch, type Epoch } from './epoch.js';
import type { Extent, Geometry } from './layout.js';
import type { CacheStore } from './store.js';
import { isWritable, type Source, type WritableSource } from '../source/source.js';
import { BufferPool } from '../storage/buffer-pool.js';

export interface EngineOptions {
  /** Commit staged blocks this long after the first one appears; 0 commits only on flush. */
  autoCommitMs?: number;
  /** Largest single read from the source when filling a run of missing blocks. */
  maxFillBytes?: number;
  /**
   * Copy-on-write of an open flush epoch (src/cache/epoch.ts): how many bytes of preserved block
   * versions to keep in memory before spilling to `cowSpillPath`. Default 64 MiB.
   */
  cowMemoryBytes?: number;
  /** Side file for preserved versions beyond cowMemoryBytes. Default: CACHE.cow next to the cache. */
  cowSpillPath?: string;
  /**
   * TRIM evicts clean blocks (default). False keeps them: a hydrated cache (--hydrate) stays a
   * full mirror, so no later read wakes the disk.
   */
  evictOnDiscard?: boolean;
}

export interface WriteOptions {
  /** Force unit access: durable in the cache when the write resolves. */
  fua?: boolean;
}

export type { Epoch } from './epoch.js';

export interface EngineStats {
  size: number;
  blockSize: number;
  blocks: number;
  presentBlocks: number;
  dirtyBlocks: number;
  stagedBlocks: number;
  mode: CacheStore['mode'];
  flushEpoch: number;
}

/**
 * A data path beside the engine that writes the cache file itself and keeps its own dirty bits
 * (the uloop module, src/bdev/uloop.ts). Flush epochs are begun and committed there too; both
 * calls run in the same tick as the engine's own snapshot or clearFlushed, so no intent or barrier
 * is recorded between the two.
 */
export interface ExternalEpochs {
  /** Snapshot: narrows `flushing` (the store's dirty set) in place to the blocks dirty there too. */
  begin(flushing: Bitmap): void;
  /** After the source sync, before clearFlushed: narrows `cleaned` in place to what it cleaned. */
  commit(cleaned: Bitmap): void;
}

type Staged = 'clean' | 'dirty';

const DEFAULT_MAX_FILL = 1 << 20;
/** Fill buffers kept for reuse: enough for the hydrator's and a few readers' fills in flight. */
const FILL_BUFFERS_KEPT = 8;

export class CacheEngine {
  readonly store: CacheStore;
  readonly source: Source;
  readonly geometry: Geometry;

  readonly #staged = new Map<number, Staged>();
  /** Blocks being filled, first-written or evicted; others wait for the promise. */
  readonly #busy = new Map<number, Promise<void>>();
  /** In-flight writes by block range, so an epoch can mark them rewritten. */
  readonly #writes = new Set<[number, number]>();
  readonly #commit: Coalescer;
  /** Clean blocks whose dirty intent is being made durable, and the promise that says it is. */
  readonly #intents = new Map<number, Promise<void>>();
  /** Blocks for the next intent transaction, gathered during this turn of the event loop. */
  #intentBatch: { blocks: number[]; durable: Promise<void> } | null = null;
  readonly #autoCommitMs: number;
  readonly #maxFillBlocks: number;
  readonly #fillBuffers: BufferPool;
  #commitTimer: NodeJS.Timeout | null = null;
  #epoch: FlushEpoch | null = null;
  readonly #cowMemoryBytes: number;
  readonly #cowSpillPath: string;
  readonly #evictOnDiscard: boolean;
  #closed = false;
  /** Time of the last user read or write (not prefetch): background work yields to it. */
  lastRequestAt = 0;
  /** Set while a kernel frontend writes the cache file beside the engine. */
  externalEpochs: ExternalEpochs | null = null;

  constructor(store: CacheStore, source: Source, options: EngineOptions = {}) {
    this.store = store;
    this.source = source;
    this.geometry = store.geometry;
    this.#autoCommitMs = options.autoCommitMs ?? 1000;
    this.#maxFillBlocks = Math.max(1, Math.floor((options.maxFillBytes ?? DEFAULT_MAX_FILL) / this.geometry.blockSize));
    this.#fillBuffers = new BufferPool(this.#maxFillBlocks * this.geometry.blockSize, FILL_BUFFERS_KEPT);
    this.#commit = new Coalescer(() => this.#commitStaged());
    this.#cowMemoryBytes = options.cowMemoryBytes ?? 64 << 20;
    this.#cowSpillPath = options.cowSpillPath ?? `${store.paths.cache}.cow`;
    this.#evictOnDiscard = options.evictOnDiscard ?? true;
  }

  get size(): number {
    return this.geometry.size;
  }

  get readOnly(): boolean {
    return this.store.mode !== 'writeback';
  }

  stats(): EngineStats {
    return {
      size: this.geometry.size,
      blockSize: this.geometry.blockSize,
      blocks: this.geometry.blockCount,
      presentBlocks: this.store.present.count(),
      dirtyBlocks: this.store.dirty.count(),
      stagedBlocks: this.#staged.size,
      mode: this.store.mode,
      flushEpoch: this.store.info.flushEpoch,
    };
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.#assertOpen();
    assertRange(offset, length, this.size);
    const buf = Buffer.allocUnsafe(length);
    await this.readInto(buf, offset);
    return buf;
  }

  /**
   * read() into the caller's buffer: buf.byteLength bytes at `offset` (bytes). The NBD server
   * reads straight into its reply, so a hit allocates nothing here. Throws as read() does.
   */
  async readInto(buf: Uint8Array, offset: number): Promise<void> {
    this.#assertOpen();
    assertBytes(buf, 'buf');
    assertRange(offset, buf.byteLength, this.size);
    this.lastRequestAt = Date.now();
    if (buf.byteLength === 0) return;
    const [first, end] = this.geometry.blocksOf(offset, buf.byteLength);
    // A hit, every block present, has nothing to fill or wait for.
    if (!this.store.present.allSet(first, end)) await this.#makeReadable(first, end);
    await this.store.readData(buf, offset);
  }

  async write(offset: number, data: Uint8Array, options: WriteOptions = {}): Promise<void> {
    this.#assertOpen();
    assertBytes(data, 'data');
    assertRange(offset, data.byteLength, this.size);
    if (this.readOnly) throw new ReadOnlyError(`the cache of ${this.source.description} is read-only; attach with --writeback to write`);
    if (data.byteLength === 0) return;
    this.lastRequestAt = Date.now();
    const range = this.geometry.blocksOf(offset, data.byteLength);
    this.#writes.add(range);
    this.#epoch?.markRewritten(range[0], range[1]);
    try {
      const release = await this.#prepareWrite(offset, data.byteLength, range[0], range[1]);
      try {
        // Point-in-time epochs: the open epoch's version of these blocks is saved aside before it
        // changes. No await between the last check and the write below.
        await this.#preserveForEpoch(range[0], range[1]);
        await this.store.writeData(data, offset);
      } finally {
        release();
      }
    } finally {
      this.#writes.delete(range);
    }
    if (options.fua) await this.flush();
  }

  /** FLUSH: every write completed before the call is durable when it resolves. */
  async flush(): Promise<void> {
    this.#assertOpen();
    await this.#commit.run();
  }

  /**
   * Brings [offset, offset + length) into the cache without returning it (hydration, read-ahead).
   * Does not count as a user request.
   */
  async prefetch(offset: number, length: number): Promise<void> {
    this.#assertOpen();
    assertRange(offset, length, this.size);
    if (length === 0) return;
    const [first, end] = this.geometry.blocksOf(offset, length);
    await this.#makeReadable(first, end);
  }

  /**
   * Drops clean blocks wholly inside the range from the cache (TRIM as eviction). Dirty blocks
   * stay: they are the only copy. Contents read afterwards are unchanged.
   */
  async discard(offset: number, length: number): Promise<void> {
    this.#assertOpen();
    assertRange(offset, length, this.size);
    if (!this.#evictOnDiscard) return;
    const g = this.geometry;
    const first = Math.ceil(offset / g.blockSize);
    const end = offset + length === g.size ? g.blockCount : Math.floor((offset + length) / g.blockSize);
    const victims: number[] = [];
    for (const run of this.store.present.runs(first, end)) {
      for (let b = run.start; b < run.start + run.count; b++) {
        if (!this.store.dirty.get(b) && !this.#staged.has(b) && !this.#busy.has(b) && !this.#intents.has(b)) victims.push(b);
      }
    }
    if (victims.length === 0) return;
    const release = this.#lock(victims);
    try {
      await this.store.evict(toExtents(victims));
    } finally {
      release();
    }
  }

  /**
   * Starts a flush epoch: commits staged writes, then snapshots the dirty set. Blocks written from
   * now until commitEpoch() (or being written now) stay dirty after it.
   */
  async beginEpoch(): Promise<Epoch> {
    this.#assertOpen();
    if (this.#epoch) throw new EngineClosedError('a flush epoch is already open');
    await this.#commit.run();
    const flushing = this.store.dirty.clone();
    if (this.externalEpochs) {
      this.externalEpochs.begin(flushing);
      // Writes the engine never saw may not be synced: the copy the flusher reads must be durable
      // in the cache before its dirty bit can go (invariant 2). Later writes count as rewritten.
      await this.store.syncData();
    }
    const epoch = new FlushEpoch(this.store.info.flushEpoch + 1, flushing, {
      geometry: this.geometry,
      readCache: (buf, position) => this.store.readData(buf, position),
      memoryBytes: this.#cowMemoryBytes,
      spillPath: this.#cowSpillPath,
    });
    this.#epoch = epoch;
    for (const [first, end] of this.#writes) epoch.markRewritten(first, end);
    return epoch;
  }

  /** Reads cache content for the flusher; never touches the source. */
  async readCache(buf: Uint8Array, position: number): Promise<number> {
    this.#assertOpen();
    return this.store.readData(buf, position);
  }

  /**
   * The epoch's version of blocks [start, start + count) (which must lie in one of its extents),
   * for the flusher to write to the disk: the cache content as of beginEpoch(), even for blocks
   * rewritten since (their saved copies). Each block should be read once; afterwards writes to it
   * no longer need a copy. With `into`, the blocks are read into it (a view of it is returned).
   */
  async readEpoch(epoch: Epoch, start: number, count: number, into?: Buffer): Promise<Buffer> {
    this.#assertOpen();
    const open = this.#epoch;
    if (!open || open !== epoch) throw new EngineClosedError(`flush epoch ${epoch.id} is not the open epoch`);
    return open.read(start, count, into);
  }

  /**
   * readEpoch() of many pieces into one buffer (FlushEpoch.readInto): each piece is [first block,
   * blocks, byte offset in buf]. Resolves once every read has settled.
   */
  async readEpochInto(epoch: Epoch, buf: Buffer, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<void> {
    this.#assertOpen();
    const open = this.#epoch;
    if (!open || open !== epoch) throw new EngineClosedError(`flush epoch ${epoch.id} is not the open epoch`);
    return open.readInto(buf, pieces);
  }

  /**
   * Ends a flush epoch whose blocks the flusher has written to the source: syncs the source, then
   * clears the dirty bits of the blocks not rewritten meanwhile (invariant 4).
   */
  async commitEpoch(epoch: Epoch): Promise<{ cleaned: number; kept: number }> {
    const open = this.#takeEpoch(epoch);
    // Blocks written since beginEpoch() waited for their copy (readEpoch or preserve) while the
    // epoch was open; with it closed they need none.
    await open.release();
    if (open.failed) throw open.failed;
    const source = this.#writableSource();
    await source.sync();
    // Decided after the sync, so a write that raced with it keeps its block dirty.
    const cleaned = open.flushing;
    for (const b of open.rewritten) cleaned.clear(b);
    // The outside dirty bits go first: a write to a block cleared there asks for a fresh intent,
    // which is recorded only after clearFlushed below (same tick).
    this.externalEpochs?.commit(cleaned);
    const extents = [...cleaned.runs()];
    this.store.clearFlushed(extents);
    const count = cleaned.count();
    return { cleaned: count, kept: open.blocks - count };
  }

  /** Ends an epoch without clearing anything (the flush failed); its blocks stay dirty. */
  abortEpoch(epoch: Epoch): void {
    if (this.#epoch !== epoch) return;
    const open = this.#epoch;
    this.#epoch = null;
    void open.release();
  }

  /** Bytes of epoch versions saved aside (memory and spill file) for the open epoch. */
  get preservedBytes(): number {
    return this.#epoch?.preservedBytes ?? 0;
  }

  /** Commits everything and closes the store cleanly. The source stays open (the caller owns it). */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#cancelAutoCommit();
    try {
      if (!this.store.failed) await this.#commit.run();
    } finally {
      await this.store.close();
    }
  }

  // --- read path -----------------------------------------------------------------------------

  /** Fills every missing block of [first, end); returns when all are present or staged. */
  async #makeReadable(first: number, end: number): Promise<void> {
    for (;;) {
      const waits: Promise<void>[] = [];
      let run: number[] = [];
      const flushRun = () => {
        if (run.length > 0) waits.push(this.#fill(run));
        run = [];
      };
      for (const gap of this.store.present.gaps(first, end)) {
        for (let b = gap.start; b < gap.start + gap.count; b++) {
          const busy = this.#busy.get(b);
          if (busy) {
            flushRun();
            waits.push(busy);
          } else if (this.#staged.has(b)) {
            flushRun();
          } else {
            run.push(b);
            if (run.length === this.#maxFillBlocks) flushRun();
          }
        }
        flushRun();
      }
      if (waits.length === 0) return;
      await Promise.all(waits);
    }
  }

  /** Copies contiguous missing blocks from the source into the cache and stages them clean. */
  async #fill(blocks: number[]): Promise<void> {
    const release = this.#lock(blocks);
    try {
      const start = blocks[0]!;
      const offset = this.geometry.blockOffset(start);
      // A reused, aligned buffer: no page faults for fresh memory, no bounce copy for O_DIRECT.
      const whole = this.#fillBuffers.take();
      try {
        const buf = whole.subarray(0, this.geometry.extentBytes(start, blocks.length));
        await this.source.readAt(buf, offset);
        await this.store.writeData(buf, offset);
      } finally {
        this.#fillBuffers.give(whole);
      }
      for (const b of blocks) this.#staged.set(b, 'clean');
      this.#scheduleCommit();
    } finally {
      release();
    }
  }

  // --- write path ----------------------------------------------------------------------------

  /**
   * Brings every block of the write into a state where its data may change: dirty, staged, or
   * missing but wholly overwritten (locked until the data is written). Returns the unlock.
   */
  async #prepareWrite(offset: number, length: number, first: number, end: number): Promise<() => void> {
    const g = this.geometry;
    for (;;) {
      const waits: Promise<void>[] = [];
      const partial: number[] = [];
      const whole: number[] = [];
      const intents: number[] = [];
      for (let b = first; b < end; b++) {
        if (this.store.dirty.get(b)) continue;
        const staged = this.#staged.get(b);
        if (staged) continue;
        const busy = this.#busy.get(b);
        if (busy) {
          waits.push(busy);
        } else if (this.store.present.get(b)) {
          intents.push(b);
        } else if (offset <= g.blockOffset(b) && offset + length >= g.blockOffset(b) + g.blockLength(b)) {
          whole.push(b);
        } else {
          partial.push(b);
        }
      }
      if (waits.length > 0) {
        await Promise.all(waits);
        continue;
      }
      if (partial.length > 0) {
        // A partly written block needs its old bytes first, or the rest of it would be garbage.
        for (const b of partial) await this.#makeReadable(b, b + 1);
        continue;
      }
      // Invariant 2: a clean block's cache copy may change only once it is durably dirty. Other
      // states may change while the transaction is pending, so look again afterwards.
      if (intents.length > 0) {
        await this.#markDirtyBatched(intents);
        continue;
      }
      // Staged clean blocks become staged dirty: the next commit records them dirty.
      for (let b = first; b < end; b++) if (this.#staged.get(b) === 'clean') this.#staged.set(b, 'dirty');
      if (whole.length === 0) return () => undefined;
      const release = this.#lock(whole);
      return () => {
        for (const b of whole) this.#staged.set(b, 'dirty');
        this.#scheduleCommit();
        release();
      };
    }
  }

  /**
   * Group commit of dirty intents (rule 3). Writes prepared in the same turn of the event loop (an
   * NBD client's queued requests arrive in one socket read) share one metadata transaction, and
   * transactions written while a WAL fsync runs share the next one (store.markDirtyDurable): the
   * event loop never waits for the disk, and a busy queue costs one fsync per round, not per
   * write. A block already on its way waits for the intent that carries it.
   */
  #markDirtyBatched(blocks: readonly number[]): Promise<void> {
    const waits = new Set<Promise<void>>();
    for (const b of blocks) {
      let durable = this.#intents.get(b);
      if (!durable) {
        const batch = (this.#intentBatch ??= this.#newIntentBatch());
        batch.blocks.push(b);
        this.#intents.set(b, (durable = batch.durable));
      }
      waits.add(durable);
    }
    return waits.size === 1 ? waits.values().next().value! : Promise.all(waits).then(() => undefined);
  }

  /** The batch this turn's intents join: its transaction runs in a microtask, after this turn's code. */
  #newIntentBatch(): { blocks: number[]; durable: Promise<void> } {
    const blocks: number[] = [];
    const durable: Promise<void> = Promise.resolve().then(async () => {
      this.#intentBatch = null;
      const sorted = Float64Array.from(blocks).sort();
      try {
        await this.store.markDirtyDurable(toExtents(sorted.filter((b) => !this.store.dirty.get(b))));
      } finally {
        for (const b of blocks) if (this.#intents.get(b) === durable) this.#intents.delete(b);
      }
    });
    return { blocks, durable };
  }

  /**
   * Copy-on-write for point-in-time epochs (src/cache/epoch.ts): returns once no block of
   * [first, end) needs its epoch version saved; the caller writes without awaiting anything else
   * first. Looks at the open epoch again after each wait: it may have ended meanwhile.
   */
  async #preserveForEpoch(first: number, end: number): Promise<void> {
    for (;;) {
      const waits = this.#epoch?.copyBeforeWrite(first, end) ?? [];
      if (waits.length === 0) return;
      await Promise.all(waits);
    }
  }

  // --- commit --------------------------------------------------------------------------------

  /** Syncs the cache file, then records staged blocks as present (fills) or dirty (writes). */
  async #commitStaged(): Promise<void> {
    this.#cancelAutoCommit();
    // A typed array sorts numerically without a comparator call per step: a hydration stages
    // every block of the disk between two commits.
    const blocks = Float64Array.from(this.#staged.keys()).sort();
    await this.store.syncData();
    // Decided after the sync: a fill rewritten meanwhile must be recorded dirty, not clean.
    const clean: number[] = [];
    const dirty: number[] = [];
    for (const b of blocks) (this.#staged.get(b) === 'dirty' ? dirty : clean).push(b);
    this.store.markPresent(toExtents(clean));
    for (const b of clean) this.#staged.delete(b);
    // The dirty ones stay staged (readable, writable without an intent) until their record is
    // durable; its fsync runs off the event loop (store.markDirtyDurable).
    await this.store.markDirtyDurable(toExtents(dirty));
    for (const b of dirty) this.#staged.delete(b);
    if (blocks.length > 0) await this.store.persistBitmap(false);
  }

  #scheduleCommit(): void {
    if (this.#autoCommitMs <= 0 || this.#commitTimer || this.#closed) return;
    this.#commitTimer = setTimeout(() => {
      this.#commitTimer = null;
      this.#commit.run().catch(() => {
        // The store is now failed; the next request reports it.
      });
    }, this.#autoCommitMs);
    this.#commitTimer.unref();
  }

  #cancelAutoCommit(): void {
    if (this.#commitTimer) clearTimeout(this.#commitTimer);
    this.#commitTimer = null;
  }

  // --- helpers -------------------------------------------------------------------------------

  #lock(blocks: readonly number[]): () => void {
    let release!: () => void;
    const done = new Promise<void>((resolve) => (release = resolve));
    for (const b of blocks) this.#busy.set(b, done);
    return () => {
      for (const b of blocks) if (this.#busy.get(b) === done) this.#busy.delete(b);
      release();
    };
  }

  #takeEpoch(epoch: Epoch): FlushEpoch {
    this.#assertOpen();
    const open = this.#epoch;
    if (!open || open !== epoch) throw new EngineClosedError(`flush epoch ${epoch.id} is not the open epoch`);
    this.#epoch = null;
    return open;
  }

  #writableSource(): WritableSource {
    if (!isWritable(this.source)) throw new ReadOnlyError(`${this.source.description} cannot be written back to`);
    return this.source;
  }

  #assertOpen(): void {
    if (this.#closed) throw new EngineClosedError('the cache engine is closed');
    if (this.store.failed) throw new EngineClosedError(`the cache failed earlier: ${this.store.failed.message}`);
  }
}

/** Sorted block numbers to extents. */
export function toExtents(blocks: ArrayLike<number> & Iterable<number>): Extent[] {
  const out: Extent[] = [];
  for (const b of blocks) {
    const last = out[out.length - 1];
    if (last && last.start + last.count === b) last.count++;
    else out.push({ start: b, count: 1 });
  }
  return out;
}
