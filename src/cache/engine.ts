// The userspace data path every frontend (NBD, loop-over-FUSE) calls: serves reads and writes from
// the cache file, fills misses from the source, and keeps the durability order of docs/design.md.
//
// Block states, per cache block:
//   missing      not in the cache; reads fill it from the source
//   staged       its data is in the cache file but not yet synced; readable, not yet present.
//                'clean' (a fill) or 'dirty' (a write into a block that was missing, zeroed or
//                staged clean)
//   present      durable in the cache and equal to the backing disk      (store.present)
//   dirty        durable in the cache, newer than the backing disk       (store.dirty)
//   zeroed       dirty and not present: reads as zeros, the cache file need not hold it
// A commit (FLUSH, FUA, or the background timer) syncs the cache file, then turns staged blocks
// into present or dirty ones. A write into a present clean block first makes it durably dirty.
//
// With a budget (store.budget) every block that takes cache space is reserved first; when the
// budget is full the engine evicts clean units the clock (cache/clock.ts) picks, and when nothing
// clean is left it asks for a flush (onSpacePressure) and waits: writes wait, they do not fail.
import { CacheFullError, EngineClosedError, MetadataFullError, ReadOnlyError } from '../errors.js';
import type { FlashReserveStatus } from './reserve.js';
import { formatBytes } from '../units.js';
import { assertBytes, assertRange } from '../validate.js';
import { Bitmap } from './bitmap.js';
import { Coalescer } from './coalesce.js';
import { FlushEpoch, type Epoch } from './epoch.js';
import { NeighbourFeedback } from './fill-feedback.js';
import { BlockRuns } from './runs.js';
import type { Extent, Geometry } from './layout.js';
import { subtractExtents, type CacheStore, type IntentStats } from './store.js';
import { isWritable, type Source, type WritableSource } from '../source/source.js';
import { BufferPool, SizedBufferPool } from '../storage/buffer-pool.js';
import { pausePoint } from '../sys.js';

export interface EngineOptions {
  /** Commit staged blocks this long after the first one appears; 0 commits only on flush. */
  autoCommitMs?: number;
  /** Largest single read from the source when filling a run of missing blocks. */
  maxFillBytes?: number;
  /**
   * Fills of this many blocks or more are locked and staged as one range (a hydration's chunks),
   * shorter ones block by block. Default 64. The engine models set 2, so both ways are tested.
   */
  rangeFillBlocks?: number;
  /**
   * With a budget: bytes a miss fills around what was asked (aligned) while the disk is busy with
   * misses; a miss after 5 s without one fills its whole eviction unit. Default 64 KiB, at most
   * the unit.
   */
  fillGranuleBytes?: number;
  /**
   * How long (ms) a request waits for a `room` flush (a full flash filesystem, only dirty blocks
   * cached) before it fails with ULOB_E_CACHE_FULL; the flush goes on. Default 60000.
   */
  roomFlushWaitMs?: number;
  /** With a budget: ms without a miss after which the disk counts as idle (whole-unit fill). Default 5000. */
  diskIdleMs?: number;
  /**
   * Copy-on-write of an open flush epoch (src/cache/epoch.ts): how many bytes of preserved block
   * versions to keep in memory before spilling to `cowSpillPath`. Default 64 MiB.
   */
  cowMemoryBytes?: number;
  /** Side file for preserved versions beyond cowMemoryBytes. Default: CACHE.cow next to the cache. */
  cowSpillPath?: string;
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
  /** Blocks the cache file holds durably (clean or dirty): the store's present bits. */
  presentBlocks: number;
  /**
   * Blocks whose data the cache file holds: presentBlocks plus staged blocks (fills and writes
   * waiting for their commit, which reads and writes already use).
   */
  cachedBlocks: number;
  /** Dirty blocks: the store's (zeroed ones included) and staged writes it has not recorded yet. */
  dirtyBlocks: number;
  /** Dirty blocks that read as zeros and take no cache space (not those a staged write replaced). */
  zeroBlocks: number;
  /** Blocks waiting for the next commit (fills and writes). */
  stagedBlocks: number;
  mode: CacheStore['mode'];
  flushEpoch: number;
  /** Bytes of the cache file the cache may use, or null (a full mirror). */
  budgetBytes: number | null;
  /** Bytes the cache file holds or is about to: present, reserved, being punched. */
  usedBytes: number;
  evictionUnitBytes: number;
  /** Since the engine started: blocks evicted, reads served without the source, reads that filled. */
  evictedBlocks: number;
  readHits: number;
  readMisses: number;
  /** Why the last write found no room, while that lasts; null once one finds room again. */
  spaceError: string | null;
  /** Dirty-intent rounds since the store opened (first writes into clean blocks). */
  intents: IntentStats;
  /** The flash reserve (src/cache/reserve.ts), or null: none. */
  flashReserve: FlashReserveStatus | null;
  /** Flushes a full flash filesystem with only dirty blocks cached asked for (reason `room`) since the engine started. */
  roomFlushes: number;
  /** Requests waiting for room now: in the budget, or for a `room` flush. */
  roomWaiters: number;
  /** Requests failed for want of room (ULOB_E_CACHE_FULL, ULOB_E_METADATA_FULL) since the engine started. */
  failedRequests: number;
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
  /** The flush failed: end the outside epoch without clearing anything. */
  abort?(): void;
  /** Blocks dirty there now, the store's dirty ones included (exact: the kernel's count). */
  dirtyBlocks?(): number | null;
  /** Of those, the ones that hold data (dirty and not zeroed; exact), for the budget flush. */
  dirtyDataBlocks?(): number | null;
  /**
   * With a budget: the outside path stops serving `victims` (clean blocks the clock picked) and
   * returns those it stopped serving, with no request in flight on them (ULOOP_IOC_EVICT); only
   * those are evicted from the store. Runs before the store clears anything (invariant 1).
   * `pinned`: also blocks the outside path keeps for requests it is still preparing (a last
   * resort, once nothing else freed room: concurrent requests can hold every clean block).
   */
  evict?(victims: readonly Extent[], pinned?: boolean): Extent[];
  /**
   * With a budget: what evict() returned is now cleared durably and punched in the store (or the
   * store's eviction failed; called after every eviction, `gone` empty when nothing went): the
   * outside path may serve requests on those blocks again (as misses). On uloop,
   * ULOOP_EVICT_F_HOLD kept them busy until now and on ublk the server parks requests on them, so
   * that no write lands in them before the punch (invariant 1). Optional: a path whose own writes
   * cannot land there in between needs none.
   */
  evicted?(gone: readonly Extent[]): void;
  /** With a budget: merges the outside path's accessed bits into store.clock before the hand moves. */
  harvestAccessed?(): void;
  /**
   * Before a flush epoch begins: hands the blocks the outside path holds dirty and the store does
   * not know of yet over to the store (on uloop, the BARRIER ioctl: never waits on a write), so the
   * flush writes them back too, and a budget flush can make them evictable.
   */
  beforeEpoch?(): Promise<void>;
}

/** Staged entries: bit 0 says dirty (1) or clean (0). */
const STAGED_CLEAN = 0;
const STAGED_DIRTY = 1;

const DEFAULT_MAX_FILL = 1 << 20;
/**
 * Largest prefetch fill (a hydration chunk) copied as one stream through one fill buffer where the
 * source can (Source.streamInto). Its blocks stay locked until the whole run is copied: a user
 * request on one of them waits that long (32 MiB: ~0.2 s at a spinning disk's 150 MB/s).
 */
const MAX_STREAM_FILL = 32 << 20;
/** Fills of this many blocks or more are locked and staged by range, not block by block (EngineOptions.rangeFillBlocks). */
const RANGE_FILL_BLOCKS = 64;
/** Blocks one zeroing step locks and records at a time (a TRIM of the whole disk goes in steps). */
const ZERO_STEP_BLOCKS = 1 << 16;
/** EngineOptions.roomFlushWaitMs by default: a wait that stays finite (nbd-client as attached sets no I/O timeout; uloop's io_timeout_s may). */
const ROOM_FLUSH_WAIT_MS = 60_000;
/** `room` flushes one request may wait for before it fails (each frees clean blocks, or fails). */
const MAX_ROOM_FLUSHES = 3;
/** Flushes in a row that free nothing before a write waiting for room gives up. */
const MAX_FUTILE_FLUSHES = 3;
/** Fill buffers kept for reuse: enough for the hydrator's and a few readers' fills in flight. */
const FILL_BUFFERS_KEPT = 8;
/** With a budget: a miss this long (ms) after the last one finds the disk idle and fills a whole unit. */
const DISK_IDLE_MS = 5000;
/** With a budget, while the disk is busy with misses: the aligned piece a miss fills (dm-cache's default block). */
const DEFAULT_FILL_GRANULE = 64 * 1024;

export class CacheEngine {
  readonly store: CacheStore;
  readonly source: Source;
  readonly geometry: Geometry;

  /** Staged blocks one by one: writes (dirty), and fills shorter than rangeFillBlocks (clean). */
  readonly #staged = new Map<number, number>();
  /**
   * Staged clean blocks of long fills (EngineOptions.rangeFillBlocks or more: a hydration's
   * chunks), as runs rather than a Map entry per block; disjoint from #staged's keys. A write into
   * one of them moves the block to #staged as dirty (#stageDirty).
   */
  readonly #stagedRuns = new BlockRuns();
  /** The runs a commit took before its sync: still staged, present once that sync has returned. */
  readonly #committingRuns = new BlockRuns();
  /** Blocks being filled, first-written, zeroed, materialised or evicted; others wait for the promise. */
  readonly #busy = new Map<number, Promise<void>>();
  /** Long fills' locks (rangeFillBlocks or more blocks), by range: #busyAt consults both. */
  readonly #rangeLocks: { start: number; end: number; done: Promise<void> }[] = [];
  /** In-flight writes and zeroings by block range, so an epoch can mark them rewritten. */
  readonly #writes = new Set<[number, number]>();
  /**
   * Blocks a read or write that had to wait needs to stay in the cache until it is done (count of
   * such requests per block): never evicted meanwhile, or two of its units could push each other
   * out for ever. Requests that find their blocks ready at once (hits) pin nothing.
   */
  readonly #pins = new Map<number, number>();
  /** Writes past #prepareWrite, writing the cache file now (a zeroing waits for them). */
  readonly #writing = new Set<[number, number]>();
  #writingWaiters: (() => void)[] = [];
  readonly #commit: Coalescer;
  /** Clean blocks whose dirty intent is being made durable, and the promise that says it is. */
  readonly #intents = new Map<number, Promise<void>>();
  /** Blocks for the next intent transaction, gathered during this turn of the event loop. */
  #intentBatch: { blocks: number[]; durable: Promise<void> } | null = null;
  readonly #autoCommitMs: number;
  readonly #maxFillBlocks: number;
  readonly #rangeFillBlocks: number;
  /** Blocks a miss fills around what was asked while the disk is busy (a budget only). */
  readonly #fillGranuleBlocks: number;
  /** Without a budget: blocks a miss fills around what was asked (Source.missGranule); 1 = none. */
  readonly #missGranuleBlocks: number;
  /** Date.now() of the last miss that started fills; a disk idle for DISK_IDLE_MS gets whole units. */
  #lastFillAt = -Infinity;
  readonly #diskIdleMs: number;
  /** Whether a busy-disk miss fills its granule or only what it asked (cache/fill-feedback.ts). */
  readonly #neighbours = new NeighbourFeedback();
  /** Whole fill buffers (maxFillBytes): the pieces of a fill streamed through one buffer. */
  readonly #fillBuffers: BufferPool;
  /**
   * Fills that fit one fill buffer take a buffer of their own size class: a 4 KiB miss a 4 KiB
   * buffer. With more fills in flight than FILL_BUFFERS_KEPT (16 misses at QD16 on /dev/uloopN
   * or /dev/ublkbN), each took a fresh 1 MiB buffer, zeroed by the addon on the event loop:
   * 16-19 % of the daemon's CPU in bench/budget.js under TCG (--cpu-prof).
   */
  readonly #sizedFillBuffers: SizedBufferPool;
  #commitTimer: NodeJS.Timeout | null = null;
  #epoch: FlushEpoch | null = null;
  readonly #cowMemoryBytes: number;
  readonly #cowSpillPath: string;
  #closed = false;
  // Reads of the cache file in flight, in two phases: an eviction flips the phase after clearing
  // present bits and punches once the old phase has drained (an RCU grace period, no allocation).
  readonly #readers = [0, 0];
  #readPhase = 0;
  #drained: (() => void) | null = null;
  #evicting: Promise<number> | null = null;
  /** Epochs between commitEpoch() and the end of their clearFlushed. */
  #committing = 0;
  /**
   * The epoch being committed (taken from #epoch, its source being synced): writes and zeroings
   * that start now still mark their blocks rewritten in it, or its clearFlushed would clean them.
   */
  #closing: FlushEpoch | null = null;
  /** Largest read or write handled in one piece, in blocks (a budget must hold several at once). */
  readonly #maxPieceBlocks: number;
  #evicted = 0;
  #hits = 0;
  #misses = 0;
  #spaceError: string | null = null;
  /** Requests failed since the engine started because the metadata's filesystem was full and nothing could be freed. */
  #metadataFullFailures = 0;
  /**
   * A kernel frontend's blocks a flush cleaned there (externalEpochs.commit) but whose clearFlushed
   * could not be written (a full flash filesystem): dirty in the store alone, so no epoch takes them
   * (sorted, disjoint). The next commit clears them with its own, in the same tick as the kernel's,
   * unless an INTENT or ZERO for them came first (recordDirty, zero: they leave this list as they
   * arrive, before anything is recorded, so the kernel has them clean whenever they are here).
   */
  #stranded: Extent[] = [];
  /** Requests waiting for room in the budget now (tests watch it). */
  spaceWaiters = 0;
  /**
   * The `room` flush running now (#flushForRoom): the flash filesystem is full, nothing clean is
   * left to give back, and the flash reserve was released for the flush's own metadata commit.
   * Requests that need new room wait for it instead of taking that room.
   */
  #roomFlush: Promise<void> | null = null;
  #roomFlushes = 0;
  #roomFlushWaiters = 0;
  #failedRequests = 0;
  /** How long a request waits for a `room` flush before it fails (ms). */
  readonly #roomFlushWaitMs: number;
  /** Time of the last user read or write (not prefetch): background work yields to it. */
  lastRequestAt = 0;
  /** Set while a kernel frontend writes the cache file beside the engine. */
  externalEpochs: ExternalEpochs | null = null;
  /**
   * Called when the budget is full of dirty (or busy) blocks and a write must wait for room:
   * should flush and resolve once the flush is done, or reject if it cannot (the waiting request
   * then fails with CacheFullError). Without it such a request fails at once. `reason` 'room':
   * the flash filesystem is full and the cache holds only dirty blocks (status and history say so).
   */
  onSpacePressure: ((reason?: 'room') => Promise<unknown>) | null = null;

