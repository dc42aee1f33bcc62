// The ulob_native addon: positioned I/O on the libuv threadpool, aligned buffers for O_DIRECT,
// block device ioctls and word-at-a-time bitmap scans. Every argument is validated here, so the
// C++ side stays mechanism only; its own checks are just a backstop against memory corruption.
import { createRequire } from 'node:module';
import { constants as bufferConstants } from 'node:buffer';
import { types } from 'node:util';

/** A failed system call inside the addon. */
export class NativeError extends Error {
  /** libuv-style error name: 'EIO', 'ENOSPC', 'EBADF', ... */
  readonly code: string;
  /** Positive errno value. */
  readonly errno: number;
  /** The call that failed: 'pread', 'fallocate', 'ioctl(BLKGETSIZE64)', ... */
  readonly syscall: string;

  // Called from C++ with a Node-style message: `${code}: ${description}, ${syscall}`.
  constructor(message: string, code: string, errno: number, syscall: string) {
    super(message);
    this.code = code;
    this.errno = errno;
    this.syscall = syscall;
  }

  override get name(): string {
    return 'NativeError';
  }
}

interface Binding {
  setErrorClass(ctor: typeof NativeError): void;
  pread(fd: number, buf: Uint8Array, bufOffset: number, length: number, position: number): Promise<number>;
  preadNowait(fd: number, buf: Uint8Array, bufOffset: number, length: number, position: number): number;
  pwrite(fd: number, buf: Uint8Array, bufOffset: number, length: number, position: number): Promise<void>;
  fdatasync(fd: number): Promise<void>;
  fallocate(fd: number, offset: number, length: number): Promise<void>;
  alignedBuffer(size: number, alignment: number): Buffer;
  blkGetSize64(fd: number): number;
  blkFlsBuf(fd: number): void;
  blkSectorSize(fd: number): number;
  loopBacking(fd: number): { device: number; inode: number };
  bitFindNextSet(buf: Uint8Array, nbits: number, from: number): number;
  bitFindNextClear(buf: Uint8Array, nbits: number, from: number): number;
  bitCount(buf: Uint8Array, from: number, to: number): number;
  bitSetRange(buf: Uint8Array, from: number, to: number): void;
  bitClearRange(buf: Uint8Array, from: number, to: number): void;
  setIoFlusher(): void;
  isIoFlusher(): boolean;
  ataSgIo(fd: number, cdb: Uint8Array, sense: Uint8Array, timeoutMs: number): Promise<SgIoResult>;
  hdioDriveCmd(fd: number, args: Uint8Array): Promise<void>;
}

/** What SG_IO reports for a command (sg_io_hdr_t); the sense bytes land in the caller's buffer. */
export interface SgIoResult {
  /** SCSI status: 0 GOOD, 2 CHECK CONDITION. */
  status: number;
  hostStatus: number;
  driverStatus: number;
  /** Sense bytes written. */
  senseLength: number;
}

// Same relative path from src/native/ (vitest runs the TS) and from dist/native/ (compiled).
const binding = createRequire(import.meta.url)('../../build/Release/ulob_native.node') as Binding;
binding.setErrorClass(NativeError);

// ---------------------------------------------------------------------------------------------
// Validation, in the shape of node's lib/internal/validators.js: TypeError for a wrong type,
// RangeError for a wrong value, each with node's `code`.

const MAX_FD = 0x7fffffff;
const MIN_ALIGNMENT = 512;
const MAX_ALIGNMENT = 2 ** 30;

type CodedError<E extends Error> = E & { readonly code: string };

function coded<E extends Error>(err: E, code: string): CodedError<E> {
  return Object.assign(err, { code });
}

