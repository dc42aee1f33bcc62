// Positioned I/O and aligned buffers (native/io.cc). Each transfer runs on the libuv threadpool;
// the buffer is held until it settles.
import { constants as bufferConstants } from 'node:buffer';
import { addon, invalidArgType, invalidArgValue, validateBytes, validateFd, validateInteger } from './addon.js';

interface IoBinding {
  pread(fd: number, buf: Uint8Array, bufOffset: number, length: number, position: number): Promise<number>;
  preadNowait(fd: number, buf: Uint8Array, bufOffset: number, length: number, position: number): number;
  pwrite(fd: number, buf: Uint8Array, bufOffset: number, length: number, position: number): Promise<void>;
  pwriteList(fd: number, buffers: Uint8Array[], positions: Float64Array): Promise<Int32Array>;
  copyRange(srcFd: number, srcPosition: number, dstFd: number, dstPosition: number, buf: Uint8Array, bufOffset: number, length: number): Promise<number>;
  copyRanges(srcFd: number, dstFd: number, buf: Uint8Array, ranges: Float64Array): Promise<number>;
  copyStream(
    srcFd: number, srcPosition: number, dstFd: number, dstPosition: number, buf: Uint8Array, bufOffset: number,
    pieceLength: number, length: number, sequential: boolean,
  ): Promise<number>;
  fdatasync(fd: number): Promise<void>;
  fallocate(fd: number, offset: number, length: number, mode: number): Promise<void>;
  seekData(fd: number, offset: number, hole: boolean): number;
  FALLOC_FL_KEEP_SIZE: number;
  FALLOC_FL_PUNCH_HOLE: number;
  FALLOC_FL_ZERO_RANGE: number;
  alignedBuffer(size: number, alignment: number): Buffer;
}

const binding = addon<IoBinding>();

const MIN_ALIGNMENT = 512;
const MAX_ALIGNMENT = 2 ** 30;

/** [bufOffset, bufOffset + length) inside buf, and [position, position + length) a safe file range. */
function validateTransfer(fd: unknown, buf: unknown, bufOffset: unknown, length: unknown, position: unknown): void {
  validateFd(fd);
  validateBytes(buf, 'buf');
  validateInteger(bufOffset, 'bufOffset', 0, buf.byteLength);
  validateInteger(length, 'length', 0, buf.byteLength - bufOffset);
  validateInteger(position, 'position', 0, Number.MAX_SAFE_INTEGER - length);
}

/**
 * Reads `length` bytes at `position` into buf[bufOffset..], retrying short reads and EINTR.
 * Resolves with the bytes read, which is less than `length` only at end of file.
 */
export function pread(fd: number, buf: Uint8Array, bufOffset: number, length: number, position: number): Promise<number> {
  validateTransfer(fd, buf, bufOffset, length, position);
  return binding.pread(fd, buf, bufOffset, length, position);
}

/**
 * preadv2(RWF_NOWAIT), synchronous: what the page cache holds of the range, without waiting for
 * the disk. Returns bytes read (maybe short) or -1 when nothing could be read that way.
 */
export function preadNowait(fd: number, buf: Uint8Array, bufOffset: number, length: number, position: number): number {
  validateTransfer(fd, buf, bufOffset, length, position);
  return binding.preadNowait(fd, buf, bufOffset, length, position);
}

/** Writes all of buf[bufOffset..bufOffset + length) at `position`, retrying short writes and EINTR. */
export function pwrite(fd: number, buf: Uint8Array, bufOffset: number, length: number, position: number): Promise<void> {
  validateTransfer(fd, buf, bufOffset, length, position);
  return binding.pwrite(fd, buf, bufOffset, length, position);
}

/**
 * Writes each of `buffers` whole at the matching entry of `positions` (bytes), in order, in one
 * threadpool job: one hand-off to the I/O threads instead of one per write. Every write is
 * attempted; the result holds each one's errno (0: written in full). Rejects only for a failure of
 * the call itself.
 */
