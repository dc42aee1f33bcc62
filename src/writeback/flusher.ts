// One flush = one epoch: snapshot the dirty blocks, write them to the backing disk sorted by offset
// and coalesced into large writes, sync the disk, then clear what was flushed (engine.commitEpoch
// syncs the source before clearing: invariant 4). Each piece is the epoch's version of its blocks
// (engine.readEpoch): blocks rewritten during the flush reach the disk as they were at the
// snapshot, so a completed flush leaves the disk a point-in-time image (docs/design.md). Blocks
// zeroed at the snapshot go to the disk as zeros (source.zeroAt: BLKZEROOUT or a punched hole where
// the disk or image can, written zeros otherwise), never read from the cache.
import type { CacheEngine } from '../cache/engine.js';
import { isWritable, type WritableSource } from '../source/source.js';
import { FlushStoppedError, ReadOnlyError } from '../errors.js';
import { formatBytes } from '../units.js';
import { BufferPool } from '../storage/buffer-pool.js';
import { crashPoint, pausePoint } from '../sys.js';

export interface FlushProgress {
  epoch: number;
  doneBytes: number;
  totalBytes: number;
}

export interface FlushOptions {
  /** Largest single write to the backing disk, and the size of each copy buffer. */
  maxIoBytes?: number;
  /**
   * Copy buffers in flight: each is being read from the cache or written to the disk, so reads of
   * the cache overlap writes to the disk and the disk has several writes queued.
   */
  depth?: number;
  /** Called after each piece reaches the disk (not yet synced). */
  onProgress?: (progress: FlushProgress) => void;
  /** Called once the epoch is taken, before anything is written. */
  onStart?: (progress: FlushProgress) => void;
  /**
   * Stops the flush before its next batch (the stop deadline): the epoch is aborted, so every
   * block stays dirty, and flushDirty rejects with FlushStoppedError.
   */
  signal?: AbortSignal;
}

export interface FlushResult {
  epoch: number;
  /** Blocks written back. */
  blocks: number;
  bytes: number;
  /** Blocks now clean. */
  cleaned: number;
  /** Blocks rewritten during the flush: still dirty, for the next epoch. */
  kept: number;
}

const DEFAULT_MAX_IO = 4 << 20;
const DEFAULT_DEPTH = 4;
/** Copy buffers outlive a flush by this long, so back-to-back flushes reuse them. */
const POOL_IDLE_MS = 30_000;

/** Copy buffers by size, kept between flushes and dropped after POOL_IDLE_MS without one. */
const pools = new Map<number, { pool: BufferPool; users: number; timer: NodeJS.Timeout | null }>();

function takePool(bytes: number, keep: number): BufferPool {
  let entry = pools.get(bytes);
  if (!entry) pools.set(bytes, (entry = { pool: new BufferPool(bytes, keep), users: 0, timer: null }));
  if (entry.timer) clearTimeout(entry.timer);
  entry.timer = null;
  entry.users++;
  return entry.pool;
}

function givePool(bytes: number): void {
  const entry = pools.get(bytes)!;
  if (--entry.users > 0) return;
  entry.timer = setTimeout(() => pools.delete(bytes), POOL_IDLE_MS);
  entry.timer.unref();
}

/**
 * Pieces per batch at most: small enough that the reads of the next batch overlap the writes of
 * this one, large enough that scattered blocks cost few requests.
 */
const MAX_BATCH_PIECES = 256;

/**
 * Pieces (runs of blocks, each one write) that share one copy buffer, in disk order; or, `zero`,
 * runs of zeroed blocks that go to the disk as zeros and need no buffer.
 */
interface Batch {
  /** [first block, blocks, byte offset in the buffer] */
  pieces: Array<[number, number, number]>;
  bytes: number;
  zero?: boolean;
}

/**
 * Writes the dirty blocks of one new flush epoch back to the source and commits the epoch.
 *
 * The epoch's extents, sorted by block and cut into pieces of at most `maxIoBytes`, are copied in
 * batches: one batch is one large piece, or as many consecutive small pieces (scattered dirty
 * blocks) as fit in one buffer. Up to `depth` batches are in flight, each in its own reused,
 * aligned buffer (no allocation per piece; O_DIRECT sources need no bounce copy): while some are
 * read from the cache, others are being written. Writes are issued in disk order, so the disk sees
 * one ascending pass. Throws ReadOnlyError for a source that cannot be written, and whatever a
 * read, write or sync threw (the epoch is then aborted: every block stays dirty).
 */