function received(value: unknown): string {
  if (value === null || value === undefined) return ` Received ${String(value)}`;
  if (typeof value === 'function') return ` Received function ${value.name || '<anonymous>'}`;
  if (typeof value === 'object') {
    const name = (value as object).constructor?.name;
    return name ? ` Received an instance of ${name}` : ' Received an object';
  }
  const shown = typeof value === 'string' ? JSON.stringify(value.length > 28 ? `${value.slice(0, 25)}...` : value) : String(value);
  return ` Received type ${typeof value} (${shown})`;
}

function invalidArgType(name: string, expected: string, value: unknown): CodedError<TypeError> {
  return coded(new TypeError(`The "${name}" argument must be ${expected}.${received(value)}`), 'ERR_INVALID_ARG_TYPE');
}

function outOfRange(name: string, range: string, value: unknown): CodedError<RangeError> {
  return coded(
    new RangeError(`The value of "${name}" is out of range. It must be ${range}. Received ${String(value)}`),
    'ERR_OUT_OF_RANGE',
  );
}

function invalidArgValue(name: string, reason: string, value: unknown): CodedError<TypeError> {
  return coded(new TypeError(`The argument '${name}' ${reason}. Received ${String(value)}`), 'ERR_INVALID_ARG_VALUE');
}

function validateInteger(value: unknown, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): asserts value is number {
  if (typeof value !== 'number') throw invalidArgType(name, 'of type number', value);
  if (!Number.isInteger(value)) throw outOfRange(name, 'an integer', value);
  if (value < min || value > max) throw outOfRange(name, `>= ${min} && <= ${max}`, value);
}

function validateFd(fd: unknown): asserts fd is number {
  validateInteger(fd, 'fd', 0, MAX_FD);
}

function validateBytes(value: unknown, name: string): asserts value is Uint8Array {
  // util.types works across realms, unlike instanceof.
  if (!types.isUint8Array(value)) throw invalidArgType(name, 'an instance of Buffer or Uint8Array', value);
}

/** [bufOffset, bufOffset + length) inside buf, and [position, position + length) a safe file range. */
function validateTransfer(fd: unknown, buf: unknown, bufOffset: unknown, length: unknown, position: unknown): void {
  validateFd(fd);
  validateBytes(buf, 'buf');
  validateInteger(bufOffset, 'bufOffset', 0, buf.byteLength);
  validateInteger(length, 'length', 0, buf.byteLength - bufOffset);
  validateInteger(position, 'position', 0, Number.MAX_SAFE_INTEGER - length);
}

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

// ---------------------------------------------------------------------------------------------
// Positioned I/O. Each call runs on the libuv threadpool; the buffer is held until it settles.

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
  return binding.fallocate(fd, offset, length);
}

// ---------------------------------------------------------------------------------------------
// Memory

/**
 * A zero-filled Buffer whose memory starts on an `alignment` boundary, as O_DIRECT wants. The
 * memory is outside V8's heap and freed when the Buffer is collected; subarrays keep it alive.
 */
export function alignedBuffer(size: number, alignment = 4096): Buffer {
  validateInteger(size, 'size', 0, bufferConstants.MAX_LENGTH);
  validateInteger(alignment, 'alignment', MIN_ALIGNMENT, MAX_ALIGNMENT);
  if ((alignment & (alignment - 1)) !== 0) throw invalidArgValue('alignment', 'must be a power of two', alignment);
  return binding.alignedBuffer(size, alignment);
}

// ---------------------------------------------------------------------------------------------
// Block device ioctls: synchronous, they only read block layer state. A non-device fd throws
// NativeError ENOTTY.

/** BLKGETSIZE64: the device size in bytes. */
export function blkGetSize64(fd: number): number {
  validateFd(fd);
  return binding.blkGetSize64(fd);
}

/** BLKFLSBUF: writes back and drops the device's page cache (needs CAP_SYS_ADMIN). */
export function blkFlsBuf(fd: number): void {
  validateFd(fd);
  binding.blkFlsBuf(fd);
}

/** BLKSSZGET: the logical sector size in bytes. */
export function blkSectorSize(fd: number): number {
  validateFd(fd);
  return binding.blkSectorSize(fd);
}

