// Where misses come from and where the flusher writes back. A source is a fixed-size array of bytes.

/**
 * A disk's sector sizes in bytes, as `blockdev --getss` and `--getpbsz` print them: `logical` is
 * the smallest unit it addresses (512, or 4096 on a 4Kn disk), `physical` the smallest it writes
 * without a read-modify-write (4096 on 512e and 4Kn disks). Frontends present both, so a
 * filesystem made through the cache also mounts on the bare disk.
 */
import type { BlockFile } from '../storage/storage.js';

export interface SectorSize {
  logical: number;
  physical: number;
}

export interface Source {
  /** Size in bytes; fixed for the life of the source. */
  readonly size: number;
  /** Stable identity stored with the cache, so a cache is never used with another disk. */
  readonly id: string;
  /** What to call it in messages: a path or a URL. */
  readonly description: string;
  /** The disk's sector sizes; absent for sources without any (files, URLs, callbacks): 512 then. */
  readonly sectorSize?: SectorSize;
  /**
   * Optional: bytes (a power of two, at least the cache's block size to have any effect) that a
   * read miss in the cache fills around what was asked, aligned to this size, when the cache has
   * no budget of its own (with one, EngineOptions.fillGranuleBytes decides). For a source whose
   * round trip costs far more than its bytes (HTTP): a random 4 KiB miss then brings its
   * neighbours along, as nbdkit's cache filter does with its 64 KiB blocks. Absent or 0: a miss
   * fills exactly the blocks asked.
   */
  readonly missGranule?: number;
  /** Reads exactly buf.length bytes at `position` (inside [0, size)). */
  readAt(buf: Uint8Array, position: number): Promise<void>;
  /**
   * Optional: readAt(buf, position) and then `into`.write(buf, intoPosition), in one request where
   * the source and `into` can (a cache fill of a local disk: BlockFile.copyFrom). Rejects like
   * readAt for the source's failures; a failure of the write carries `syscall: 'pwrite'` (it is
   * the cache's, not the disk's). Callers fall back to readAt and write where it is missing.
   */
  copyInto?(into: BlockFile, buf: Uint8Array, position: number, intoPosition: number): Promise<void>;
  /**
   * Optional: copyInto() of `length` bytes (more than buf holds) through `buf`, piece after piece,
   * in one request where the source and `into` can (a hydration chunk: BlockFile.copyStreamFrom,
   * one sequential reading stream). Rejects like copyInto; after a failure some leading pieces
   * may be written to `into` (the caller treats the whole range as not copied).
   */
  streamInto?(into: BlockFile, buf: Uint8Array, position: number, intoPosition: number, length: number): Promise<void>;
  close(): Promise<void>;
  /** Counters worth showing in `status` (bytes fetched, requests, errors); plain JSON values. */
  stats?(): Record<string, number | string | boolean>;
  /**
   * For a disk that can vanish (a block device): false once it has been removed. Answered from
   * kernel state (sysfs), never by I/O to the disk, and fast enough to ask at every `status`.
   */
  present?(): boolean;
}

/** A source the flusher can write dirty blocks back to. */
export interface WritableSource extends Source {
  writeAt(buf: Uint8Array, position: number): Promise<void>;
  /**
   * Makes [position, position + length) read as zeros, cheaper than writing them where it can
   * (BLKZEROOUT, a punched hole). Optional: the flusher writes zeros without it. Durable at sync().
   */
  zeroAt?(position: number, length: number): Promise<void>;
  /**
   * Optional: writes many pieces of one buffer, as writeAt() of each in the given order would;
   * `pieces` are [offset in buf, length, position] (bytes). The flusher uses it for scattered
   * dirty blocks, one request instead of one per block.
   */
  writeMany?(buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<void>;
  /**
   * Optional: writeMany(buf, pieces) of pieces first read from `from` (the cache file, which
   * mirrors the disk: same positions) into buf, in one request where the source and `from` can
   * (BlockFile.copyManyFrom): the flusher's batch then costs the event loop no read and one
   * hand-off. Rejects like writeMany for the source's failures; a failure to read `from` carries
   * `syscall: 'pread'` (it is the cache's, not the disk's).
   */
  writeManyFrom?(from: BlockFile, buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<void>;
  /** Everything written before the call is on stable media (the disk's write cache flushed). */
  sync(): Promise<void>;
}

export function isWritable(source: Source): source is WritableSource {
  return typeof (source as WritableSource).writeAt === 'function' && typeof (source as WritableSource).sync === 'function';
}

/**
 * `source` seen through `overrides`: each override replaces the source's method of that name, and
 * only where the source has one (an absent optional method stays absent, so callers still pick
 * their fallback by it); every other property and method, including ones added to Source later,
 * is the source's own, called with the source as `this` (class sources keep private fields). An
 * override calls the original itself, through `source`. Used by every wrapper of a disk's source,
 * so none of them can drop a method by forgetting to list it.
 */
export function wrapSource<S extends Source>(source: S, overrides: Partial<WritableSource>): S {
  type Fn = (...args: unknown[]) => unknown;
  const bound = new Map<PropertyKey, { fn: Fn; bound: Fn }>();
  return new Proxy(source, {
    get(target, prop) {
      const value: unknown = Reflect.get(target, prop, target);
      if (typeof value !== 'function') return value;
      const override = (overrides as Record<PropertyKey, unknown>)[prop];
      if (typeof override === 'function') return override;
      // Bound once per method, not per call: these sit on the flusher's and misses' hot paths.
      const hit = bound.get(prop);
      if (hit?.fn === value) return hit.bound;
      const b = (value as Fn).bind(target);
      bound.set(prop, { fn: value as Fn, bound: b });
      return b;
    },
  });
}

/** The source with every read of the disk reported first (a read means the disk is spinning). */
export function observeReads<S extends Source>(source: S, onRead: () => void): S {
  return wrapSource(source, {
    readAt: (buf, position) => {
      onRead();
      return source.readAt(buf, position);
    },
    copyInto: (into, buf, position, intoPosition) => {
      onRead();
      return source.copyInto!(into, buf, position, intoPosition);
    },
    streamInto: (into, buf, position, intoPosition, length) => {
      onRead();
      return source.streamInto!(into, buf, position, intoPosition, length);
    },
  });
}
