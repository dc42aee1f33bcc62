// One flush = one epoch: snapshot the dirty blocks, write them to the backing disk sorted by offset
// and coalesced into large writes, sync the disk, then clear what was flushed (engine.commitEpoch
// syncs the source before clearing: invariant 4).
import type { CacheEngine } from '../cache/engine.js';
import { isWritable } from '../source/source.js';
import { ReadOnlyError } from '../errors.js';

export interface FlushOptions {
  /** Largest single write to the backing disk. */
  maxIoBytes?: number;
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
  let bytes = 0;
  try {
    // Extents come sorted and maximal from the bitmap: one sequential pass over the disk.
    for (const extent of epoch.extents) {
      for (let start = extent.start; start < extent.start + extent.count; start += maxBlocks) {
        const count = Math.min(maxBlocks, extent.start + extent.count - start);
        const offset = g.blockOffset(start);
        const buf = Buffer.allocUnsafe(g.extentBytes(start, count));
        await engine.readCache(buf, offset);
        await source.writeAt(buf, offset);
        bytes += buf.byteLength;
      }
    }
    const { cleaned, kept } = await engine.commitEpoch(epoch);
    return { epoch: epoch.id, blocks: epoch.blocks, bytes, cleaned, kept };
  } catch (err) {
    engine.abortEpoch(epoch);
    throw err;
  }
}