/** LOOP_GET_STATUS64: dev_t and inode of a loop device's backing file, without touching it. */
export function loopBacking(fd: number): { device: number; inode: number } {
  validateFd(fd);
  return binding.loopBacking(fd);
}

// ---------------------------------------------------------------------------------------------
// Bitmaps, LSB-first: bit n is byte n >> 3, mask 1 << (n & 7). Any Uint8Array view works,
// including subarrays at odd offsets.

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

// ---------------------------------------------------------------------------------------------
// Process

/**
 * PR_SET_IO_FLUSHER for this thread and every thread or child started after it: call it first
 * thing in a daemon that serves a block device, before any fs or threadpool work.
 */
export function setIoFlusher(): void {
  binding.setIoFlusher();
}

/** PR_GET_IO_FLUSHER for the calling thread. */
export function isIoFlusher(): boolean {
  return binding.isIoFlusher();
}

// ---------------------------------------------------------------------------------------------
// Disk power (native/power.cc): raw command transport; src/writeback/power.ts builds and decodes.

/** SG_IO of a non-data CDB (6 to 16 bytes) on the threadpool; `sense` (18 to 255 bytes) is filled. */
export function ataSgIo(fd: number, cdb: Uint8Array, sense: Uint8Array, timeoutMs = 15_000): Promise<SgIoResult> {
  validateFd(fd);
  validateBytes(cdb, 'cdb');
  validateBytes(sense, 'sense');
  if (cdb.byteLength < 6 || cdb.byteLength > 16) throw outOfRange('cdb.byteLength', '>= 6 && <= 16', cdb.byteLength);
  if (sense.byteLength < 18 || sense.byteLength > 255) throw outOfRange('sense.byteLength', '>= 18 && <= 255', sense.byteLength);
  validateInteger(timeoutMs, 'timeoutMs', 1, 3_600_000);
  return binding.ataSgIo(fd, cdb, sense, timeoutMs);
}

/** HDIO_DRIVE_CMD with args [command, count, feature, 0]; the kernel writes [status, error, count] back. */
export function hdioDriveCmd(fd: number, args: Uint8Array): Promise<void> {
  validateFd(fd);
  validateBytes(args, 'args');
  if (args.byteLength < 4) throw outOfRange('args.byteLength', '>= 4', args.byteLength);
  return binding.hdioDriveCmd(fd, args);
}

// ---------------------------------------------------------------------------------------------
// The uloop control device (kernel/include/uapi/uloop.h). Synchronous ioctls; the request channel
// is watched on the event loop (uv_poll) and delivers whole messages.

export const ULOOP_F_WRITEBACK = 1;
export const ULOOP_MSG_MISS = 1;
export const ULOOP_MSG_INTENT = 2;
export const ULOOP_MSG_BARRIER = 3;

export interface UloopMessage {
  id: number;
  type: number;
  offset: number;
  length: number;
}

export interface UloopInfo {
  size: number;
  blockSize: number;
  blocks: number;
  presentBlocks: number;
  dirtyBlocks: number;
  epoch: number;
  attached: boolean;
  waiting: number;
}

/** A watch of a control fd; close() once, before closing the fd. */
export interface UloopWatch {
  close(): void;
}

interface UloopBinding {
  uloopOpen(): number;
  uloopAdd(fd: number, cacheFd: number, size: number, blockSize: number, flags: number, present: Uint8Array, dirty: Uint8Array, index: number): number;
  uloopRemove(fd: number, index: number): void;
  uloopAttach(fd: number, index: number): void;
  uloopQuery(fd: number, index: number): UloopInfo;
  uloopBarrierBits(fd: number, id: number, present: Uint8Array, dirty: Uint8Array): void;
  uloopEpochBegin(fd: number, dirty: Uint8Array): number;
  uloopEpochCommit(fd: number, epoch: number, flushed: Uint8Array): number;
  uloopReply(fd: number, id: number, error: number): void;
  uloopWatch(fd: number, cb: (err: NativeError | null, msgs: UloopMessage[]) => void): object;
  uloopUnwatch(handle: object): void;
}