export async function flushDirty(engine: CacheEngine, options: FlushOptions = {}): Promise<FlushResult> {
  const source = engine.source;
  if (!isWritable(source)) throw new ReadOnlyError(`${source.description} was opened read-only; cannot write back`);
  const g = engine.geometry;
  const maxBlocks = Math.max(1, Math.floor((options.maxIoBytes ?? DEFAULT_MAX_IO) / g.blockSize));
  const depth = Math.max(1, options.depth ?? DEFAULT_DEPTH);
  const epoch = await engine.beginEpoch();
  // Extents come sorted and maximal from the bitmap: one sequential pass over the disk.
  const bufferBytes = maxBlocks * g.blockSize;
  const batches: Batch[] = [];
  let batch: Batch = { pieces: [], bytes: 0 };
  let totalBytes = 0;
  for (const extent of epoch.extents) {
    const end = extent.start + extent.count;
    for (let start = extent.start; start < end; ) {
      // A run of blocks of one kind (data or zeroed), at most maxBlocks.
      const zero = epoch.isZero(start);
      let stop = start + 1;
      while (stop < end && stop - start < maxBlocks && epoch.isZero(stop) === zero) stop++;
      const count = stop - start;
      const bytes = g.extentBytes(start, count);
      if (zero) {
        if (batch.pieces.length > 0) batches.push(batch);
        batches.push({ pieces: [[start, count, 0]], bytes, zero: true });
        batch = { pieces: [], bytes: 0 };
        totalBytes += bytes;
        start = stop;
        continue;
      }
      if (batch.bytes + bytes > bufferBytes || batch.pieces.length === MAX_BATCH_PIECES) {
        batches.push(batch);
        batch = { pieces: [], bytes: 0 };
      }
      batch.pieces.push([start, count, batch.bytes]);
      batch.bytes += bytes;
      totalBytes += bytes;
      start = stop;
    }
  }
  if (batch.pieces.length > 0) batches.push(batch);
  const progress: FlushProgress = { epoch: epoch.id, doneBytes: 0, totalBytes };
  options.onStart?.({ ...progress });
  // One buffer per batch in flight; a flush smaller than one buffer needs no more than it.
  const poolBytes = Math.min(bufferBytes, Math.ceil(totalBytes / 4096) * 4096 || 4096);
  const pool = takePool(poolBytes, depth);
  let failure: { err: unknown } | null = null;

  /**
   * Copies one batch: `read` settles when its cache reads are done or handed to the I/O threads
   * (one request with the disk write, engine.copyEpochOut), `done` when it is on the disk (not
   * synced) or failed.
   */
  const copy = (b: Batch) => {
    if (b.zero) {
      const [start, count] = b.pieces[0]!;
      const done = writeZeros(source, g.blockOffset(start), g.extentBytes(start, count)).then(() => {
        progress.doneBytes += b.bytes;
        options.onProgress?.({ ...progress });
      });
      return { read: Promise.resolve(), done };
    }
    const buf = pool.take();
    let readDone!: () => void;
    const read = new Promise<void>((resolve) => (readDone = resolve));
    // Scattered blocks go down in one request where the source can take it.
    const write = async (pieces: ReadonlyArray<readonly [number, number, number]>) => {
      const pending =
        pieces.length > 1 && source.writeMany
          ? [source.writeMany(buf, pieces.map(([start, count, at]) => [at, g.extentBytes(start, count), g.blockOffset(start)] as const))]
          : pieces.map(([start, count, at]) => source.writeAt(buf.subarray(at, at + g.extentBytes(start, count)), g.blockOffset(start)));
      const writes = await Promise.allSettled(pending);
      for (const w of writes) if (w.status === 'rejected') throw w.reason;
    };
    const done = (async () => {
      try {
        await engine.copyEpochOut(epoch, buf, b.pieces, write, readDone);
        // kill -9 with part of a flush on the disk, not synced (test/integration/disk-changed.test.ts).
        crashPoint('flush:wrote');
        progress.doneBytes += b.bytes;
        options.onProgress?.({ ...progress });
      } finally {
        readDone();
        // copyEpochOut has waited for every transfer of this buffer: reusable.
        pool.give(buf);
      }
    })();
    return { read, done };
  };

  try {
    // Race tests hold the copy here, its epoch begun (test/vm/uloop-pit.test.ts): writes meanwhile
    // must keep the epoch's version aside. A no-op unless $ULOBDEV_PAUSE_FILE names this point.
    await pausePoint('flush:copy');
    const running = new Set<Promise<void>>();
    for (const b of batches) {
      while (running.size >= depth && !failure) await Promise.race(running);
      if (failure) break;
      if (options.signal?.aborted) {
        failure ??= { err: new FlushStoppedError(`flush stopped after ${formatBytes(progress.doneBytes)} of ${formatBytes(totalBytes)}; every block stays dirty for the next flush`) };
        break;
      }
      const { read, done } = copy(b);
      const task: Promise<void> = done
        .catch((err: unknown) => {
          failure ??= { err };
        })
        .finally(() => running.delete(task));
      running.add(task);
      // The next batch starts only once this one's reads are done (or handed with its write to the
      // I/O threads, which take jobs in order): the disk gets the writes in ascending order, and
      // the reads of the next batch overlap the writes of this one.
      await read;
    }
    await Promise.all(running);
    if (failure) throw (failure as { err: unknown }).err;
    const { cleaned, kept } = await engine.commitEpoch(epoch);
    return { epoch: epoch.id, blocks: epoch.blocks, bytes: progress.doneBytes, cleaned, kept };
  } catch (err) {
    engine.abortEpoch(epoch);
    throw err;
  } finally {
    givePool(poolBytes);
  }
}

const ZEROS = Buffer.alloc(1 << 20);

/** Zeros to the disk: the source's own zeroing if it has one, else written zero buffers. */
async function writeZeros(source: WritableSource, offset: number, bytes: number): Promise<void> {
  if (source.zeroAt) {
    await source.zeroAt(offset, bytes);
    return;
  }
  for (let done = 0; done < bytes; done += ZEROS.byteLength) {
    await source.writeAt(ZEROS.subarray(0, Math.min(ZEROS.byteLength, bytes - done)), offset + done);
  }
}