export function pwriteList(fd: number, buffers: Uint8Array[], positions: Float64Array): Promise<Int32Array> {
  validateFd(fd);
  if (!Array.isArray(buffers)) throw invalidArgType('buffers', 'an array of Uint8Array', buffers);
  if (!(positions instanceof Float64Array) || positions.length !== buffers.length) {
    throw invalidArgValue('positions', 'must be a Float64Array with one position per buffer', positions);
  }
  for (let i = 0; i < buffers.length; i++) {
    const buf = buffers[i];
    validateBytes(buf, 'buffers[i]');
    validateInteger(positions[i], 'positions[i]', 0, Number.MAX_SAFE_INTEGER - buf.byteLength);
  }
  return binding.pwriteList(fd, buffers, positions);
}

/**
 * Reads `length` bytes of srcFd at srcPosition into buf[bufOffset..] and writes the bytes read to
 * dstFd at dstPosition, in one threadpool job (one hand-off and one wake-up instead of two of
 * each: a cache fill). Resolves with the bytes read: `length`, all written; less only when srcFd
 * ended early, and then nothing is written (a partial copy is no copy). A failure rejects with the errno and its step ('pread' for the
 * source, 'pwrite' for the destination) as `syscall`.
 */
export function copyRange(srcFd: number, srcPosition: number, dstFd: number, dstPosition: number, buf: Uint8Array, bufOffset: number, length: number): Promise<number> {
  validateTransfer(srcFd, buf, bufOffset, length, srcPosition);
  validateFd(dstFd);
  validateInteger(dstPosition, 'dstPosition', 0, Number.MAX_SAFE_INTEGER - length);
  return binding.copyRange(srcFd, srcPosition, dstFd, dstPosition, buf, bufOffset, length);
}

/**
 * copyRange() of many ranges through one buffer, in one threadpool job: `ranges` holds
 * [bufOffset, length, srcPosition, dstPosition] quadruples (bytes; the buffer slices must not
 * overlap). Every range is read from srcFd into buf first, then every range is written to dstFd,
 * in order (the flusher's batch: cache file -> disk). Resolves with the bytes read over all ranges:
 * their sum, all written; less when srcFd ended early, and then the job stopped at that range and
 * wrote nothing (the caller fails the whole batch). A failure rejects with
 * the errno and its step ('pread' for srcFd, 'pwrite' for dstFd) as `syscall`; ranges after it are
 * not copied.
 */
export function copyRanges(srcFd: number, dstFd: number, buf: Uint8Array, ranges: Float64Array): Promise<number> {
  validateFd(srcFd);
  validateFd(dstFd);
  validateBytes(buf, 'buf');
  if (!(ranges instanceof Float64Array) || ranges.length % 4 !== 0) {
    throw invalidArgValue('ranges', 'must be a Float64Array of [bufOffset, length, srcPosition, dstPosition] quadruples', ranges);
  }
  for (let i = 0; i < ranges.length; i += 4) {
    const length = ranges[i + 1]!;
    validateInteger(length, 'ranges length', 0, buf.byteLength);
    validateInteger(ranges[i], 'ranges bufOffset', 0, buf.byteLength - length);
    validateInteger(ranges[i + 2], 'ranges srcPosition', 0, Number.MAX_SAFE_INTEGER - length);
    validateInteger(ranges[i + 3], 'ranges dstPosition', 0, Number.MAX_SAFE_INTEGER - length);
  }
  return binding.copyRanges(srcFd, dstFd, buf, ranges);
}

/**
 * A long sequential copy in one threadpool job: `length` bytes of srcFd at srcPosition to dstFd at
 * dstPosition, through buf[bufOffset, bufOffset + pieceLength) one piece after the other (each
 * piece read whole, then written, then the next read: one reading stream, as `dd bs=PIECE` does;
 * a hydration chunk of several MiB costs one hand-off to the I/O threads, not one per piece).
 * With `sequential`, posix_fadvise(POSIX_FADV_SEQUENTIAL) on srcFd first (a larger readahead for a
 * buffered file; no effect on O_DIRECT). Resolves with the bytes copied, read and written:
 * `length`, or fewer only when srcFd ended early; then the pieces before the short one are
 * written and the short one is not. A failure rejects with the errno and its step ('pread' for
 * srcFd, 'pwrite' for dstFd) as `syscall`; pieces before it are written, none after.
 */
