// In-memory bitmap with the on-disk bit order (docs/format.md): bit n lives in byte ⌊n / 8⌋ under
// mask 1 << (n % 8). Scans run in the native addon, word at a time.
//
// Bit numbers are block numbers, and a disk past 8 TiB has more than 2^31 blocks of 4 KiB: no
// 32-bit operator (>>, |, <<, ~) may touch a bit number, only the bit's position in its byte.
import {
  bitClearRange,
  bitCount,
  bitFindNextClear,
  bitFindNextSet,
  bitSetRange,
} from '../native/bitmap.js';
import { MAX_BITMAP_BITS, type Extent } from './layout.js';

export class Bitmap {
  readonly bits: number;
  /**
   * The bits. Code that writes it directly (a kernel filling it, a file read into it) calls
   * changed() afterwards, so the cached count is recomputed.
   */
  readonly buffer: Buffer;
  /** Set bits in [0, bits), kept up to date by every method that changes a bit; null: unknown. */
  #ones: number | null = null;
  /** Bumped by changed(): counts others keep over this bitmap (CacheStore's zeroed blocks) are stale then. */
  #generation = 0;

  /** `buffer` may be larger than needed (the file is padded to 4 KiB); bits past `bits` are ignored. */
  constructor(bits: number, buffer?: Buffer) {
    if (!Number.isSafeInteger(bits) || bits < 0 || bits > MAX_BITMAP_BITS) {
      throw new RangeError(`a bitmap holds 0 to ${MAX_BITMAP_BITS} bits, not ${bits}`);
    }
    this.bits = bits;
    this.buffer = buffer ?? Buffer.alloc(Math.ceil(bits / 8));
    if (this.buffer.byteLength * 8 < bits) throw new RangeError(`bitmap buffer too small for ${bits} bits`);
    if (!buffer) this.#ones = 0;
  }

  get(n: number): boolean {
    return (this.buffer[Math.floor(n / 8)]! & (1 << n % 8)) !== 0;
  }

  set(n: number): void {
    if (this.get(n)) return;
    this.buffer[Math.floor(n / 8)]! |= 1 << n % 8;
    if (this.#ones !== null && n < this.bits) this.#ones++;
  }

  clear(n: number): void {
    if (!this.get(n)) return;
    this.buffer[Math.floor(n / 8)]! &= ~(1 << n % 8);
    if (this.#ones !== null && n < this.bits) this.#ones--;
  }

  setRange(from: number, to: number): void {
    if (to <= from) return;
    if (this.#ones !== null) this.#ones += this.#inside(from, to) - this.#countInside(from, to);
    bitSetRange(this.buffer, from, to);
  }

  clearRange(from: number, to: number): void {
    if (to <= from) return;
    if (this.#ones !== null) this.#ones -= this.#countInside(from, to);
    bitClearRange(this.buffer, from, to);
  }

  /** The buffer was written directly: the next count() counts again. */
  changed(): void {
    this.#ones = null;
    this.#generation++;
  }

  /**
   * How many times changed() was called: a count kept outside over this bitmap's bits (updated
   * where the bits change through the methods above) is stale once this moves.
   */
  get generation(): number {
    return this.#generation;
  }

  nextSet(from: number, to = this.bits): number {
    return from >= to ? to : Math.min(bitFindNextSet(this.buffer, to, from), to);
  }

  nextClear(from: number, to = this.bits): number {
    return from >= to ? to : Math.min(bitFindNextClear(this.buffer, to, from), to);
  }

  /**
   * Set bits in [from, to). The whole bitmap's count is kept as bits change, so status and the
   * write-back scheduler's tick cost nothing even on a 64 TiB disk (2^34 bits).
   */
  count(from = 0, to = this.bits): number {
    if (to <= from) return 0;
    if (from === 0 && to === this.bits) return (this.#ones ??= bitCount(this.buffer, 0, this.bits));
    return bitCount(this.buffer, from, to);
  }

  allSet(from: number, to: number): boolean {
    return this.nextClear(from, to) === to;
  }

  /** Runs of set bits inside [from, to). */
  *runs(from = 0, to = this.bits): Generator<Extent> {
    let pos = this.nextSet(from, to);
    while (pos < to) {
      const end = this.nextClear(pos, to);
      yield { start: pos, count: end - pos };
      pos = this.nextSet(end, to);
    }
  }

  /** Runs of clear bits inside [from, to). */
  *gaps(from = 0, to = this.bits): Generator<Extent> {
    let pos = this.nextClear(from, to);
    while (pos < to) {
      const end = this.nextSet(pos, to);
      yield { start: pos, count: end - pos };
      pos = this.nextClear(end, to);
    }
  }

  /**
   * Keeps only the bits also set in `mask` (a bitmap of the same layout: bit n in byte n / 8):
   * this &= mask over the first mask.byteLength bytes of the buffer. A word at a time where both
   * buffers allow 4-byte views: a byte loop in JavaScript took seconds for the 64 MiB bitmap of a
   * 2 TiB disk (the uloop frontend's EPOCH_BEGIN, once per flush: bench/README, "Session 13").
   */
  and(mask: Uint8Array): void {
    const n = Math.min(mask.byteLength, this.buffer.byteLength);
    let i = 0;
    if (this.buffer.byteOffset % 4 === 0 && mask.byteOffset % 4 === 0) {
      const words = Math.floor(n / 4);
      const into = new Uint32Array(this.buffer.buffer, this.buffer.byteOffset, words);
      const from = new Uint32Array(mask.buffer, mask.byteOffset, words);
      for (let w = 0; w < words; w++) into[w]! &= from[w]!;
      i = words * 4;
    }
    for (; i < n; i++) this.buffer[i]! &= mask[i]!;
    this.changed();
  }

  clone(): Bitmap {
    const copy = new Bitmap(this.bits, Buffer.from(this.buffer));
    copy.#ones = this.#ones;
    return copy;
  }

  // The count covers [0, bits) only; ranges may reach into the padding past it.
  #inside(from: number, to: number): number {
    return Math.max(0, Math.min(to, this.bits) - from);
  }

  #countInside(from: number, to: number): number {
    return from < this.bits ? bitCount(this.buffer, from, Math.min(to, this.bits)) : 0;
  }
}