const uloopBinding = binding as unknown as UloopBinding;

export function uloopOpen(): number {
  return uloopBinding.uloopOpen();
}

/** Adds /dev/uloopN over the cache file (index -1: any N) and attaches `fd` to it as its daemon. */
export function uloopAdd(fd: number, cacheFd: number, size: number, blockSize: number, flags: number, present: Uint8Array, dirty: Uint8Array, index = -1): number {
  validateFd(fd);
  validateFd(cacheFd);
  validateInteger(size, 'size', 512);
  validateInteger(blockSize, 'blockSize', 4096, 2 ** 20);
  validateInteger(flags, 'flags', 0, 1);
  validateBytes(present, 'present');
  validateBytes(dirty, 'dirty');
  const need = Math.ceil(Math.ceil(size / blockSize) / 8);
  if (present.byteLength < need) throw outOfRange('present.byteLength', `>= ${need}`, present.byteLength);
  if (dirty.byteLength < need) throw outOfRange('dirty.byteLength', `>= ${need}`, dirty.byteLength);
  validateInteger(index, 'index', -1, 2 ** 20 - 1);
  return uloopBinding.uloopAdd(fd, cacheFd, size, blockSize, flags, present, dirty, index);
}

export function uloopRemove(fd: number, index: number): void {
  validateFd(fd);
  validateInteger(index, 'index', 0, 2 ** 20);
  uloopBinding.uloopRemove(fd, index);
}

export function uloopAttach(fd: number, index: number): void {
  validateFd(fd);
  validateInteger(index, 'index', 0, 2 ** 20);
  uloopBinding.uloopAttach(fd, index);
}

export function uloopQuery(fd: number, index: number): UloopInfo {
  validateFd(fd);
  validateInteger(index, 'index', 0, 2 ** 20);
  return uloopBinding.uloopQuery(fd, index);
}

export function uloopBarrierBits(fd: number, id: number, present: Uint8Array, dirty: Uint8Array): void {
  validateFd(fd);
  validateInteger(id, 'id', 1);
  validateBytes(present, 'present');
  validateBytes(dirty, 'dirty');
  uloopBinding.uloopBarrierBits(fd, id, present, dirty);
}

/** EPOCH_BEGIN: the kernel's dirty bitmap into `dirty`; the kernel records writes from now on. */
export function uloopEpochBegin(fd: number, dirty: Uint8Array): number {
  validateFd(fd);
  validateBytes(dirty, 'dirty');
  return uloopBinding.uloopEpochBegin(fd, dirty);
}

/** EPOCH_COMMIT: narrows `flushed` in place to the blocks the kernel cleaned; returns their count. */
export function uloopEpochCommit(fd: number, epoch: number, flushed: Uint8Array): number {
  validateFd(fd);
  validateInteger(epoch, 'epoch', 1);
  validateBytes(flushed, 'flushed');
  return uloopBinding.uloopEpochCommit(fd, epoch, flushed);
}

export function uloopReply(fd: number, id: number, error = 0): void {
  validateFd(fd);
  validateInteger(id, 'id', 1);
  validateInteger(error, 'error', -4095, 0);
  uloopBinding.uloopReply(fd, id, error);
}

export function uloopWatch(fd: number, onMessages: (err: NativeError | null, msgs: UloopMessage[]) => void): UloopWatch {
  validateFd(fd);
  if (typeof onMessages !== 'function') throw invalidArgType('onMessages', 'of type function', onMessages);
  const handle = uloopBinding.uloopWatch(fd, onMessages);
  let closed = false;
  return {
    close() {
      if (closed) return;
      closed = true;
      uloopBinding.uloopUnwatch(handle);
    },
  };
}