  constructor(store: CacheStore, source: Source, options: EngineOptions = {}) {
    this.store = store;
    this.source = source;
    this.geometry = store.geometry;
    this.#autoCommitMs = options.autoCommitMs ?? 1000;
    this.#maxFillBlocks = Math.max(1, Math.floor((options.maxFillBytes ?? DEFAULT_MAX_FILL) / this.geometry.blockSize));
    this.#rangeFillBlocks = Math.max(1, options.rangeFillBlocks ?? RANGE_FILL_BLOCKS);
    this.#diskIdleMs = options.diskIdleMs ?? DISK_IDLE_MS;
    this.#roomFlushWaitMs = options.roomFlushWaitMs ?? ROOM_FLUSH_WAIT_MS;
    this.#fillGranuleBlocks = Math.max(1, Math.floor((options.fillGranuleBytes ?? DEFAULT_FILL_GRANULE) / this.geometry.blockSize));
    this.#missGranuleBlocks = Math.max(1, Math.floor((source.missGranule ?? 0) / this.geometry.blockSize));
    this.#fillBuffers = new BufferPool(this.#maxFillBlocks * this.geometry.blockSize, FILL_BUFFERS_KEPT);
    this.#sizedFillBuffers = new SizedBufferPool(this.geometry.blockSize, FILL_BUFFERS_KEPT * this.#fillBuffers.bufferBytes);
    this.#commit = new Coalescer(() => this.#commitStaged());
    this.#cowMemoryBytes = options.cowMemoryBytes ?? 64 << 20;
    this.#cowSpillPath = options.cowSpillPath ?? `${store.paths.cache}.cow`;
    const budget = store.budgetBlocks;
    this.#maxPieceBlocks = Number.isFinite(budget) ? Math.max(store.unitBlocks, Math.floor(budget / 4)) : Infinity;
  }

  get size(): number {
    return this.geometry.size;
  }

  get readOnly(): boolean {
    return this.store.mode !== 'writeback';
  }

  stats(): EngineStats {
    const space = this.store.space();
    const bs = this.geometry.blockSize;
    const staged = this.#stagedCounts();
    return {
      size: this.geometry.size,
      blockSize: bs,
      blocks: this.geometry.blockCount,
      presentBlocks: space.presentBlocks,
      // Runs (long fills staged by range) are fills of missing blocks: cached, not present yet.
      cachedBlocks: space.presentBlocks + staged.notPresent + this.#stagedRuns.blocks + this.#committingRuns.blocks,
      dirtyBlocks: this.store.dirty.count() + staged.newlyDirty,
      zeroBlocks: this.store.zeroBlocks() - staged.overZeroed,
      stagedBlocks: this.#stagedCount(),
      mode: this.store.mode,
      flushEpoch: this.store.info.flushEpoch,
      budgetBytes: this.store.budget,
      usedBytes: Math.min(space.usedBlocks * bs, this.geometry.cacheFileSize),
      evictionUnitBytes: this.store.unitBlocks * bs,
      evictedBlocks: this.#evicted,
      readHits: this.#hits,
      readMisses: this.#misses,
      spaceError: this.#spaceError,
      intents: this.store.intentStats(),
      flashReserve: this.store.flashReserve?.status() ?? null,
      roomFlushes: this.#roomFlushes,
      roomWaiters: this.spaceWaiters + this.#roomFlushWaiters,
      failedRequests: this.#failedRequests,
    };
  }

  /**
   * Dirty blocks now: the outside data path's count when there is one (it holds dirty blocks the
   * store learns of only at its next barrier), else the store's plus the writes staged for the
   * next commit that the store does not count yet (a write into a missing block is recorded
   * dirty only by the commit, up to autoCommitMs later: detach, flush and --dirty-max must see it).
   */
  dirtyBlocks(): number {
    return this.externalEpochs?.dirtyBlocks?.() ?? this.store.dirty.count() + this.#stagedCounts().newlyDirty;
  }

  /** Dirty blocks that hold data (zeroed ones take no cache space), exact as dirtyBlocks(). */
  dirtyDataBlocks(): number {
    const external = this.externalEpochs?.dirtyDataBlocks?.();
    if (external !== undefined && external !== null) return external;
    const staged = this.#stagedCounts();
    return this.store.dirty.count() + staged.newlyDirty - (this.store.zeroBlocks() - staged.overZeroed);
  }

  /**
   * What the staged blocks add to the store's counts, in one pass over them: `notPresent` staged
   * blocks the store does not count present yet (their data is in the cache file: cached),
   * `newlyDirty` staged writes into blocks the store does not count dirty (missing ones, and fills
   * written since), `overZeroed` staged writes into zeroed blocks (dirty in the store but counted
   * as zeroed there, while they hold data now). A staged write stays staged until its dirty record
   * is durable, so during that wait it is present and dirty in the store and counts in none.
   */
  #stagedCounts(): { notPresent: number; newlyDirty: number; overZeroed: number } {
    let notPresent = 0;
    let newlyDirty = 0;
    let overZeroed = 0;
    if (this.#staged.size === 0) return { notPresent, newlyDirty, overZeroed };
    const { present, dirty } = this.store;
    for (const [b, state] of this.#staged) {
      const isPresent = present.get(b);
      if (!isPresent) notPresent++;
      if (state !== STAGED_DIRTY) continue;
      if (!dirty.get(b)) newlyDirty++;
      else if (!isPresent) overZeroed++;
    }
    return { notPresent, newlyDirty, overZeroed };
  }

  /**
   * With a budget: starts a background eviction when less than one eviction batch is free. The
   * engine calls it after each fill; a kernel frontend, whose writes take space without asking,
   * calls it when its counts change.
   */
  evictAhead(): void {
    this.#evictAhead();
  }

