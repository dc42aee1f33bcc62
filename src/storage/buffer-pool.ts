// Reusable I/O buffers. On the machines this runs on a fresh large Buffer costs more than the copy
// it is for: every 4 KiB page of new memory is a page fault (about 10 µs in a VM), and the garbage
// collector has to find and free it again. The flusher, the hydrator's fills and O_DIRECT transfers
// take their buffers from a pool instead, and the memory is aligned, so O_DIRECT needs no bounce.
import { alignedBuffer } from '../native/io.js';

/** Alignment of pooled memory: enough for O_DIRECT on 512-byte and 4 KiB logical sectors. */
export const POOL_ALIGNMENT = 4096;

/**
 * A free list of aligned buffers of `bufferBytes` each. take() hands out a free one or makes a new
 * one; give() puts it back, keeping at most `keep` (the rest are left to the GC). Single-threaded:
 * a buffer given back must no longer be used by its taker, nor by any I/O it started.
 */
export class BufferPool {
  readonly bufferBytes: number;
  readonly keep: number;
  readonly #free: Buffer[] = [];

  constructor(bufferBytes: number, keep: number) {
    if (!Number.isSafeInteger(bufferBytes) || bufferBytes < 1) throw new RangeError(`buffer size must be a positive integer, got ${bufferBytes}`);
    this.bufferBytes = bufferBytes;
    this.keep = keep;
  }

  /** A whole buffer of bufferBytes; its content is whatever its last user left there. */
  take(): Buffer {
    return this.#free.pop() ?? alignedBuffer(this.bufferBytes, POOL_ALIGNMENT);
  }

  /** Returns a buffer from take() (the whole buffer, not a slice of it). */
  give(buf: Buffer): void {
    if (buf.byteLength !== this.bufferBytes || buf.byteOffset !== 0) throw new RangeError('give() takes back whole buffers of this pool only');
    if (this.#free.length < this.keep) this.#free.push(buf);
  }

  /** Drops every free buffer (the GC frees the memory); buffers taken stay valid. */
  drain(): void {
    this.#free.length = 0;
  }

  /** Buffers waiting on the free list. */
  get idle(): number {
    return this.#free.length;
  }
}

/**
 * Buffers of any size up to a limit, from one BufferPool per power of two (at least `minBytes`).
 * take(n) returns a view of n bytes; give() takes that view back. At most `keepBytes` of free
 * buffers are kept over all sizes.
 */
export class SizedBufferPool {
  readonly minBytes: number;
  readonly keepBytes: number;
  readonly #pools = new Map<number, BufferPool>();
  #keptBytes = 0;

  constructor(minBytes: number, keepBytes: number) {
    this.minBytes = minBytes;
    this.keepBytes = keepBytes;
  }

  /** A view of n bytes of a pooled buffer; its content is whatever was there. */
  take(n: number): Buffer {
    const size = classOf(Math.max(n, this.minBytes));
    const pool = this.#pools.get(size);
    if (pool && pool.idle > 0) this.#keptBytes -= size;
    return (pool?.idle ? pool.take() : alignedBuffer(size, POOL_ALIGNMENT)).subarray(0, n);
  }

  /** Takes back a view from take(); nothing else may use it afterwards. */
  give(view: Buffer): void {
    const whole = Buffer.from(view.buffer, 0, view.buffer.byteLength);
    const size = whole.byteLength;
    if (view.byteOffset !== 0 || size !== classOf(size) || size < this.minBytes) throw new RangeError('give() takes back views from take() only');
    if (this.#keptBytes + size > this.keepBytes) return;
    let pool = this.#pools.get(size);
    if (!pool) this.#pools.set(size, (pool = new BufferPool(size, Math.max(1, Math.floor(this.keepBytes / size)))));
    const before = pool.idle;
    pool.give(whole);
    if (pool.idle > before) this.#keptBytes += size;
  }

  /** Bytes of free buffers kept. */
  get keptBytes(): number {
    return this.#keptBytes;
  }
}

/** The power of two at or above n. */
function classOf(n: number): number {
  return 2 ** Math.ceil(Math.log2(n));
}
