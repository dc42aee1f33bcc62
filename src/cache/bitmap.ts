// In-memory bitmap with the on-disk bit order (docs/format.md): bit n lives in byte n >> 3 under
// mask 1 << (n & 7). Scans run in the native addon, word at a time.
import {
  bitClearRange,
  bitCount,
  bitFindNextClear,
  bitFindNextSet,
  bitSetRange,
} from '../native/bitmap.js';
import type { Extent } from './layout.js';

export class Bitmap {
  readonly bits: number;
  readonly buffer: Buffer;

  /** `buffer` may be larger than needed (the file is padded to 4 KiB); bits past `bits` are ignored. */
  constructor(bits: number, buffer?: Buffer) {
    this.bits = bits;
    this.buffer = buffer ?? Buffer.alloc(Math.ceil(bits / 8));
    if (this.buffer.byteLength * 8 < bits) throw new RangeError(`bitmap buffer too small for ${bits} bits`);
  }

  get(n: number): boolean {
    return (this.buffer[n >> 3]! & (1 << (n & 7))) !== 0;
  }

  set(n: number): void {
    this.buffer[n >> 3]! |= 1 << (n & 7);
  }

  clear(n: number): void {
    this.buffer[n >> 3]! &= ~(1 << (n & 7));
  }

  setRange(from: number, to: number): void {
    if (to > from) bitSetRange(this.buffer, from, to);
  }

  clearRange(from: number, to: number): void {
    if (to > from) bitClearRange(this.buffer, from, to);
  }

  nextSet(from: number, to = this.bits): number {
    return from >= to ? to : Math.min(bitFindNextSet(this.buffer, to, from), to);
  }

  nextClear(from: number, to = this.bits): number {
    return from >= to ? to : Math.min(bitFindNextClear(this.buffer, to, from), to);
  }

  count(from = 0, to = this.bits): number {
    return to > from ? bitCount(this.buffer, from, to) : 0;
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

  clone(): Bitmap {
    return new Bitmap(this.bits, Buffer.from(this.buffer));
  }
}