  /**
   * With a budget: reserves room for `blocks` blocks (an integer, at most the budget) that a
   * kernel frontend is about to let its kernel write itself, waiting for room as a fill does
   * (evicting clean units, committing staged fills, asking onSpacePressure for a flush). The
   * caller gives them back with store.release() in the tick it counts them otherwise (as
   * store.outsideBlocks). Throws CacheFullError when no flush can make room, EngineClosedError
   * once closed.
   */
  async reserveSpace(blocks: number): Promise<void> {
    this.#assertOpen();
    await this.#reserve(blocks);
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
    const length = buf.byteLength;
    if (length === 0) return;
    const g = this.geometry;
    const [first, end] = g.blocksOf(offset, length);
    if (end - first > this.#maxPieceBlocks) {
      // More than the budget can hold at once: in pieces, each readable by itself.
      for (let b = first; b < end; b += this.#maxPieceBlocks) {
        const from = Math.max(offset, g.blockOffset(b));
        const to = Math.min(offset + length, g.blockOffset(Math.min(end, b + this.#maxPieceBlocks)));
        await this.#readInto(buf.subarray(from - offset, to - offset), from, b, Math.min(end, b + this.#maxPieceBlocks));
      }
      return;
    }
    await this.#readInto(buf, offset, first, end);
  }

  /**
   * readInto()'s hit path done now, with no promise: true when every block of the range is present
   * and the cache file's bytes were in the page cache (CacheStore.readDataNow), and then `buf`
   * holds the buf.byteLength bytes at `offset` (bytes) and the hit is counted as readInto() counts
   * it. False otherwise (a miss, a bad range, an empty buffer, a range read in pieces, a closed
   * engine, bytes not in memory): nothing is counted, buf's content is undefined, and the caller
   * calls readInto(), which does it all and throws what it throws. Never throws.
   */
  readNow(buf: Uint8Array, offset: number): boolean {
    const blocks = this.#nowBlocks(buf, offset);
    if (!blocks) return false;
    const [first, end] = blocks;
    const store = this.store;
    if (!store.present.allSet(first, end)) return false;
    // No await from the check to the read's end: an eviction clears present bits before (this
    // read sees them clear) or after it (its punch comes later still), never during, so unlike
    // #readInto this read needs no place in #readers.
    if (!store.readDataNow(buf, offset)) return false;
    this.lastRequestAt = Date.now();
    this.#hits++;
    store.clock?.noteAccess(first, end);
    this.#neighbours.read(first, end);
    return true;
  }

  /**
   * write()'s path for a rewrite of dirty blocks, done now with no promise: true when every block
   * of the range is present and durably dirty (so no intent, fill, reservation or lock is needed,
   * as #prepareWrite would find), none is busy or staged, no open epoch needs a block's old version
   * saved first, and the cache file took the bytes synchronously (CacheStore.writeDataNow: a small
   * buffered write). Then the bytes are written exactly as a resolved write() without FUA leaves
   * them (not durable until flush()). False otherwise: the caller calls write() with the same bytes
   * (some may already be in the cache file: the same bytes, in dirty blocks). Never throws.
   */
  writeNow(offset: number, data: Uint8Array): boolean {
    const blocks = this.readOnly ? null : this.#nowBlocks(data, offset);
    if (!blocks) return false;
    const [first, end] = blocks;
    const store = this.store;
    // Invariant 2: only blocks whose dirty intent is durable (dirty is set once its round synced).
    if (!store.dirty.allSet(first, end) || !store.present.allSet(first, end)) return false;
    for (let b = first; b < end; b++) if (this.#busyAt(b) || this.#isStaged(b)) return false;
    this.#markRewritten(first, end);
    if (this.#epoch && this.#epoch.copyBeforeWrite(first, end).length > 0) return false;
    if (!store.writeDataNow(data, offset)) return false;
    this.lastRequestAt = Date.now();
    return true;
  }

  /**
   * The blocks [first, end) of a request readNow()/writeNow() may take: a non-empty Uint8Array
   * within the device, in one piece, on an open engine; null for anything else (the usual path
   * then checks it again and says what is wrong).
   */
  #nowBlocks(buf: Uint8Array, offset: number): [number, number] | null {
    if (this.#closed || !(buf instanceof Uint8Array)) return null;
    const length = buf.byteLength;
    if (length === 0 || !Number.isSafeInteger(offset) || offset < 0 || offset + length > this.size) return null;
    const [first, end] = this.geometry.blocksOf(offset, length);
    return end - first > this.#maxPieceBlocks ? null : [first, end];
  }

  async write(offset: number, data: Uint8Array, options: WriteOptions = {}): Promise<void> {
    this.#assertOpen();
    assertBytes(data, 'data');
    assertRange(offset, data.byteLength, this.size);
    if (this.readOnly) throw new ReadOnlyError(`the cache of ${this.source.description} is read-only; attach with --writeback to write`);
    if (data.byteLength === 0) return;
    this.lastRequestAt = Date.now();
    const g = this.geometry;
    const [first, end] = g.blocksOf(offset, data.byteLength);
    try {
      if (end - first > this.#maxPieceBlocks) {
        for (let b = first; b < end; b += this.#maxPieceBlocks) {
          const from = Math.max(offset, g.blockOffset(b));
          const to = Math.min(offset + data.byteLength, g.blockOffset(Math.min(end, b + this.#maxPieceBlocks)));
          await this.#writeRange(from, data.subarray(from - offset, to - offset));
        }
      } else {
        await this.#writeRange(offset, data);
      }
    } catch (err) {
      this.#failed(err);
    }
    if (options.fua) await this.flush();
  }

  /** FLUSH: every write completed before the call is durable when it resolves. */
  async flush(): Promise<void> {
    this.#assertOpen();
    // Staged writes become dirty in the metadata here: a full flash filesystem frees clean blocks
    // and commits again, or fails this FLUSH alone (the writes stay staged for the next one).
    await this.#withMetadataRoom(() => this.#commit.run()).catch((err) => this.#failed(err));
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
    for (let b = first; b < end; b += this.#maxPieceBlocks) {
      const stop = Math.min(end, b + this.#maxPieceBlocks);
      for (;;) {
        // Runs longer than one fill buffer go as one stream each (#fill), where the source can.
        const wait = this.#readable(b, stop, false, true);
        if (!(wait instanceof Promise)) break;
        await wait;
      }
    }
  }

  /**
   * store.markDirtyDurable() for a frontend that records dirty bits itself (a kernel's INTENT or
   * BARRIER, src/bdev/upcalls.ts), with the engine's answer to a full flash filesystem: clean
   * blocks are given back and the transaction tried again (#withMetadataRoom). `skipDirty`: leave
   * out extents already all dirty in the store, looked at again for each try. `waitForRoom` (a
   * kernel's INTENT): with nothing clean to give back, wait for a `room` flush (bounded by
   * roomFlushWaitMs) as the engine's own writes do. Throws MetadataFullError when nothing could
   * be freed (that request fails alone), CacheFullError when the room flush failed or took too
   * long, EngineClosedError when the store failed.
   */
  recordDirty(extents: readonly Extent[], options: { skipDirty?: boolean; waitForRoom?: boolean } = {}): Promise<void> {
    this.#assertOpen();
    this.#unstrand(extents);
    const store = this.store;
    // A BARRIER's record ('kernel') never waits for a room flush, which may itself wait for that
    // BARRIER (uloop's beforeEpoch sends the kernel a FLUSH): evicts, else fails (review11 R-1).
    // An INTENT may wait ('request'): nothing in a flush waits for one (the kernel's barrier
    // takes only the pending set; EVICT skips the INTENT's blocks, busy in the kernel), so a
    // first write on a full flash waits for the room instead of failing (review11 R-5 a).
    const record = () => store.markDirtyDurable(options.skipDirty ? extents.filter((e) => !store.dirty.allSet(e.start, e.start + e.count)) : extents);
    return this.#withMetadataRoom(record, options.waitForRoom ? 'request' : 'kernel').catch((err) => this.#failed(err));
  }

  /** Blocks about to turn dirty in the kernel again (an INTENT, a ZERO) leave #stranded, synchronously. */
  #unstrand(extents: readonly Extent[]): void {
    if (this.#stranded.length > 0) this.#stranded = [...subtractExtents(this.#stranded, extents)];
  }

  /** TRIM: the range reads as zeros afterwards, and the disk gets zeros at the next flush. */
  discard(offset: number, length: number): Promise<void> {
    return this.zero(offset, length);
  }

  /**
   * WRITE_ZEROES (and TRIM): [offset, offset + length) reads as zeros when this resolves, and the
   * disk holds zeros after the next flush. Whole blocks are zeroed durably at once and take no
   * cache space (CacheStore.zero); the parts of blocks at either end are written with zeros like
   * any write, durable at the next commit (or now, with `fua`).
   */
  async zero(offset: number, length: number, options: WriteOptions = {}): Promise<void> {
    this.#assertOpen();
    assertRange(offset, length, this.size);
    if (this.#stranded.length > 0) {
      const [first, end] = this.geometry.blocksOf(offset, length);
      this.#unstrand([{ start: first, count: end - first }]);
    }
    if (this.readOnly) throw new ReadOnlyError(`the cache of ${this.source.description} is read-only; attach with --writeback to write`);
    if (length === 0) return;
    this.lastRequestAt = Date.now();
    const g = this.geometry;
    const end = offset + length;
    const wholeFirst = Math.ceil(offset / g.blockSize);
    const wholeEnd = end === g.size ? g.blockCount : Math.floor(end / g.blockSize);
    try {
      if (wholeFirst >= wholeEnd) {
        await this.#writeRange(offset, Buffer.alloc(length));
      } else {
        const head = g.blockOffset(wholeFirst) - offset;
        if (head > 0) await this.#writeRange(offset, Buffer.alloc(head));
        for (let b = wholeFirst; b < wholeEnd; b += ZERO_STEP_BLOCKS) await this.#zeroBlocks(b, Math.min(wholeEnd, b + ZERO_STEP_BLOCKS));
        const tailFrom = Math.min(end, g.blockOffset(wholeEnd));
        if (end > tailFrom) await this.#writeRange(tailFrom, Buffer.alloc(end - tailFrom));
      }
    } catch (err) {
      this.#failed(err);
    }
    if (options.fua) await this.flush();
  }

  /**
   * Evicts clean, idle blocks of about `blocks` blocks' worth of units the clock picks (a budget
   * only). Resolves with the blocks evicted. Evictions run one at a time. `pinned`: a kernel
   * frontend gives up blocks it keeps for requests still preparing too (ExternalEpochs.evict).
   */
  evict(blocks: number, options: { pinned?: boolean } = {}): Promise<number> {
    this.#assertOpen();
    if (this.#evicting) return this.#evicting.then(() => this.evict(blocks, options));
    const run = this.#evictUnits(blocks, new Set(), options.pinned === true).finally(() => {
      if (this.#evicting === run) this.#evicting = null;
    });
    this.#evicting = run;
    return run;
  }

  /**
   * Writes zeros into the cache file for every zeroed block of blocks [first, end) (default: the
   * whole disk) and makes them dirty and present again, durably (synced and recorded when this
   * resolves). For a frontend that cannot serve zeroed blocks itself (a uloop module without
   * ULOOP_F_ZERO takes dirty as present), and for a uloop MISS on a zeroed block (the kernel
   * reads the cache file once it is answered).
   */
  async materializeZeroed(first = 0, end = this.geometry.blockCount): Promise<void> {
    this.#assertOpen();
    const zeroed: Extent[] = [];
    // Appended one by one: a long dirty run may have more gaps than a call takes arguments.
    for (const e of this.store.dirty.runs(first, end)) for (const g of this.store.present.gaps(e.start, e.start + e.count)) zeroed.push(g);
    for (const z of zeroed) {
      for (let b = z.start; b < z.start + z.count; b += this.#maxFillBlocks) {
        const blocks: number[] = [];
        for (let x = b; x < Math.min(z.start + z.count, b + this.#maxFillBlocks); x++) if (this.#isZeroed(x) && !this.#busyAt(x)) blocks.push(x);
        if (blocks.length > 0) await this.#materialize(blocks);
      }
    }
    await this.flush();
  }

  /**
   * Starts a flush epoch: commits staged writes, then snapshots the dirty set. Blocks written from
   * now until commitEpoch() (or being written now) stay dirty after it. The cache file's fdatasync
   * that makes the snapshot's content durable runs on while the flusher copies; commitEpoch waits
   * for it before clearing anything (a failure of it fails the commit).
   */
  async beginEpoch(): Promise<Epoch> {
    this.#assertOpen();
    if (this.#epoch) throw new EngineClosedError('a flush epoch is already open');
    await this.externalEpochs?.beforeEpoch?.();
    if (this.#epoch) throw new EngineClosedError('a flush epoch is already open');
    // The flush's own commit records staged dirty blocks, so the snapshot has them: on a full flash
    // filesystem it takes the flash reserve, never waits for a flush (it is one). With nothing
    // staged it would only fdatasync the cache file, which the epoch's own sync below does anyway
    // (one fdatasync per flush fewer: bench/README, "Session 13").
    if (this.#stagedCount() > 0) {
      await this.#withMetadataRoom(() => this.#commit.run(), 'flush');
    }
    const flushing = this.store.dirty.clone();
    this.externalEpochs?.begin(flushing);
    // Zeroed at the snapshot: the disk gets zeros for these, whatever happens to them meanwhile.
    const zeros = new Bitmap(this.geometry.blockCount);
    for (const e of flushing.runs()) {
      for (const z of this.store.present.gaps(e.start, e.start + e.count)) zeros.setRange(z.start, z.start + z.count);
    }
    // A zeroed block written since the commit above (zeros materialised, then the write: staged
    // dirty, committed later) holds that write in the cache file: the epoch copies it from there.
    // Taken as zeros, the disk would get zeros and a commit landing before clearFlushed would
    // leave the block clean over data the disk never got.
    // (Only #staged can hold one: runs are fills, of blocks that were missing and not dirty.)
    for (const b of this.#staged.keys()) if (zeros.get(b)) zeros.clear(b);
    // Open in the same tick as the outside snapshot: the kernel may ask to preserve blocks
    // (preserveEpochBlocks) as soon as it has begun its epoch.
    const epoch = new FlushEpoch(this.store.info.flushEpoch + 1, flushing, zeros, {
      geometry: this.geometry,
      readCache: (buf, position) => this.store.readData(buf, position),
      memoryBytes: this.#cowMemoryBytes,
      spillPath: this.#cowSpillPath,
    });
    this.#epoch = epoch;
    for (const [first, end] of this.#writes) epoch.markRewritten(first, end);
    // The copy the flusher reads must be durable in the cache before its dirty bit can go
    // (invariant 2). Not yet for writes the engine never saw (a kernel frontend's), nor for a write
    // into a dirty block that completed after the commit's sync (if any) but before the snapshot
    // (it is neither in #writes nor rewritten). Writes from now on count as rewritten.
    // Only before the clear: the disk may get the content first (a crash then leaves the block
    // dirty, and the disk one of the two epochs' images, as any crash mid-flush), so this sync
    // runs alongside the copy and the disk's sync, and commitEpoch waits for it.
    try {
      epoch.cacheSynced = this.store.syncData();
      epoch.cacheSynced.catch(() => undefined);
      // The disk's record says a flush of this cache writes the disk, before it does (disk
      // records: a cache the disk is written past is refused at its next attach).
      if (epoch.blocks > 0) this.store.prepareDiskWrite();
    } catch (err) {
      this.abortEpoch(epoch);
      throw err;
    }
    return epoch;
  }

  /**
   * Copy-on-write for a kernel frontend (the PRESERVE upcall): returns once the open epoch's
   * version of every block of [first, end) it flushes is saved aside or already read by the
   * flusher. Nothing to do without an open epoch. The caller lets the blocks change afterwards.
   */
  preserveEpochBlocks(first: number, end: number): Promise<void> {
    return this.#preserveForEpoch(first, end);
  }

  /** Reads cache content for the flusher; never touches the source. */
  async readCache(buf: Uint8Array, position: number): Promise<number> {
    this.#assertOpen();
    return this.store.readData(buf, position);
  }

  /**
   * The epoch's version of blocks [start, start + count) (which must lie in one of its extents),
   * for the flusher to write to the disk: the cache content as of beginEpoch(), even for blocks
   * rewritten since (their saved copies), and zeros for blocks zeroed then. Each block should be
   * read once; afterwards writes to it no longer need a copy. With `into`, the blocks are read
   * into it (a view of it is returned).
   */
  async readEpoch(epoch: Epoch, start: number, count: number, into?: Buffer): Promise<Buffer> {
    return this.#openEpoch(epoch).read(start, count, into);
  }

  /**
   * The flusher's batch (FlushEpoch.copyOut): the epoch's version of the pieces ([first block,
   * blocks, byte offset in buf]) to the source. Pieces whose cache content is the epoch's version
   * go from the cache file to the source in one request where the source can take it
   * (WritableSource.writeManyFrom: the reads run off the event loop); the others are read into
   * `buf` here. `write(pieces)` sends those pieces of `buf` to the source; `read` is called once
   * the batch's reads are done or handed over. Resolves once the source has them (not synced).
   */
  async copyEpochOut(
    epoch: Epoch,
    buf: Buffer,
    pieces: ReadonlyArray<readonly [number, number, number]>,
    write: (pieces: ReadonlyArray<readonly [number, number, number]>) => Promise<void>,
    read?: () => void,
  ): Promise<void> {
    const open = this.#openEpoch(epoch);
    const source = this.#writableSource();
    const g = this.geometry;
    const copy = source.writeManyFrom
      ? () => this.store.copyTo(source, buf, pieces.map(([start, count, at]) => [at, g.extentBytes(start, count), g.blockOffset(start)] as const))
      : undefined;
    return open.copyOut(buf, pieces, { copy, write, read });
  }

  /**
   * Ends a flush epoch whose blocks the flusher has written to the source: syncs the source, then
   * clears the dirty bits of the blocks not rewritten meanwhile (invariant 4).
   */
  async commitEpoch(epoch: Epoch): Promise<{ cleaned: number; kept: number }> {
    const open = this.#takeEpoch(epoch);
    // Until its blocks are clean, a write waiting for room waits for this commit rather than
    // starting another flush of the same dirty blocks.
    this.#committing++;
    this.#closing = open;
    // Writes in flight now were marked when they began or at the snapshot; later ones mark it.
    try {
      return await this.#commitEpoch(open);
    } finally {
      if (this.#closing === open) this.#closing = null;
      this.#committing--;
      this.store.notifySpace();
    }
  }

  async #commitEpoch(open: FlushEpoch): Promise<{ cleaned: number; kept: number }> {
    // Blocks written since beginEpoch() waited for their copy (readEpoch or preserve) while the
    // epoch was open; with it closed they need none.
    await open.release();
    try {
      if (open.failed) throw open.failed;
      // The disk's sync (invariant 4) and the cache's, begun at the snapshot (invariant 2): both
      // before any dirty bit goes.
      const [disk, cache] = await Promise.allSettled([this.#writableSource().sync(), open.cacheSynced]);
      if (disk.status === 'rejected') throw disk.reason;
      if (cache.status === 'rejected') throw cache.reason;
    } catch (err) {
      this.externalEpochs?.abort?.();
      throw err;
    }
    // Zeroed blocks leave the dirty set here and become missing: their present bits must be clear
    // in the bitmap file first, or a crash would bring back a stale one (durability rule 10).
    if (open.zeros.nextSet(0) < open.zeros.bits) await this.store.persistBitmap(true);
    // Decided after the sync, so a write that raced with it keeps its block dirty.
    const cleaned = open.flushing;
    for (const b of open.rewritten) cleaned.clear(b);
    // The outside dirty bits go first: a write to a block cleared there asks for a fresh intent,
    // which is recorded only after clearFlushed below (same tick).
    this.externalEpochs?.commit(cleaned);
    let own = [...cleaned.runs()];
    for (let attempt = 0; ; attempt++) {
      // A kernel frontend's blocks stranded by an earlier failed clear: still clean there (no INTENT
      // or ZERO since, #stranded), cleared here in the same tick as this epoch's.
      const stranded = this.externalEpochs ? this.#stranded : [];
      const extents = stranded.length > 0 ? mergeExtents([...own, ...stranded]) : own;
      try {
        this.store.clearFlushed(extents);
        if (stranded.length > 0) this.#stranded = [];
        break;
      } catch (err) {
        // A full flash filesystem: nothing was cleared in the store (its transaction rolled back),
        // so the blocks stay dirty (invariant 4). A kernel frontend has cleared its own bits
        // already (same tick, above): no epoch takes them again, so they wait in #stranded (an
        // INTENT or ZERO takes them off it) for the retry below or the next commit.
        if (!(err instanceof MetadataFullError)) throw err;
        if (this.externalEpochs) {
          this.#stranded = mergeExtents([...this.#stranded, ...own]);
          own = [];
        }
        // Room for the commit: clean blocks given back, else the flash reserve. Then once more;
        // without a kernel frontend the blocks written meanwhile (rewritten: #closing) stay dirty.
        if (attempt < 3 && ((await this.#metadataEvict(err)) || (await this.#releaseReserve()))) {
          if (!this.externalEpochs) {
            for (const b of open.rewritten) cleaned.clear(b);
            own = [...cleaned.runs()];
          }
          continue;
        }
        // Otherwise the flush fails; without a kernel frontend the next one writes them again.
        throw this.#metadataFailed(err);
      }
    }
    // A zeroed block materialised during the epoch (a uloop MISS on it: zeros into the cache file,
    // staged dirty) and not rewritten holds the zeros the disk just got: staged clean now, or its
    // commit would record it dirty in the store after the kernel cleared it (a block dirty only in
    // the store: no flush takes it, a budget never evicts it; the uloop model's budget property).
    if (this.#staged.size > 0) for (const [b, state] of this.#staged) if (state === STAGED_DIRTY && cleaned.get(b)) this.#staged.set(b, STAGED_CLEAN);
    const count = cleaned.count();
    // Clean blocks can be evicted: whoever waits for room may find some now.
    this.store.notifySpace();
    // A flush that ran on the flash reserve: clean blocks give it back its room.
    void this.#retakeReserve();
    // A disk written without ulobdev: the disk as this flush left it, for the next attach to compare.
    await this.store.refreshDiskFingerprint();
    return { cleaned: count, kept: open.blocks - count };
  }

  /**
   * Taking back a device whose daemon died (/dev/uloopN's ATTACH), before any upcall is served:
   * clears, durably, the store's dirty bits of blocks `outsideDirty` (the kernel's dirty set, one
   * bit per block) calls clean. Each is either a block a flush epoch wrote back, synced and
   * committed in the kernel, whose store commit (clearFlushed) the dead daemon never made, or a
   * first-write INTENT the dead daemon recorded and the kernel never applied: the block was clean
   * before it (cache == disk) and the kernel re-sends the INTENT to this daemon, which records it
   * again before the write lands (a ZERO likewise, its blocks held busy until then). Either way the
   * disk has the block's content, as clearFlushed requires; left dirty, no flush epoch would take
   * it (an epoch takes blocks dirty on both sides) and with a budget it would never be evicted.
   * Never while upcalls are served: an INTENT in flight would lose its dirty bit. Returns the
   * number of blocks cleared.
   */
  async reconcileOutsideDirty(outsideDirty: Bitmap): Promise<number> {
    const stale: Extent[] = [];
    for (const r of this.store.dirty.runs()) for (const g of outsideDirty.gaps(r.start, r.start + r.count)) stale.push(g);
    if (stale.length === 0) return 0;
    // Zeroed blocks among them become missing: their present bits durably clear first (rule 10).
    await this.store.persistBitmap(true);
    this.store.clearFlushed(stale);
    this.store.notifySpace();
    return stale.reduce((n, e) => n + e.count, 0);
  }

  /** Ends an epoch without clearing anything (the flush failed); its blocks stay dirty. */
  abortEpoch(epoch: Epoch): void {
    if (this.#epoch !== epoch) return;
    const open = this.#epoch;
    this.#epoch = null;
    this.externalEpochs?.abort?.();
    void open.release();
    this.store.notifySpace();
  }

  /** Bytes of epoch versions saved aside (memory and spill file) for the open epoch. */
  get preservedBytes(): number {
    return this.#epoch?.preservedBytes ?? 0;
  }

  /**
   * Recovery after a failed fdatasync of the cache file (`store.dataSyncFailed`), without a
   * restart. The pages written since the last good sync may be gone, and the next sync would not
   * say so (errseq reports an error once per open file), so every staged block is dropped: a fill
   * turns missing again (the next read fetches it from the source: invariant 1 never saw it
   * present), a write staged since the last commit is lost, as the FLUSH or FUA that failed
   * reported. Present and dirty blocks keep their bits: a dirty block's rewrite since the last
   * FLUSH may be lost, not its dirty bit (invariant 2). `dropping` runs first with the dropped
   * blocks (the uloop frontend has the kernel stop serving them: EVICT). Then the cache file is
   * synced again (store.recoverDataSync). Resolves true when the store serves I/O again, false
   * while the sync still fails (call again later); throws EngineClosedError when the store failed
   * otherwise (metadata, bitmap) or is closed.
   */
  async recoverSyncError(dropping?: (blocks: Extent[]) => Promise<void>): Promise<boolean> {
    if (!this.store.dataSyncFailed) return this.store.recoverDataSync();
    // Requests are refused while the store is failed; a commit still running ends first.
    await this.#commit.idle();
    const blocks = Float64Array.from(this.#staged.keys()).sort();
    const runs = [...this.#stagedRuns.extents(), ...this.#committingRuns.extents()];
    const dropped = [...toExtents(blocks), ...runs].sort((a, b) => a.start - b.start);
    if (dropped.length > 0 && dropping) await dropping(dropped);
    for (const b of blocks) this.#staged.delete(b);
    // Runs staged during `dropping` go too, untold (review7 S2; uloop's dropping is synchronous,
    // so none can be): kept, they would be committed present though their pages may be the ones
    // the failed fdatasync lost (invariant 1).
    const runBlocks = this.#stagedRuns.blocks + this.#committingRuns.blocks;
    this.#stagedRuns.clear();
    this.#committingRuns.clear();
    this.store.release(blocks.length + runBlocks);
    this.#cancelAutoCommit();
    return this.store.recoverDataSync();
  }

  /** Commits everything and closes the store cleanly. The source stays open (the caller owns it). */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#cancelAutoCommit();
    try {
      // A background eviction (#evictAhead) ends before the store closes.
      await this.#evicting?.catch(() => undefined);
      if (!this.store.failed) await this.#commit.run();
    } finally {
      await this.store.close();
    }
  }

  // --- read path -----------------------------------------------------------------------------

  /** Reads blocks [first, end) ⊇ [offset, offset + buf.length) into buf once they are readable. */
  async #readInto(buf: Uint8Array, offset: number, first: number, end: number): Promise<void> {
    const store = this.store;
    let zeros: Extent[] | null = null;
    let pinned = false;
    // Before a miss watches its own neighbours (#readable): a read of one watched earlier is the evidence.
    this.#neighbours.read(first, end);
    if (store.present.allSet(first, end)) {
      // The hit path: no allocation, no syscall but the read itself.
      this.#hits++;
      store.clock?.noteAccess(first, end);
    } else {
      let filled = false;
      pinned = true;
      this.#pin(first, end);
      try {
        for (;;) {
          const ready = this.#readable(first, end, true);
          if (!(ready instanceof Promise)) {
            zeros = ready;
            break;
          }
          filled = true;
          await ready;
        }
      } catch (err) {
        try {
          // No room for the fill (the flash filesystem is full and holds no clean block to give
          // back, or the budget is full of dirty data): the read still gets its data, uncached.
          if (!(err instanceof CacheFullError) || this.#closed) throw err;
          this.#misses++;
          await this.#readAround(buf, offset, first, end);
          return;
        } finally {
          this.#unpin(first, end);
        }
      }
      // A miss is not a use: a unit filled and never hit again goes first (cache/clock.ts).
      if (filled) this.#misses++;
      else {
        this.#hits++;
        store.clock?.noteAccess(first, end);
      }
    }
    // From the check above to the read's start no await: an eviction that clears these present
    // bits later waits for this read (#readers) before it punches.
    const phase = this.#readPhase & 1;
    this.#readers[phase]!++;
    try {
      await store.readData(buf, offset);
    } finally {
      this.#readDone(phase);
      if (pinned) this.#unpin(first, end);
    }
    if (zeros) {
      const g = this.geometry;
      for (const z of zeros) {
        const from = Math.max(offset, g.blockOffset(z.start));
        const to = Math.min(offset + buf.byteLength, g.blockOffset(z.start + z.count));
        if (to > from) buf.fill(0, from - offset, to - offset);
      }
    }
  }

  /**
   * A read that cannot be cached: blocks of [first, end) the cache holds (present or staged) from
   * the cache file, zeroed ones as zeros, the rest from the source, into buf (the bytes at
   * `offset`). Each block's place is decided before any read starts, as a reader of the current
   * phase: an eviction that clears a present bit afterwards waits for this read before its punch,
   * and a block missing then is clean, so the source has its content.
   */
  async #readAround(buf: Uint8Array, offset: number, first: number, end: number): Promise<void> {
    const g = this.geometry;
    const store = this.store;
    const phase = this.#readPhase & 1;
    this.#readers[phase]!++;
    try {
      const runs: { from: number; to: number; where: 'cache' | 'zero' | 'source' }[] = [];
      for (let b = first; b < end; b++) {
        const where = store.present.get(b) || this.#isStaged(b) ? 'cache' : store.dirty.get(b) ? 'zero' : 'source';
        const from = Math.max(offset, g.blockOffset(b));
        const to = Math.min(offset + buf.byteLength, g.blockOffset(b + 1));
        const last = runs[runs.length - 1];
        if (last && last.where === where && last.to === from) last.to = to;
        else runs.push({ from, to, where });
      }
      await Promise.all(
        runs.map(async ({ from, to, where }) => {
          const part = buf.subarray(from - offset, to - offset);
          if (where === 'zero') part.fill(0);
          else if (where === 'cache') await store.readData(part, from);
          else await this.source.readAt(part, from);
        }),
      );
    } finally {
      this.#readDone(phase);
    }
  }

  #readDone(phase: number): void {
    if (--this.#readers[phase]! === 0 && this.#drained && phase !== (this.#readPhase & 1)) {
      const drained = this.#drained;
      this.#drained = null;
      drained();
    }
  }

  /** Resolves once every cache read that began before the call has ended. One caller at a time. */
  #readGrace(): Promise<void> {
    const old = this.#readPhase & 1;
    this.#readPhase++;
    if (this.#readers[old] === 0) return Promise.resolve();
    return new Promise((resolve) => (this.#drained = resolve));
  }

  /**
   * One synchronous look at blocks [first, end): the zeroed runs among them if every block is
   * readable now (present, staged or zeroed, none busy), else a promise to wait for (fills it
   * started for missing blocks, and blocks busy elsewhere) before looking again. With a budget,
   * and `wholeUnits`, a missing block brings in the missing blocks of its whole unit: the disk
   * spins for it anyway. With `stream` (prefetch), missing runs are filled in pieces of up to
   * MAX_STREAM_FILL where the source can stream (Source.streamInto), not one fill buffer's worth.
   */
  #readable(first: number, end: number, wholeUnits: boolean, stream = false): Extent[] | Promise<unknown> {
    const store = this.store;
    const zeros: Extent[] = [];
    const waits: Promise<unknown>[] = [];
    let missing = false;
    for (const gap of store.present.gaps(first, end)) {
      for (let b = gap.start; b < gap.start + gap.count; b++) {
        const busy = this.#busyAt(b);
        if (busy) waits.push(busy);
        else if (this.#isStaged(b)) continue;
        else if (store.dirty.get(b)) {
          const last = zeros[zeros.length - 1];
          if (last && last.start + last.count === b) last.count++;
          else zeros.push({ start: b, count: 1 });
        } else missing = true;
      }
    }
    if (missing) {
      let from = first;
      let to = end;
      if (wholeUnits && store.clock) {
        // A miss that finds the disk idle (maybe asleep: it spins up for this) reads the whole
        // unit, so the disk wakes less often. While misses keep it busy it is awake anyway: a
        // whole unit per 4 KiB miss would read and write 64 times the data and fill the budget
        // with the cold neighbours of scattered hot blocks (bench/budget.js: hit ratio 0.55,
        // 23 IOPS); those read aligned granules only, and only while the neighbours watched lately
        // were read (cache/fill-feedback.ts: scattered hot blocks fill only what was asked).
        const now = Date.now();
        const idle = now - this.#lastFillAt >= this.#diskIdleMs;
        this.#lastFillAt = now;
        const granule = Math.min(store.unitBlocks, this.#fillGranuleBlocks);
        const gFrom = Math.floor(first / granule) * granule;
        const gTo = Math.min(this.geometry.blockCount, Math.ceil(end / granule) * granule);
        const span = idle ? store.unitBlocks : this.#neighbours.wantGranule() ? granule : 1;
        // The granule's missing neighbours are watched whether they are filled or not.
        for (const [a, b] of [[gFrom, first], [end, gTo]] as const) for (const gap of store.present.gaps(a, b)) this.#neighbours.watch(gap.start, gap.start + gap.count);
        from = Math.floor(first / span) * span;
        to = Math.min(this.geometry.blockCount, Math.ceil(end / span) * span);
      } else if (wholeUnits && this.#missGranuleBlocks > 1) {
        // A source that prefers larger fetches (HTTP: a round trip costs far more than the bytes)
        // gets the aligned granule around the miss; its blocks already here are skipped below.
        const span = this.#missGranuleBlocks;
        from = Math.floor(first / span) * span;
        to = Math.min(this.geometry.blockCount, Math.ceil(end / span) * span);
      }
      const streamBlocks = Math.floor(MAX_STREAM_FILL / this.geometry.blockSize);
      const maxRun = stream && this.source.streamInto ? Math.max(this.#maxFillBlocks, streamBlocks) : this.#maxFillBlocks;
      waits.push(...this.#startFills(from, to, maxRun));
    }
    if (waits.length > 0) return Promise.all(waits);
    return zeros;
  }

  /**
   * A miss a kernel frontend fills around itself (src/bdev/unit-fill.ts): restarts the disk's idle
   * clock, as the engine's own misses with a budget do (#readable), and says whether the disk was
   * idle before it (no miss for diskIdleMs: it may have spun up for this one, so a whole unit is
   * worth reading while it spins).
   */
  noteMiss(): boolean {
    const now = Date.now();
    const idle = now - this.#lastFillAt >= this.#diskIdleMs;
    this.#lastFillAt = now;
    return idle;
  }

  /** Starts fills of the missing, idle blocks of [first, end) in runs of up to `maxRun` blocks; returns their promises. */
  #startFills(first: number, end: number, maxRun: number): Promise<void>[] {
    const store = this.store;
    const fills: Promise<void>[] = [];
    let start = 0;
    let count = 0;
    const flushRun = () => {
      if (count > 0) fills.push(this.#fill(start, count));
      count = 0;
    };
    for (const gap of store.present.gaps(first, end)) {
      for (let b = gap.start; b < gap.start + gap.count; b++) {
        if (this.#busyAt(b) || this.#isStaged(b) || store.dirty.get(b)) {
          flushRun();
        } else {
          if (count === 0) start = b;
          if (++count === maxRun) flushRun();
        }
      }
      flushRun();
    }
    return fills;
  }

  /**
   * Copies contiguous missing blocks from the source into the cache and stages them clean. A run
   * longer than one fill buffer (a prefetch's, #readable) goes through the buffer piece after
   * piece in one request (store.fillStream).
   */
  async #fill(start: number, count: number): Promise<void> {
    // Long runs (a hydration's) by range: a Map entry per block cost more than their copy.
    const byRange = count >= this.#rangeFillBlocks;
    let blocks: number[] | null = null;
    if (!byRange) {
      blocks = [];
      for (let b = start; b < start + count; b++) blocks.push(b);
    }
    const release = blocks ? this.#lock(blocks) : this.#lockRange(start, start + count);
    try {
      await this.#reserve(count);
      try {
        const offset = this.geometry.blockOffset(start);
        // A reused, aligned buffer: no page faults for fresh memory, no bounce copy for O_DIRECT.
        const bytes = this.geometry.extentBytes(start, count);
        if (bytes <= this.#fillBuffers.bufferBytes) {
          const buf = this.#sizedFillBuffers.take(bytes);
          try {
            await this.#fillCache(buf, offset);
          } finally {
            this.#sizedFillBuffers.give(buf);
          }
        } else {
          const whole = this.#fillBuffers.take();
          try {
            await this.#streamCache(whole, offset, bytes);
          } finally {
            this.#fillBuffers.give(whole);
          }
        }
      } catch (err) {
        this.store.release(count);
        throw err;
      }
      if (blocks) for (const b of blocks) this.#staged.set(b, STAGED_CLEAN);
      else this.#stagedRuns.add(start, start + count);
      this.#scheduleCommit();
      this.store.notifySpace();
      this.#evictAhead();
    } finally {
      release();
    }
  }

  // --- write path ----------------------------------------------------------------------------

  async #writeRange(offset: number, data: Uint8Array): Promise<void> {
    const range = this.geometry.blocksOf(offset, data.byteLength);
    this.#writes.add(range);
    this.#markRewritten(range[0], range[1]);
    let pinned = false;
    try {
      const release = await this.#prepareWrite(offset, data.byteLength, range[0], range[1], () => {
        // The write has to wait (a fill, an intent, room): keep what it prepared from eviction.
        if (!pinned) this.#pin(range[0], range[1]);
        pinned = true;
      });
      let written = false;
      try {
        for (let attempt = 0; ; attempt++) {
          // A `room` flush runs on the released flash reserve: a write that may need new room in
          // the cache file (a block not present) waits for it rather than take that room.
          if (this.#roomFlush && this.store.present.nextClear(range[0], range[1]) < range[1]) await this.#afterRoomFlush();
          // Point-in-time epochs: the open epoch's version of these blocks is saved aside before
          // it changes. No await between the last check and the write below.
          await this.#preserveForEpoch(range[0], range[1]);
          this.#writing.add(range);
          try {
            // Small buffered writes are done right here (no threadpool hand-off); else, or when
            // the file is slow, on the threadpool.
            if (!this.store.writeDataNow(data, offset)) await this.store.writeData(data, offset);
            break;
          } catch (err) {
            if (!isNoSpace(err) || attempt >= 3) throw err;
          } finally {
            this.#writing.delete(range);
            this.#wakeWritingWaiters();
          }
          await this.#relieveFlash(range[1] - range[0]);
        }
        written = true;
      } finally {
        release(written);
      }
    } finally {
      this.#writes.delete(range);
      if (pinned) this.#unpin(range[0], range[1]);
    }
  }

  /**
   * Brings every block of the write into a state where its data may change: dirty, staged, or
   * missing or zeroed but wholly overwritten (reserved and locked until the data is written).
   * Calls `waiting` before the first time it has to wait. Returns the unlock, told whether the
   * data was written.
   */
  async #prepareWrite(offset: number, length: number, first: number, end: number, waiting: () => void): Promise<(written: boolean) => void> {
    const g = this.geometry;
    const store = this.store;
    for (let pass = 0; ; pass++) {
      if (pass === 1) waiting();
      const waits: Promise<void>[] = [];
      let partial: number[] | null = null;
      let zeroPartial: number[] | null = null;
      let whole: number[] | null = null;
      let intents: number[] | null = null;
      for (let b = first; b < end; b++) {
        const busy = this.#busyAt(b);
        if (busy) {
          waits.push(busy);
          continue;
        }
        if (this.#isStaged(b)) continue;
        if (store.present.get(b)) {
          if (!store.dirty.get(b)) (intents ??= []).push(b);
        } else if (offset <= g.blockOffset(b) && offset + length >= g.blockOffset(b) + g.blockLength(b)) {
          (whole ??= []).push(b);
        } else if (store.dirty.get(b)) {
          (zeroPartial ??= []).push(b);
        } else {
          (partial ??= []).push(b);
        }
      }
      if (waits.length > 0) {
        await Promise.all(waits);
        continue;
      }
      if (partial) {
        // A partly written block needs its old bytes first, or the rest of it would be garbage.
        for (const b of partial) {
          for (;;) {
            const wait = this.#readable(b, b + 1, false);
            if (!(wait instanceof Promise)) break;
            await wait;
          }
        }
        continue;
      }
      if (zeroPartial) {
        // So does a partly written zeroed block: its old bytes are zeros.
        await this.#materialize(zeroPartial);
        continue;
      }
      // Invariant 2: a clean block's cache copy may change only once it is durably dirty. Other
      // states may change while the transaction is pending, so look again afterwards.
      if (intents) {
        await this.#markDirtyBatched(intents);
        continue;
      }
      // Staged clean blocks become staged dirty: the next commit records them dirty.
      for (let b = first; b < end; b++) this.#stageDirty(b);
      if (!whole) return NO_RELEASE;
      const blocks = whole;
      if (!store.reserve(blocks.length)) {
        await this.#makeRoom(blocks.length);
        continue;
      }
      const release = this.#lock(blocks);
      return (written) => {
        if (written) {
          for (const b of blocks) this.#staged.set(b, STAGED_DIRTY);
          this.#scheduleCommit();
          store.notifySpace();
        } else {
          // Not written: the blocks stay as they were (missing or zeroed), their bytes ignored.
          store.release(blocks.length);
        }
        release();
      };
    }
  }

  /** Zeroed blocks about to be written in part: zeros into the cache file, staged dirty. */
  async #materialize(blocks: number[]): Promise<void> {
    const release = this.#lock(blocks);
    try {
      await this.#reserve(blocks.length);
      try {
        for (const run of toExtents(blocks)) {
          const bytes = this.geometry.extentBytes(run.start, run.count);
          await this.#writeCache(Buffer.alloc(bytes), this.geometry.blockOffset(run.start));
        }
      } catch (err) {
        this.store.release(blocks.length);
        throw err;
      }
      // Still zeroed: staged dirty. One a flush epoch cleaned while this waited for room (its
      // zeros are on the disk, the kernel's bit went with it) is a fill of what the disk holds.
      for (const b of blocks) this.#staged.set(b, this.store.dirty.get(b) ? STAGED_DIRTY : STAGED_CLEAN);
      this.#scheduleCommit();
      this.store.notifySpace();
    } finally {
      release();
    }
  }

  /** Zeroes whole blocks [first, end): waits for everything on them, then CacheStore.zero. */
  async #zeroBlocks(first: number, end: number): Promise<void> {
    const store = this.store;
    const range: [number, number] = [first, end];
    this.#writes.add(range);
    this.#markRewritten(first, end);
    try {
      let release: () => void;
      for (;;) {
        const waits: Promise<void>[] = [];
        let staged = false;
        for (let b = first; b < end; b++) {
          const busy = this.#busyAt(b) ?? this.#intents.get(b);
          if (busy) waits.push(busy.catch(() => undefined));
          else if (this.#isStaged(b)) staged = true;
        }
        if (waits.length > 0) {
          await Promise.all(waits);
          continue;
        }
        // Staged data is committed first: then every block is present, dirty, zeroed or missing,
        // and the store knows what each holds.
        if (staged) {
          // A full flash filesystem: give clean blocks back and commit again, or fail this write
          // alone, counted in spaceError (it failed uncounted, with the bare SQLITE_FULL: newuser10b).
          await this.#withMetadataRoom(() => this.#commit.run());
          continue;
        }
        const blocks: number[] = [];
        for (let b = first; b < end; b++) blocks.push(b);
        release = this.#lock(blocks);
        break;
      }
      try {
        // Writes that got past their checks before the lock finish first.
        await this.#writingDone(first, end);
        await this.#preserveForEpoch(first, end);
        const todo: Extent[] = [];
        for (const e of store.present.runs(first, end)) todo.push(e);
        for (const e of store.present.gaps(first, end)) {
          // Already zeroed blocks stay as they are.
          for (const m of store.dirty.gaps(e.start, e.start + e.count)) todo.push(m);
        }
        todo.sort((a, b) => a.start - b.start);
        await this.#withMetadataRoom(() => store.zero(todo));
      } finally {
        release();
      }
    } finally {
      this.#writes.delete(range);
    }
  }

  /** Resolves once no write past its checks touches [first, end). */
  async #writingDone(first: number, end: number): Promise<void> {
    for (;;) {
      let busy = false;
      for (const [f, e] of this.#writing) if (f < end && e > first) busy = true;
      if (!busy) return;
      await new Promise<void>((resolve) => this.#writingWaiters.push(resolve));
    }
  }

  #wakeWritingWaiters(): void {
    if (this.#writingWaiters.length === 0) return;
    const waiters = this.#writingWaiters;
    this.#writingWaiters = [];
    for (const w of waiters) w();
  }

  /**
   * Group commit of dirty intents (rule 3). Writes prepared in the same turn of the event loop (an
   * NBD client's queued requests arrive in one socket read) go to the store together, and the
   * store records everything that arrives while one round's WAL fsync runs in the next round, as
   * one transaction and one fsync (store.markDirtyDurable): the event loop never waits for the
   * disk, and a busy queue costs one fsync per round, not per write. A block already on its way
   * waits for the intent that carries it.
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
        // Only blocks still present and clean: one zeroed meanwhile is no longer clean data to
        // protect, and the write looks at it again. Eviction and zeroing leave blocks alone while
        // their intent is in #intents, so none turns into a hole before the record is durable.
        const store = this.store;
        // gather: these writers, answered, come back with more first writes; the store's next
        // round may wait for them (CacheStore.markDirtyDurable).
        await this.#withMetadataRoom(() => store.markDirtyDurable(toExtents(sorted.filter((b) => store.present.get(b) && !store.dirty.get(b) && !this.#busyAt(b))), { gather: true }));
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

  // --- the budget ----------------------------------------------------------------------------

  /** Reserves `blocks` blocks of cache space, waiting for room as long as it takes. */
  async #reserve(blocks: number): Promise<void> {
    while (!this.store.reserve(blocks)) await this.#makeRoom(blocks);
  }

  /**
   * Returns when `blocks` more blocks may fit (the caller tries to reserve them again): evicts
   * clean units; commits staged blocks so they can be evicted; waits for a running flush; and when
   * nothing else frees room, asks onSpacePressure for a flush. Throws CacheFullError when no flush
   * can help.
   */
  async #makeRoom(blocks: number): Promise<void> {
    const store = this.store;
    if (blocks > store.budgetBlocks) {
      throw new CacheFullError(`a request of ${blocks} blocks is larger than the whole cache budget of ${store.budgetBlocks} blocks`);
    }
    this.spaceWaiters++;
    try {
      let futile = 0;
      for (;;) {
        if (store.usedBlocks + blocks <= store.budgetBlocks) return;
        if (this.#evicting) {
          // Another request's eviction is running: what it frees may be enough. Sized after it
          // ends, not now, or every waiter evicts its own share on top (the cache ran half empty).
          await this.#evicting.catch(() => undefined);
          continue;
        }
        const headroom = this.#evictionBatch();
        // After a flush freed nothing: a kernel frontend's blocks kept for requests still
        // preparing go as well, all but the oldest request's (ULOOP_EVICT_F_PINNED). Requests
        // in flight together can keep every clean block between them, each waiting for room the
        // others keep (review8 K2: 1 MiB reads at depth 32 failed with EIO); the oldest keeps
        // its blocks, gets all it needs and ends, then the next. Not before a flush: the others
        // then fill again what was taken from them.
        const want = store.usedBlocks + blocks - store.budgetBlocks + headroom;
        let freed = await this.evict(want, { pinned: futile > 0 });
        // Nothing dirty: no flush can free anything; the last resort at once (review8 K2's reads).
        if (freed === 0 && futile === 0 && this.externalEpochs?.evict && store.usedBlocks + blocks > store.budgetBlocks && this.dirtyDataBlocks() === 0) {
          freed = await this.evict(want, { pinned: true });
        }
        if (freed > 0 || store.usedBlocks + blocks <= store.budgetBlocks) {
          this.#spaceError = null;
          return;
        }
        const space = store.space();
        if (this.#stagedCount() > 0) {
          // Staged blocks become present at the commit, and so evictable.
          await this.#withMetadataRoom(() => this.#commit.run());
          continue;
        }
        if (space.punchingBlocks > 0 || this.#epoch || this.#committing > 0 || space.reservedBlocks > 0) {
          // Space on its way back (a punch), blocks about to be cleaned (an open or committing epoch) or
          // to become present (fills in flight): wait for the store to say so.
          await store.spaceChange();
          continue;
        }
        // Dirty blocks, not present ones: a budget full of clean blocks is not "full of dirty data".
        const dirtyData = store.dirty.count();
        if (!this.onSpacePressure) {
          this.#spaceError = `the cache budget is full of dirty data (${dirtyData} blocks) and nothing flushes it`;
          throw new CacheFullError(`${this.#spaceError}; attach with a flush policy (--flush, --dirty-max) or run 'ulobdev flush'`);
        }
        this.#spaceError = `the cache budget is full of dirty data (${dirtyData} blocks): waiting for a flush to the disk`;
        try {
          await this.onSpacePressure();
        } catch (err) {
          this.#spaceError = `the cache budget is full of dirty data and the flush failed: ${(err as Error).message}`;
          throw new CacheFullError(`${this.#spaceError}; writes that need new space fail until a flush succeeds`, { cause: err });
        }
        // With a kernel frontend the store may count blocks clean and present that the kernel
        // will not give up (it no longer serves them, or holds them busy): never spin on those.
        // Nor without a clock: nothing is ever evicted then, so no flush can make room.
        if (
          ++futile > MAX_FUTILE_FLUSHES &&
          store.usedBlocks + blocks > store.budgetBlocks &&
          (this.externalEpochs?.evict !== undefined || !store.clock || this.#evictableNone())
        ) {
          const dirtyNow = store.dirty.count();
          this.#spaceError =
            dirtyNow + blocks > store.budgetBlocks / 2
              ? `the cache budget stays full of dirty data (${dirtyNow} blocks): flushes free nothing (every block is rewritten while it flushes)`
              : `the cache budget is held by blocks in use (${dirtyNow} of ${store.budgetBlocks} dirty; the rest busy, or kept for requests being served): neither evictions nor flushes free room`;
          throw new CacheFullError(this.#spaceError);
        }
      }
    } finally {
      this.spaceWaiters--;
    }
  }

  /** Blocks one eviction frees beyond what is asked: 1/32 of the budget, 1 to 64 units. */
  #evictionBatch(): number {
    const store = this.store;
    return Math.min(Math.max(store.unitBlocks, Math.floor(store.budgetBlocks / 32)), 64 * store.unitBlocks);
  }

  /**
   * With less than one eviction batch of the budget free, starts an eviction in the background:
   * its bitmap sync and punch then run while fills still find room, instead of every miss
   * waiting for them in turn (bench/budget.js: evictions one at a time were the whole run).
   */
  #evictAhead(): void {
    const store = this.store;
    if (!store.clock || this.#closed || store.failed) return;
    // Staged fills take budget but cannot be evicted before their commit: with a quarter of the
    // budget staged, commit now rather than at the timer (the clock had only the rest to choose from).
    if (this.#stagedCount() >= store.budgetBlocks / 4) {
      this.#commit.run().catch(() => {
        // A failed store: the next request reports it.
      });
    }
    if (this.#evicting) return;
    const batch = this.#evictionBatch();
    const want = store.usedBlocks + batch - store.budgetBlocks;
    if (want <= 0) return;
    this.evict(want).catch(() => {
      // A failed store: the next request reports it.
    });
  }

  #evictableNone(): boolean {
    const store = this.store;
    for (const e of store.present.runs()) if (store.dirty.nextClear(e.start, e.start + e.count) < e.start + e.count) return false;
    return true;
  }

  /**
   * Runs `write` (a metadata write: a dirty intent, a zeroing, a commit) and, while the metadata's
   * filesystem is full (MetadataFullError: the transaction rolled back, nothing changed), gives
   * clean blocks back to that filesystem and runs it again, up to 3 times. With nothing clean to
   * give back: a request (`mode` 'request') waits for a `room` flush (#flushForRoom: the flash
   * reserve released for the flush's own commit, then the blocks it cleaned evicted) when one can
   * help, up to MAX_ROOM_FLUSHES times; the flush's own writes (`mode` 'flush': beginEpoch's
   * commit) release the flash reserve instead, never waiting for a flush (they are one); a kernel
   * frontend's BARRIER record (`mode` 'kernel') only evicts, as the flush may wait for it, and
   * starts a room flush for the next ones (its INTENTs are requests: recordDirty). Throws
   * the MetadataFullError (a CacheFullError: the request fails with ENOSPC, alone) when nothing
   * can be freed, CacheFullError when the `room` flush failed; `spaceError` then says so, with the
   * count of requests failed.
   */
  async #withMetadataRoom<T>(write: () => Promise<T>, mode: 'request' | 'flush' | 'kernel' = 'request'): Promise<T> {
    let flushes = 0;
    let onReserve = false;
    for (let attempt = 0; ; attempt++) {
      // The room a `room` flush runs on (the released reserve) is the flush's: wait for it to end.
      if (mode === 'request') await this.#afterRoomFlush();
      try {
        const result = await write();
        // Room taken from the reserve is no room come back.
        if (!onReserve && (attempt > 0 || this.#metadataFullFailures > 0)) this.#metadataRoomBack();
        return result;
      } catch (err) {
        if (!(err instanceof MetadataFullError)) throw err;
        if (attempt >= 3 + flushes) throw this.#metadataFailed(err);
        if (await this.#metadataEvict(err)) continue;
        if (mode === 'flush') {
          if (await this.#releaseReserve()) {
            onReserve = true;
            continue;
          }
        } else if (mode === 'request' && flushes < MAX_ROOM_FLUSHES && this.#roomFlushCanHelp()) {
          flushes++;
          await this.#waitRoomFlush(err.path);
          continue;
        } else if (mode === 'kernel' && this.#roomFlushCanHelp()) {
          // This request fails (it may be what the flush waits for), but a room flush starts so
          // that the next ones find room (review11 R-5).
          this.#startRoomFlush(err.path).catch(() => undefined);
        }
        throw this.#metadataFailed(err);
      }
    }
  }

  /**
   * The metadata could not be written for want of room: evicts clean blocks (their space goes
   * back to the flash filesystem by the punch). Resolves true if it freed any. Only evicts: it may
   * run inside the commit, which a flush or another commit would wait for.
   */
  async #metadataEvict(err: MetadataFullError): Promise<boolean> {
    const store = this.store;
    if (!store.clock || this.#closed || store.failed) return false;
    const freed = await this.evict(this.#flashWant(0)).catch(() => 0);
    if (freed > 0) this.#flashRanFull(err.path, freed);
    return freed > 0;
  }

  /** A request failed for want of metadata room: counts it, says why in `spaceError`, returns the error to throw. */
  #metadataFailed(err: MetadataFullError): MetadataFullError {
    this.#metadataFullFailures++;
    this.#spaceError =
      `the flash filesystem is full: ${this.#metadataFullFailures} requests failed; free space on it ` +
      `(${err.path} cannot grow${this.store.clock ? ' and the cache holds no clean block to give back' : ''})`;
    return new MetadataFullError(`${err.message} (the cache holds no clean block to give back; this request failed, the others go on)`, { cause: err, path: err.path });
  }

  /** The flush's own metadata write found the flash full: releases the flash reserve. Resolves true if that freed room. */
  async #releaseReserve(): Promise<boolean> {
    return ((await this.store.flashReserve?.release()) ?? 0) > 0;
  }

  /** A `room` flush can free room: a flush runs on request, a clock can evict what it cleans, and some dirty block holds data. */
  #roomFlushCanHelp(): boolean {
    return this.onSpacePressure !== null && this.store.clock !== null && !this.#closed && this.dirtyDataBlocks() > 0;
  }

  /**
   * Resolves once no `room` flush runs (its outcome is the waiting requests' business, not this
   * caller's). Throws CacheFullError after roomFlushWaitMs (review11 R-3: the bound is every
   * waiter's, not only the request's that started the flush).
   */
  async #afterRoomFlush(): Promise<void> {
    const until = Date.now() + this.#roomFlushWaitMs;
    while (this.#roomFlush) {
      await this.#raceRoomFlush(
        this.#roomFlush.catch(() => undefined),
        until,
        () => new CacheFullError(`waited ${this.#roomFlushWaitMs / 1000} s for the flush that makes room on the full flash filesystem; free space on it`),
      );
    }
  }

  /**
   * A request waits for the `room` flush (starting it if none runs), at most roomFlushWaitMs.
   * Throws CacheFullError (counted, in `spaceError`) when it failed: the flush cannot help (the
   * disk is gone, the daemon detaches), or took too long.
   */
  async #waitRoomFlush(path: string | undefined): Promise<void> {
    await this.#raceRoomFlush(this.#startRoomFlush(path), Date.now() + this.#roomFlushWaitMs, () => {
      this.#spaceError = `the flash filesystem of ${path} is full and the flush that would free room has run ${this.#roomFlushWaitMs / 1000} s: requests that need room fail until it ends`;
      return new CacheFullError(`waited ${this.#roomFlushWaitMs / 1000} s for the flush that makes room on the full flash filesystem of ${path}; free space on it`);
    });
  }

  /** The `room` flush running now, or a new one (#flushForRoom) for `path`; #roomFlush until it settles. */
  #startRoomFlush(path: string | undefined): Promise<void> {
    return (this.#roomFlush ??= this.#flushForRoom(path).finally(() => (this.#roomFlush = null)));
  }

  /**
   * Waits for `flush` (counted in roomWaiters) until Date.now() reaches `until`, then throws what
   * `late` returns; rethrows the flush's own failure.
   */
  async #raceRoomFlush(flush: Promise<void>, until: number, late: () => Error): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(late()), Math.max(0, until - Date.now()))));
    this.#roomFlushWaiters++;
    try {
      await Promise.race([flush, timeout]);
    } finally {
      clearTimeout(timer);
      this.#roomFlushWaiters--;
    }
  }

  /**
   * The `room` flush: the flash filesystem (`path` ran full) is full and the cache holds no clean
   * block to give back, only dirty ones. Releases the flash reserve (room for the flush's
   * metadata: its history row, its commit), flushes through onSpacePressure('room'), evicts what
   * it cleaned (enough for the reserve and the waiting request) and takes the reserve back.
   * Throws CacheFullError when the flush failed.
   */
  async #flushForRoom(path: string | undefined): Promise<void> {
    const store = this.store;
    const bs = this.geometry.blockSize;
    this.#roomFlushes++;
    this.#spaceError =
      `the flash filesystem of ${path} is full and the cache holds only dirty blocks (${formatBytes(this.dirtyDataBlocks() * bs)}): ` +
      `flushing them to the disk (reason room) on the flash reserve; writes that need room wait`;
    await store.flashReserve?.release();
    try {
      await this.onSpacePressure!('room');
    } catch (err) {
      // The reserve's room, not used by the flush, goes back to the reserve, not to the writes.
      await store.flashReserve?.take();
      this.#spaceError = `the flash filesystem of ${path} is full, the cache holds only dirty blocks, and the flush that would free room failed: ${(err as Error).message}`;
      throw new CacheFullError(`${this.#spaceError}; free space on it, or bring the disk back`, { cause: err });
    }
    const reserveBlocks = Math.ceil((store.flashReserve?.bytes ?? 0) / bs);
    const freed = store.clock && !this.#closed ? await this.evict(this.#flashWant(reserveBlocks)).catch(() => 0) : 0;
    const whole = (await store.flashReserve?.take()) ?? true;
    this.#spaceError =
      `the flash filesystem of ${path} ran full with only dirty blocks cached: flushed them to the disk (reason room) and evicted ${formatBytes(freed * bs)}` +
      (whole ? '' : '; the flash reserve is not back yet (no room for it): free space on it');
  }

  /** Counts a request that failed for want of room (status failedRequests) and rethrows `err`. */
  #failed(err: unknown): never {
    if (err instanceof CacheFullError) this.#failedRequests++;
    throw err;
  }

  /**
   * Takes the flash reserve back where it lacks room (released for a flush, or the filesystem
   * was full at open): as it is, else after evicting clean blocks worth what it lacks. Never throws.
   */
  async #retakeReserve(): Promise<void> {
    const reserve = this.store.flashReserve;
    if (!reserve || reserve.heldBytes >= reserve.bytes || this.#closed || this.#roomFlush) return;
    if (await reserve.take()) return;
    if (!this.store.clock || this.#closed || this.store.failed) return;
    await this.evict(Math.ceil((reserve.bytes - reserve.heldBytes) / this.geometry.blockSize)).catch(() => 0);
    await reserve.take();
  }

  /** A metadata write went through after the filesystem was full: say it has room again. */
  #metadataRoomBack(): void {
    void this.#retakeReserve();
    if (this.#spaceError?.startsWith('the flash filesystem is full')) {
      // Room the released flash reserve left is no room come back.
      const reserve = this.store.flashReserve;
      this.#spaceError =
        reserve && reserve.heldBytes < reserve.bytes
          ? `the flash filesystem is full: ${this.#metadataFullFailures} requests failed; free space on it (the flash reserve is in use: ${formatBytes(reserve.heldBytes)} of ${formatBytes(reserve.bytes)} held)`
          : `the flash filesystem was full (${this.#metadataFullFailures} requests failed) and has room again`;
    }
  }

  /**
   * The flash filesystem said ENOSPC (another program filled it): evict clean blocks whatever the
   * budget says, or flush to make some clean; CacheFullError if nothing can be freed.
   */
  async #relieveFlash(blocks: number): Promise<void> {
    const store = this.store;
    if (!store.clock) {
      throw new CacheFullError(`the filesystem of ${store.paths.cache} is full, though the cache file was preallocated; free some space on it`);
    }
    const want = this.#flashWant(blocks);
    let freed = await this.evict(want);
    if (freed === 0 && this.#stagedCount() > 0) {
      // Staged blocks become present (evictable) at the commit, which needs metadata room itself.
      await this.#withMetadataRoom(() => this.#commit.run());
      freed = await this.evict(want);
    }
    if (freed === 0 && this.#roomFlush) {
      // A `room` flush is running: what it cleans and evicts may be enough.
      await this.#afterRoomFlush();
      return;
    }
    if (freed === 0 && this.#roomFlushCanHelp()) {
      // Only dirty blocks: flush them on the flash reserve (their commit needs room too), then
      // the flush evicts what it cleaned. Throws CacheFullError when the flush failed.
      await this.#waitRoomFlush(store.paths.cache);
      return;
    }
    if (freed === 0) {
      this.#spaceError = `the filesystem of ${store.paths.cache} is full and the cache holds no clean block to give back`;
      throw new CacheFullError(`${this.#spaceError}; free some space on it`);
    }
    this.#flashRanFull(store.paths.cache, freed);
  }

  /** Blocks to evict when the flash filesystem is full: `blocks`, at least a unit and 1/16 of what the cache holds. */
  #flashWant(blocks: number): number {
    const store = this.store;
    return Math.max(blocks, store.unitBlocks, Math.floor(store.usedBlocks / 16));
  }

  /** spaceError after clean blocks were given back to a full flash filesystem (`path`: the file that hit it). */
  #flashRanFull(path: string | undefined, freed: number): void {
    this.#spaceError = `the filesystem of ${path} ran full (another program filled it): evicted ${formatBytes(freed * this.geometry.blockSize)}`;
  }

  /** Writes the cache file for a fill or a materialisation, making room on ENOSPC. */
  async #writeCache(buf: Buffer, offset: number): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      try {
        await this.store.writeData(buf, offset);
        return;
      } catch (err) {
        if (!isNoSpace(err) || attempt >= 3) throw err;
      }
      await this.#relieveFlash(Math.ceil(buf.byteLength / this.geometry.blockSize));
    }
  }

  /**
   * Copies the source's bytes at `offset` into the cache file there: one request to the I/O
   * threads where the source can (store.fillFrom), read and write otherwise. Makes room on
   * ENOSPC and tries again (the read is repeated: the buffer may hold a partial copy).
   */
  async #fillCache(buf: Buffer, offset: number): Promise<void> {
    if (!this.source.copyInto) {
      await this.source.readAt(buf, offset);
      // A small fill (a miss granule: an HTTP image's) goes into the cache file in this turn where
      // the file can take it cheaply (store.writeDataNow: a buffered pwrite of up to 64 KiB on the
      // event loop, as rewrites of dirty blocks do), so the read waiting for it is answered without
      // a threadpool hand-off (bench/README.md, "Session 13"). Not durable until the commit's
      // sync, as writeData's bytes. Declined (large, slow, or a file without writeNow): as before.
      if (!this.store.writeDataNow(buf, offset)) await this.#writeCache(buf, offset);
      return;
    }
    for (let attempt = 0; ; attempt++) {
      try {
        await this.store.fillFrom(this.source, buf, offset);
        return;
      } catch (err) {
        if (!isNoSpace(err) || attempt >= 3) throw err;
      }
      await this.#relieveFlash(Math.ceil(buf.byteLength / this.geometry.blockSize));
    }
  }

  /** #fillCache() of `length` bytes (more than buf holds) as one stream through buf (store.fillStream). */
  async #streamCache(buf: Buffer, offset: number, length: number): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      try {
        await this.store.fillStream(this.source, buf, offset, length);
        return;
      } catch (err) {
        if (!isNoSpace(err) || attempt >= 3) throw err;
      }
      await this.#relieveFlash(Math.ceil(length / this.geometry.blockSize));
    }
  }

  /** One eviction: units the clock picks, their clean idle blocks locked, evicted, unlocked. */
  async #evictUnits(blocks: number, chosen = new Set<number>(), pinned = false): Promise<number> {
    const store = this.store;
    const clock = store.clock;
    if (!clock || blocks <= 0) return 0;
    // The kernel's accessed bits (hits it served) count as the hand passes.
    this.externalEpochs?.harvestAccessed?.();
    const unitBlocks = store.unitBlocks;
    const victimsOf = (u: number): Extent[] => {
      const out: Extent[] = [];
      for (const e of store.cleanBlocksOf(u)) {
        let run: Extent | null = null;
        for (let b = e.start; b < e.start + e.count; b++) {
          if (this.#busyAt(b) || this.#pins.has(b) || this.#intents.has(b)) run = null;
          else if (run && run.start + run.count === b) run.count++;
          else out.push((run = { start: b, count: 1 }));
        }
      }
      return out;
    };
    // Units hold only the granules that were missed in them: pick until their clean blocks cover
    // `blocks` (one unit's worth per unit asked would free a fraction, and the bitmap sync each
    // eviction costs would be paid that many more times).
    const units: number[] = [];
    const victims: Extent[] = [];
    let covered = 0;
    while (covered < blocks) {
      const more = clock.pick(
        Math.ceil((blocks - covered) / unitBlocks),
        (u) => store.nextUnitWithData(u),
        (u) => !chosen.has(u) && victimsOf(u).length > 0,
      );
      if (more.length === 0) break;
      for (const u of more) {
        chosen.add(u);
        units.push(u);
        for (const e of victimsOf(u)) {
          victims.push(e);
          covered += e.count;
        }
      }
    }
    if (victims.length === 0) return 0;
    const locked: number[] = [];
    for (const e of victims) for (let b = e.start; b < e.start + e.count; b++) locked.push(b);
    const release = this.#lock(locked);
    let evicted = locked.length;
    const outside = this.externalEpochs?.evict;
    let gone: Extent[] = [];
    try {
      // A kernel frontend serves hits itself: it stops serving them first (and drains its
      // requests on them), and only what it let go is evicted here (invariant 1).
      gone = outside ? outside(victims, pinned) : victims;
      if (outside) evicted = gone.reduce((n, e) => n + e.count, 0);
      // Present bits clear now (new reads see missing blocks and wait for the lock); the punch
      // waits for reads that began before (the grace period) and for the synced bitmap.
      if (gone.length > 0) await store.evict(gone, { quiesce: () => this.#readGrace() });
    } finally {
      this.externalEpochs?.evicted?.(gone);
      release();
    }
    for (const u of units) clock.forget(u);
    this.#evicted += evicted;
    // A kernel frontend kept some (busy, or in a request still preparing: a fill for it would be
    // undone): other units, not these again, for the rest.
    if (this.externalEpochs?.evict && evicted < locked.length && evicted < blocks) return evicted + (await this.#evictUnits(blocks - evicted, chosen, pinned));
    return evicted;
  }

  // --- commit --------------------------------------------------------------------------------

  /** Syncs the cache file, then records staged blocks as present (fills) or dirty (writes). */
  async #commitStaged(): Promise<void> {
    this.#cancelAutoCommit();
    // Per-block work here is a hydration's main-thread cost: it stages every block of the disk
    // between two commits (65,536 per 256 MiB). A typed array filled by hand (Float64Array.from
    // of an iterator is twice as slow) sorts numerically without a comparator call per step.
    const staged = this.#staged;
    const blocks = new Float64Array(staged.size);
    let i = 0;
    for (const b of staged.keys()) blocks[i++] = b;
    blocks.sort();
    // Long fills' runs staged so far are this commit's; runs staged during the sync wait for the
    // next one. (Runs left by a commit whose sync failed stay in #committingRuns: the store is
    // failed then, and recoverSyncError drops them.)
    for (const e of this.#stagedRuns.extents()) this.#committingRuns.add(e.start, e.start + e.count);
    this.#stagedRuns.clear();
    // For tests only (ULOBDEV_PAUSE_FILE): hold fills answered and not recorded, as a daemon
    // killed before this commit leaves them (test/vm/uloop-budget.test.ts). Unset, no await.
    if (process.env.ULOBDEV_PAUSE_FILE) await pausePoint('engine:commit-staged');
    await this.store.syncData();
    // The runs as they are after the sync: a block written meanwhile left them (#stageDirty).
    const runs = this.#committingRuns.extents();
    const runBlocks = this.#committingRuns.blocks;
    this.#committingRuns.clear();
    this.store.markPresent(runs);
    this.store.release(runBlocks);
    // Decided after the sync: a fill rewritten meanwhile must be recorded dirty, not clean.
    const clean: number[] = [];
    const dirty: number[] = [];
    let stagedClean = 0;
    for (let j = 0; j < blocks.length; j++) {
      const b = blocks[j]!;
      const state = staged.get(b);
      if (state === STAGED_DIRTY) dirty.push(b);
      else {
        clean.push(b);
        if (state !== undefined) stagedClean++;
      }
    }
    this.store.markPresent(toExtents(clean));
    // When every block still staged is one of these clean ones (as many of them are staged as the
    // map holds): one clear() instead of a delete per block. Otherwise fills staged during the
    // sync stay, for the next commit.
    if (stagedClean === staged.size) staged.clear();
    else for (const b of clean) staged.delete(b);
    // Their reservations are now present blocks (and evictable).
    this.store.release(clean.length);
    // The dirty ones stay staged (readable, writable without an intent, reserved) until their
    // record is durable; its fsync runs off the event loop (store.markDirtyDurable).
    await this.store.markDirtyDurable(toExtents(dirty));
    for (const b of dirty) this.#staged.delete(b);
    this.store.release(dirty.length);
    if (blocks.length > 0 || runBlocks > 0) await this.store.persistBitmap(false);
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

  /** Blocks [first, end) are being written or zeroed: they stay dirty after the open or closing epoch. */
  #markRewritten(first: number, end: number): void {
    this.#epoch?.markRewritten(first, end);
    this.#closing?.markRewritten(first, end);
  }

  #pin(first: number, end: number): void {
    for (let b = first; b < end; b++) this.#pins.set(b, (this.#pins.get(b) ?? 0) + 1);
  }

  #unpin(first: number, end: number): void {
    for (let b = first; b < end; b++) {
      const n = this.#pins.get(b)! - 1;
      if (n === 0) this.#pins.delete(b);
      else this.#pins.set(b, n);
    }
  }

  /** Dirty and not present: reads as zeros. */
  #isZeroed(b: number): boolean {
    return this.store.dirty.get(b) && !this.store.present.get(b) && !this.#isStaged(b);
  }

  /** Staged (readable from the cache file, not yet present): in #staged or in a run. */
  #isStaged(b: number): boolean {
    return (this.#staged.size > 0 && this.#staged.has(b)) || this.#stagedRuns.has(b) || this.#committingRuns.has(b);
  }

  #stagedCount(): number {
    return this.#staged.size + this.#stagedRuns.blocks + this.#committingRuns.blocks;
  }

