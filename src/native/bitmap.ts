// Word-at-a-time bitmap scans (native/bitmap.cc). Bitmaps are LSB-first: bit n is byte n >> 3,
// mask 1 << (n & 7). Any Uint8Array view works, including subarrays at odd offsets.
import { addon, validateBytes, validateInteger } from './addon.js';

interface BitmapBinding {
  bitFindNextSet(buf: Uint8Array, nbits: number, from: number): number;
  bitFindNextClear(buf: Uint8Array, nbits: number, from: number): number;
  bitCount(buf: Uint8Array, from: number, to: number): number;
  bitSetRange(buf: Uint8Array, from: number, to: number): void;
  bitClearRange(buf: Uint8Array, from: number, to: number): void;
}

const binding = addon<BitmapBinding>();

/** nbits within the buffer, from within [0, nbits]. */
function validateScan(buf: unknown, nbits: unknown, from: unknown): void {
  validateBytes(buf, 'buf');
  validateInteger(nbits, 'nbits', 0, buf.byteLength * 8);
  validateInteger(from, 'from', 0, nbits);
}

/** from <= to <= bits in the buffer. */
function validateBitRange(buf: unknown, from: unknown, to: unknown): void {
  validateBytes(buf, 'buf');
  validateInteger(to, 'to', 0, buf.byteLength * 8);
  validateInteger(from, 'from', 0, to);
}

/** First set bit in [from, nbits), or nbits if none. */
export function bitFindNextSet(buf: Uint8Array, nbits: number, from: number): number {
  validateScan(buf, nbits, from);
  return binding.bitFindNextSet(buf, nbits, from);
}

/** First clear bit in [from, nbits), or nbits if none. */
export function bitFindNextClear(buf: Uint8Array, nbits: number, from: number): number {
  validateScan(buf, nbits, from);
  return binding.bitFindNextClear(buf, nbits, from);
}

/** Number of set bits in [from, to). */
export function bitCount(buf: Uint8Array, from: number, to: number): number {
  validateBitRange(buf, from, to);
  return binding.bitCount(buf, from, to);
}

/** Sets the bits in [from, to). */
export function bitSetRange(buf: Uint8Array, from: number, to: number): void {
  validateBitRange(buf, from, to);
  binding.bitSetRange(buf, from, to);
}

/** Clears the bits in [from, to). */
export function bitClearRange(buf: Uint8Array, from: number, to: number): void {
  validateBitRange(buf, from, to);
  binding.bitClearRange(buf, from, to);
}
