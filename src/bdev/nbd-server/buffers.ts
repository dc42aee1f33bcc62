// Memory for replies and write payloads of the NBD server. Allocating it per request is what a
// busy server must not do: each fresh Buffer is an allocation the garbage collector has to find
// again, and a large one is page faults on top. Small pieces are carved from a shared slab (as
// Buffer.allocUnsafe carves its 8 KiB pool, but large enough for a 4 KiB read reply); large ones
// come from pools and go back once the socket has sent them or the backend has written them.
import { SizedBufferPool } from '../../storage/buffer-pool.js';

const SLAB_BYTES = 256 * 1024;
/** Pieces up to this size come from the slab and are never given back. */
const SLAB_PIECE_MAX = 16 * 1024;
/** Large buffers start at this size class. */
const POOL_MIN = 32 * 1024;
/** Free large buffers kept for reuse, over all sizes. */
const POOL_KEEP = 32 * 1024 * 1024;

/** One per server: every connection takes from it (all run on the one event loop). */
export class IoBuffers {
  #slab = Buffer.allocUnsafe(SLAB_BYTES);
  #used = 0;
  readonly #pool = new SizedBufferPool(POOL_MIN, POOL_KEEP);

  /** A buffer of n bytes (content undefined); give it back with release() once done with it. */
  take(n: number): Buffer {
    if (n > SLAB_PIECE_MAX) return this.#pool.take(n);
    if (this.#used + n > SLAB_BYTES) {
      // The old slab is freed once the last piece of it is unreferenced.
      this.#slab = Buffer.allocUnsafe(SLAB_BYTES);
      this.#used = 0;
    }
    const piece = this.#slab.subarray(this.#used, this.#used + n);
    // Pieces start on 8-byte boundaries, as Buffer's pool keeps them.
    this.#used += (n + 7) & ~7;
    return piece;
  }

  /** Ends the use of a buffer from take(): large ones are reused, slab pieces need nothing. */
  release(buf: Buffer): void {
    if (buf.byteLength > SLAB_PIECE_MAX) this.#pool.give(buf);
  }

  /** Bytes of free large buffers kept (for tests and status). */
  get pooledBytes(): number {
    return this.#pool.keptBytes;
  }
}
