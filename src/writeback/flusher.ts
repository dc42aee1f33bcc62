// One flush = one epoch: snapshot the dirty blocks, write them to the backing disk sorted by offset
// and coalesced into large writes, sync the disk, then clear what was flushed (engine.commitEpoch
// syncs the source before clearing: invariant 4). Each piece is the epoch's version of its blocks
// (engine.readEpoch): blocks rewritten during the flush reach the disk as they were at the
// snapshot, so a completed flush leaves the disk a point-in-time image (docs/design.md).
import type { CacheEngine } from '../cache/engine.js';
import { isWritable } from '../source/source.js';
import { FlushStoppedError, ReadOnlyError } from '../errors.js';
import { formatBytes } from '../units.js';

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
  /**
   * Stops the flush before its next piece (the stop deadline): the epoch is aborted, so every
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

export async function flushDirty(engine: CacheEngine, options: FlushOptions = {}): Promise<FlushResult> {
  const source = engine.source;
  if (!isWritable(source)) throw new ReadOnlyError(`${source.description} was opened read-only; cannot write back`);
  const g = engine.geometry;
  const maxBlocks = Math.max(1, Math.floor((options.maxIoBytes ?? DEFAULT_MAX_IO) / g.blockSize));
  const epoch = await engine.beginEpoch();
  // Extents come sorted and maximal from the bitmap: one sequential pass over the disk.
  const pieces: Array<[number, number]> = [];
  for (const extent of epoch.extents) {
    for (let start = extent.start; start < extent.start + extent.count; start += maxBlocks) {
      pieces.push([start, Math.min(maxBlocks, extent.start + extent.count - start)]);
    }
  }
  const totalBytes = pieces.reduce((n, [s, c]) => n + g.extentBytes(s, c), 0);
  const progress: FlushProgress = { epoch: epoch.id, doneBytes: 0, totalBytes };
  options.onStart?.({ ...progress });
  try {
    // The next piece is read from flash while the current one is written: the disk never waits
    // for the cache between pieces.
    let next = pieces.length > 0 ? engine.readEpoch(epoch, pieces[0]![0], pieces[0]![1]) : null;
    for (let i = 0; i < pieces.length; i++) {
      const [start] = pieces[i]!;
      if (options.signal?.aborted) {
        next?.catch(() => undefined);
        throw new FlushStoppedError(`flush stopped after ${formatBytes(progress.doneBytes)} of ${formatBytes(totalBytes)}; every block stays dirty for the next flush`);
      }
      const buf = await next!;
      next = i + 1 < pieces.length ? engine.readEpoch(epoch, pieces[i + 1]![0], pieces[i + 1]![1]) : null;
      // A rejected read-ahead is reported when awaited; keep it from counting as unhandled meanwhile.
      next?.catch(() => undefined);
      await source.writeAt(buf, g.blockOffset(start));
      progress.doneBytes += buf.byteLength;
      options.onProgress?.({ ...progress });
    }
    const { cleaned, kept } = await engine.commitEpoch(epoch);
    return { epoch: epoch.id, blocks: epoch.blocks, bytes: progress.doneBytes, cleaned, kept };
  } catch (err) {
    engine.abortEpoch(epoch);
    throw err;
  }
}