export function copyStream(
  srcFd: number, srcPosition: number, dstFd: number, dstPosition: number, buf: Uint8Array, bufOffset: number,
  pieceLength: number, length: number, sequential = false,
): Promise<number> {
  validateFd(srcFd);
  validateFd(dstFd);
  validateBytes(buf, 'buf');
  validateInteger(bufOffset, 'bufOffset', 0, buf.byteLength);
  validateInteger(pieceLength, 'pieceLength', 1, buf.byteLength - bufOffset);
  validateInteger(length, 'length', 0, Number.MAX_SAFE_INTEGER);
  validateInteger(srcPosition, 'srcPosition', 0, Number.MAX_SAFE_INTEGER - length);
  validateInteger(dstPosition, 'dstPosition', 0, Number.MAX_SAFE_INTEGER - length);
  return binding.copyStream(srcFd, srcPosition, dstFd, dstPosition, buf, bufOffset, pieceLength, length, sequential);
}

export function fdatasync(fd: number): Promise<void> {
  validateFd(fd);
  return binding.fdatasync(fd);
}

/**
 * fallocate(2) mode 0: allocates [offset, offset + length) and extends the file size if needed.
 * ENOSPC and EOPNOTSUPP reject with NativeError. A zero length is refused here (the kernel would
 * answer EINVAL).
 */
export function fallocate(fd: number, offset: number, length: number): Promise<void> {
  validateFd(fd);
  validateInteger(offset, 'offset');
  validateInteger(length, 'length', 1, Number.MAX_SAFE_INTEGER - offset);
  return binding.fallocate(fd, offset, length, 0);
}

/**
 * fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): frees the file's blocks in
 * [offset, offset + length), which then read as zeros; the size stays. Partial filesystem blocks
 * at either end are zeroed instead. Not durable before an fdatasync. A filesystem without hole
 * punching rejects with NativeError EOPNOTSUPP.
 */
export function punchHole(fd: number, offset: number, length: number): Promise<void> {
  validateFd(fd);
  validateInteger(offset, 'offset');
  validateInteger(length, 'length', 1, Number.MAX_SAFE_INTEGER - offset);
  return binding.fallocate(fd, offset, length, binding.FALLOC_FL_PUNCH_HOLE | binding.FALLOC_FL_KEEP_SIZE);
}

/**
 * lseek(SEEK_DATA), or SEEK_HOLE with `hole`: the first byte at or after `offset` that is data
 * (or a hole; the end of the file counts as a hole). -1 when no data follows `offset`.
 */
export function seekData(fd: number, offset: number, hole = false): number {
  validateFd(fd);
  validateInteger(offset, 'offset');
  return binding.seekData(fd, offset, hole);
}

/** Memory made by alignedBuffer(), by its ArrayBuffer, with the alignment of its first byte. */
const alignedMemory = new WeakMap<ArrayBufferLike, number>();

/**
 * A zero-filled Buffer whose memory starts on an `alignment` boundary, as O_DIRECT wants. The
 * memory is outside V8's heap and freed when the Buffer is collected; subarrays keep it alive.
 */
export function alignedBuffer(size: number, alignment = 4096): Buffer {
  validateInteger(size, 'size', 0, bufferConstants.MAX_LENGTH);
  validateInteger(alignment, 'alignment', MIN_ALIGNMENT, MAX_ALIGNMENT);
  if ((alignment & (alignment - 1)) !== 0) throw invalidArgValue('alignment', 'must be a power of two', alignment);
  const buf = binding.alignedBuffer(size, alignment);
  alignedMemory.set(buf.buffer, alignment);
  return buf;
}

/**
 * True when `buf` lies in memory from alignedBuffer() and starts on an `alignment` boundary (its
 * offset into that memory a multiple of it): O_DIRECT can then use it without a bounce copy. False
 * for any other memory, even if it happens to be aligned.
 */
export function isAligned(buf: Uint8Array, alignment: number): boolean {
  const base = alignedMemory.get(buf.buffer);
  return base !== undefined && base >= alignment && buf.byteOffset % alignment === 0;
}
