// One flush = one epoch: snapshot the dirty blocks, write them to the backing disk sorted by offset
// and coalesced into large writes, sync the disk, then clear what was flushed (engine.commitEpoch
// syncs the source before clearing: invariant 4). Each piece is the epoch's version of its blocks
// (engine.readEpoch): blocks rewritten during the flush reach the disk as they were at the
// snapshot, so a completed flush leaves the disk a point-in-time image (docs/design.md). Blocks
// zeroed at the snapshot go to the disk as zeros (source.zeroAt: BLKZEROOUT or a punched hole where
// the disk or image can, written zeros otherwise), never read from the cache.
import type { CacheEngine } from '../cache/engine.js';
import { isWritable, type WritableSource } from '../source/source.js';
import { ReadOnlyError } from '../errors.js';

export interface FlushProgress {
  epoch: number;
  doneBytes: number;
  totalBytes: number;
}

export interface FlushOptions {
  /** Largest single write to the backing disk. */
  maxIoBytes?: number;
  /** Called after each piece reaches the disk (not yet synced). */
  onProgress?: (progress: FlushProgress) => void;
  /** Called once the epoch is taken, before anything is written. */
  onStart?: (progress: FlushProgress) => void;
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

interface Piece {
  start: number;
  count: number;
  zero: boolean;
}

export async function flushDirty(engine: CacheEngine, options: FlushOptions = {}): Promise<FlushResult> {
  const source = engine.source;
  if (!isWritable(source)) throw new ReadOnlyError(`${source.description} was opened read-only; cannot write back`);
  const g = engine.geometry;
  const maxBlocks = Math.max(1, Math.floor((options.maxIoBytes ?? DEFAULT_MAX_IO) / g.blockSize));
  const epoch = await engine.beginEpoch();
  // Extents come sorted and maximal from the bitmap: one sequential pass over the disk, in pieces
  // of data to copy and of zeros to write.
  const pieces: Piece[] = [];
  for (const extent of epoch.extents) {
    const end = extent.start + extent.count;
    for (let start = extent.start; start < end; ) {
      const zero = epoch.isZero(start);
      let stop = start + 1;
      while (stop < end && stop - start < maxBlocks && epoch.isZero(stop) === zero) stop++;
      pieces.push({ start, count: stop - start, zero });
      start = stop;
    }
  }
  const totalBytes = pieces.reduce((n, p) => n + g.extentBytes(p.start, p.count), 0);
  const progress: FlushProgress = { epoch: epoch.id, doneBytes: 0, totalBytes };
  options.onStart?.({ ...progress });
  const read = (i: number): Promise<Buffer> | null => {
    const p = pieces[i];
    if (!p || p.zero) return null;
    const r = engine.readEpoch(epoch, p.start, p.count);
    // A rejected read-ahead is reported when awaited; keep it from counting as unhandled meanwhile.
    r.catch(() => undefined);
    return r;
  };
  try {
    // The next piece is read from flash while the current one is written: the disk never waits
    // for the cache between pieces.
    let next = read(0);
    for (let i = 0; i < pieces.length; i++) {
      const p = pieces[i]!;
      const offset = g.blockOffset(p.start);
      const bytes = g.extentBytes(p.start, p.count);
      if (p.zero) {
        next = read(i + 1);
        await writeZeros(source, offset, bytes);
      } else {
        const buf = await next!;
        next = read(i + 1);
        await source.writeAt(buf, offset);
      }
      progress.doneBytes += bytes;
      options.onProgress?.({ ...progress });
    }
    const { cleaned, kept } = await engine.commitEpoch(epoch);
    return { epoch: epoch.id, blocks: epoch.blocks, bytes: progress.doneBytes, cleaned, kept };
  } catch (err) {
    engine.abortEpoch(epoch);
    throw err;
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