  /** A staged clean block (a fill) is being written: staged dirty from now on (in #staged). */
  #stageDirty(b: number): void {
    if (this.#staged.size > 0 && this.#staged.get(b) === STAGED_CLEAN) this.#staged.set(b, STAGED_DIRTY);
    else if (this.#stagedRuns.delete(b) || this.#committingRuns.delete(b)) {
      // Out of a run: a commit already past its snapshot leaves it for the next one.
      this.#staged.set(b, STAGED_DIRTY);
      this.#scheduleCommit();
    }
  }

  /** What block `b` waits for: a lock by block (#lock) or by range (#lockRange), or undefined. */
  #busyAt(b: number): Promise<void> | undefined {
    const busy = this.#busy.size > 0 ? this.#busy.get(b) : undefined;
    if (busy || this.#rangeLocks.length === 0) return busy;
    for (const l of this.#rangeLocks) if (b >= l.start && b < l.end) return l.done;
    return undefined;
  }

  /** #lock() of blocks [start, end) as one range, for long fills. */
  #lockRange(start: number, end: number): () => void {
    let release!: () => void;
    const done = new Promise<void>((resolve) => (release = resolve));
    const lock = { start, end, done };
    this.#rangeLocks.push(lock);
    return () => {
      const i = this.#rangeLocks.indexOf(lock);
      if (i >= 0) this.#rangeLocks.splice(i, 1);
      release();
    };
  }

