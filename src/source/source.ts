// Where misses come from and where the flusher writes back. A source is a fixed-size array of bytes.

export interface Source {
  /** Size in bytes; fixed for the life of the source. */
  readonly size: number;
  /** Stable identity stored with the cache, so a cache is never used with another disk. */
  readonly id: string;
  /** What to call it in messages: a path or a URL. */
  readonly description: string;
  /** Reads exactly buf.length bytes at `position` (inside [0, size)). */
  readAt(buf: Uint8Array, position: number): Promise<void>;
  close(): Promise<void>;
  /** Counters worth showing in `status` (bytes fetched, requests, errors); plain JSON values. */
  stats?(): Record<string, number | string | boolean>;
}

/** A source the flusher can write dirty blocks back to. */
export interface WritableSource extends Source {
  writeAt(buf: Uint8Array, position: number): Promise<void>;
  /**
   * Optional: writes many pieces of one buffer, as writeAt() of each in the given order would;
   * `pieces` are [offset in buf, length, position] (bytes). The flusher uses it for scattered
   * dirty blocks, one request instead of one per block.
   */
  writeMany?(buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<void>;
  /** Everything written before the call is on stable media (the disk's write cache flushed). */
  sync(): Promise<void>;
}

export function isWritable(source: Source): source is WritableSource {
  return typeof (source as WritableSource).writeAt === 'function' && typeof (source as WritableSource).sync === 'function';
}
