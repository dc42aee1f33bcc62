// Geometry of a cache: how a backing disk of `size` bytes maps to blocks, cache file and bitmap file.
import { constants as bufferConstants } from 'node:buffer';
import { InvalidArgumentError } from '../errors.js';
import { assertSafeInteger, isPowerOfTwo } from '../validate.js';

export const MIN_BLOCK_SIZE = 4096;
export const MAX_BLOCK_SIZE = 1 << 20;
export const DEFAULT_BLOCK_SIZE = 4096;
/** Cache and bitmap files are sized in whole 4 KiB pages, as the seed's ULOOP did. */
export const FILE_ALIGN = 4096;

/**
 * Most blocks a cache can have: each in-memory bitmap is one Buffer, at most
 * buffer.constants.MAX_LENGTH bytes (4 GiB on Node 20: 2^35 blocks, a 128 TiB disk of 4 KiB blocks).
 */
export const MAX_BITMAP_BITS = bufferConstants.MAX_LENGTH * 8;

export function roundUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

export function assertBlockSize(blockSize: unknown): asserts blockSize is number {
  if (typeof blockSize !== 'number' || !isPowerOfTwo(blockSize) || blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE) {
    throw new InvalidArgumentError(`block size must be a power of two from 4 KiB to 1 MiB, got ${String(blockSize)}`);
  }
}

/** A run of blocks [start, start + count). */
export interface Extent {
  start: number;
  count: number;
}

export class Geometry {
  readonly size: number;
  readonly blockSize: number;
  readonly blockShift: number;
  readonly blockCount: number;

  constructor(size: number, blockSize: number) {
    assertSafeInteger(size, 'backing size', 1);
    assertBlockSize(blockSize);
    this.size = size;
    this.blockSize = blockSize;
    this.blockShift = Math.log2(blockSize);
    this.blockCount = Math.ceil(size / blockSize);
    if (this.blockCount > MAX_BITMAP_BITS) {
      const fits = 2 ** Math.ceil(Math.log2(size / MAX_BITMAP_BITS));
      throw new InvalidArgumentError(
        `a ${size}-byte disk has ${this.blockCount} blocks of ${blockSize} bytes, more than one bitmap holds (${MAX_BITMAP_BITS}); use --block-size ${fits >= 1 << 20 ? `${fits / (1 << 20)}M` : `${fits / 1024}K`} or larger`,
      );
    }
  }

  /** Cache file: the backing size rounded up to 4 KiB. */
  get cacheFileSize(): number {
    return roundUp(this.size, FILE_ALIGN);
  }

  /** Bitmap file: one bit per block, rounded up to 4 KiB. */
  get bitmapFileSize(): number {
    return roundUp(Math.ceil(this.blockCount / 8), FILE_ALIGN);
  }

  blockOffset(block: number): number {
    return block * this.blockSize;
  }

  /** Bytes of the device inside `block` (the last block may be short). */
  blockLength(block: number): number {
    return Math.min(this.blockSize, this.size - block * this.blockSize);
  }

  /** Blocks touched by [offset, offset + length): [first, end). */
  blocksOf(offset: number, length: number): [number, number] {
    if (length === 0) return [0, 0];
    return [Math.floor(offset / this.blockSize), Math.floor((offset + length - 1) / this.blockSize) + 1];
  }

  /** Bytes of [start, start + count) blocks, clipped to the device size. */
  extentBytes(start: number, count: number): number {
    return Math.min((start + count) * this.blockSize, this.size) - start * this.blockSize;
  }
}