  #lock(blocks: readonly number[]): () => void {
    let release!: () => void;
    const done = new Promise<void>((resolve) => (release = resolve));
    for (const b of blocks) this.#busy.set(b, done);
    return () => {
      for (const b of blocks) if (this.#busy.get(b) === done) this.#busy.delete(b);
      release();
    };
  }

  /** The open epoch, which `epoch` must be. Throws EngineClosedError otherwise. */
  #openEpoch(epoch: Epoch): FlushEpoch {
    this.#assertOpen();
    const open = this.#epoch;
    if (!open || open !== epoch) throw new EngineClosedError(`flush epoch ${epoch.id} is not the open epoch`);
    return open;
  }

  #takeEpoch(epoch: Epoch): FlushEpoch {
    const open = this.#openEpoch(epoch);
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

const NO_RELEASE = (): void => undefined;

function isNoSpace(err: unknown): boolean {
  const code = (err as { code?: string })?.code;
  return code === 'ENOSPC' || code === 'EDQUOT';
}

/** Extents (any order, may overlap or touch) as sorted, disjoint ones. */
function mergeExtents(extents: readonly Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of [...extents].sort((a, b) => a.start - b.start)) {
    const last = out[out.length - 1];
    if (last && last.start + last.count >= e.start) last.count = Math.max(last.count, e.start + e.count - last.start);
    else if (e.count > 0) out.push({ start: e.start, count: e.count });
  }
  return out;
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
