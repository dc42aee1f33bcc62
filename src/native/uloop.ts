// The uloop control device (native/uloop.cc over kernel/include/uapi/uloop.h). Synchronous
// ioctls; the request channel is watched on the event loop (uv_poll) and delivers whole messages.
// The ABI's constants come from the addon, which is compiled against the uapi header: they are
// never retyped here.
import { addon, invalidArgType, NativeError, outOfRange, validateBytes, validateFd, validateInteger } from './addon.js';

export interface UloopMessage {
  /** Unique per device while outstanding; the reply carries it back. */
  id: number;
  /** ULOOP_MSG_MISS, _INTENT, _BARRIER, _PRESERVE or _ZERO. */
  type: number;
  /** ULOOP_MSG_F_* (ZERO: DISCARD, NOUNMAP). */
  flags: number;
  /** Bytes into the device (block-aligned). */
  offset: number;
  /** Bytes (block-aligned); for a barrier, the bitmap length. */
  length: number;
  /** PRESERVE: the flush epoch whose version to keep; ROOM (ULOOP_FEAT_BARRIER): the missing blocks; else 0. */
  epoch: number;
}

/** ULOOP_IOC_GET_FEATURES: what the loaded module can do. */
export interface UloopFeatures {
  /** The module's ULOOP_ABI_VERSION. */
  version: number;
  /** Partitions per device with their own minor. */
  maxPart: number;
  /** ULOOP_FEAT_* bits. */
  features: number;
  maxDevices: number;
  /** The io_timeout_s module parameter now (0: requests wait for ever). */
  ioTimeoutS: number;
  maxBlocks: number;
}

/** ULOOP_IOC_QUERY: struct uloop_info (counts in blocks, sizes in bytes, exact running counts). */
export interface UloopInfo {
  size: number;
  blockSize: number;
  /** ULOOP_F_* given at ADD. */
  flags: number;
  blocks: number;
  presentBlocks: number;
  /** Including zero blocks and pending ones. */
  dirtyBlocks: number;
  /** Flush epochs begun so far. */
  epoch: number;
  attached: boolean;
  /** Upcalls queued for or sent to the daemon, not answered. */
  waiting: number;
  /** The sticky error (a negative errno) or 0. */
  error: number;
  /** ULOOP_STATE_* bits. */
  state: number;
  zeroBlocks: number;
  /** Written whole while missing, not yet handed over by a barrier. */
  pendingBlocks: number;
  claimedBlocks: number;
  readHits: number;
  readMisses: number;
  writeHits: number;
  writeUpcalls: number;
  readBytes: number;
  writeBytes: number;
  zeroBytes: number;
  flushes: number;
  barriers: number;
  timeouts: number;
  ioErrors: number;
  lateReplies: number;
  memBytes: number;
  inflight: number;
  logicalBlockSize: number;
  physicalBlockSize: number;
  unitShift: number;
  /** ULOOP_FEAT_CREDIT: blocks written whole while missing that no barrier handed over yet
   * (pending, taken by the barrier in flight, owned by writes in flight, lost). */
  unaskedBlocks: number;
  /** ULOOP_FEAT_CREDIT: CREDIT's limit in blocks, -1 when none is set. */
  creditLimit: number;
}

/** The #defines and enum values of uloop.h, as the addon was compiled against them. */
interface UloopAbi {
  ABI_VERSION: number;
  CONTROL_NAME: string;
  INDEX_ANY: number;
  MAX_BLOCKS: number;
  MAX_RANGE_BLOCKS: number;
  F_WRITEBACK: number;
  F_PRESERVE: number;
  F_ZERO: number;
  F_ACCESSED: number;
  F_PARTSCAN: number;
  FEAT_COUNTERS: number;
  FEAT_STICKY_ERROR: number;
  FEAT_IO_TIMEOUT: number;
  FEAT_PRESERVE: number;
  FEAT_ZERO: number;
  FEAT_CLAIM: number;
  FEAT_EVICT: number;
  FEAT_ACCESSED: number;
  FEAT_PARTITIONS: number;
  FEAT_SECTOR_SIZE: number;
  FEAT_REPLY_CHECK: number;
  FEAT_CREDIT: number;
  FEAT_BARRIER: number;
  EVICT_F_PINNED: number;
  EVICT_F_HOLD: number;
  STATE_EPOCH_OPEN: number;
  STATE_EPOCH_FAILED: number;
  STATE_SCANNING: number;
  MSG_MISS: number;
  MSG_INTENT: number;
  MSG_BARRIER: number;
  MSG_PRESERVE: number;
  MSG_ZERO: number;
  MSG_ROOM: number;
  MSG_F_DISCARD: number;
  MSG_F_NOUNMAP: number;
}

type OnMessages = (err: NativeError | null, msgs: UloopMessage[]) => void;

interface UloopBinding {
  uloopAbi: UloopAbi;
  uloopOpen(): number;
  uloopGetFeatures(fd: number): UloopFeatures;
  uloopAdd(
    fd: number,
    cacheFd: number,
    size: number,
    blockSize: number,
    flags: number,
    present: Uint8Array,
    dirty: Uint8Array,
    index: number,
    logicalBlockSize: number,
    physicalBlockSize: number,
    unitShift: number,
  ): number;
  uloopRemove(fd: number, index: number): void;
  uloopAttach(fd: number, index: number): void;
  uloopQuery(fd: number, index: number): UloopInfo;
  uloopBarrierBits(fd: number, id: number, present: Uint8Array, dirty: Uint8Array): void;
  uloopEpochBegin(fd: number, dirty: Uint8Array): number;
  uloopEpochCommit(fd: number, epoch: number, flushed: Uint8Array): number;
  uloopClearError(fd: number, dropped: Uint8Array): { error: number; dropped: number };
  uloopBlocks(fd: number, op: number, first: number, count: number, bits: Uint8Array, id: number): { done: number; id: number };
  uloopReply(fd: number, id: number, error: number): void;
  uloopCredit(fd: number, limit: number, on: boolean): { limit: number; unasked: number };
  uloopBarrier(fd: number, flags: number): Promise<number>;
  uloopWatch(fd: number, cb: OnMessages): object;
  uloopUnwatch(handle: object): void;
}

const binding = addon<UloopBinding>();
const abi = binding.uloopAbi;

/** ULOOP_ABI_VERSION the addon was built for; ADD and ATTACH carry it, the module checks it. */
export const ULOOP_ABI_VERSION = abi.ABI_VERSION;
/** The control device: /dev/uloop-control. */
export const ULOOP_CONTROL = `/dev/${abi.CONTROL_NAME}`;
/** uloop_add.index: any free N. */
export const ULOOP_INDEX_ANY = abi.INDEX_ANY;
/** Blocks per CLAIM and EVICT call. */
export const ULOOP_MAX_RANGE_BLOCKS = abi.MAX_RANGE_BLOCKS;
/** uloop_add.flags: writes allowed; without it the device is read-only. */
export const ULOOP_F_WRITEBACK = abi.F_WRITEBACK;
/** uloop_add.flags: point-in-time flush epochs (PRESERVE upcalls). */
export const ULOOP_F_PRESERVE = abi.F_PRESERVE;
/** uloop_add.flags: DISCARD and WRITE_ZEROES as ZERO upcalls; dirty-not-present zero blocks. */
export const ULOOP_F_ZERO = abi.F_ZERO;
/** uloop_add.flags: per-unit accessed bits (ACCESSED). */
export const ULOOP_F_ACCESSED = abi.F_ACCESSED;
/** uloop_add.flags: scan the partition table after ADD. */
export const ULOOP_F_PARTSCAN = abi.F_PARTSCAN;
/** ULOOP_FEAT_* bits of GET_FEATURES. */
export const ULOOP_FEAT = {
  COUNTERS: abi.FEAT_COUNTERS,
  STICKY_ERROR: abi.FEAT_STICKY_ERROR,
  IO_TIMEOUT: abi.FEAT_IO_TIMEOUT,
  PRESERVE: abi.FEAT_PRESERVE,
  ZERO: abi.FEAT_ZERO,
  CLAIM: abi.FEAT_CLAIM,
  EVICT: abi.FEAT_EVICT,
  ACCESSED: abi.FEAT_ACCESSED,
  PARTITIONS: abi.FEAT_PARTITIONS,
  SECTOR_SIZE: abi.FEAT_SECTOR_SIZE,
  REPLY_CHECK: abi.FEAT_REPLY_CHECK,
  CREDIT: abi.FEAT_CREDIT,
  BARRIER: abi.FEAT_BARRIER,
} as const;
/** uloop_info.state bits. */
export const ULOOP_STATE = { EPOCH_OPEN: abi.STATE_EPOCH_OPEN, EPOCH_FAILED: abi.STATE_EPOCH_FAILED, SCANNING: abi.STATE_SCANNING } as const;
/** Fill the range from the source (enum uloop_msg_type). */
export const ULOOP_MSG_MISS = abi.MSG_MISS;
/** Persist the blocks dirty before the kernel overwrites them. */
export const ULOOP_MSG_INTENT = abi.MSG_INTENT;
/** Fetch and persist the bits set since the last barrier. */
export const ULOOP_MSG_BARRIER = abi.MSG_BARRIER;
/** Copy the epoch's version of the blocks aside before they change. */
export const ULOOP_MSG_PRESERVE = abi.MSG_PRESERVE;
/** Record the blocks durably as dirty zeros. */
export const ULOOP_MSG_ZERO = abi.MSG_ZERO;
/** Make room for the missing blocks a write covers whole past CREDIT's limit. */
export const ULOOP_MSG_ROOM = abi.MSG_ROOM;
/** ZERO from a DISCARD (else WRITE_ZEROES) / the caller asked to keep the space. */
export const ULOOP_MSG_F_DISCARD = abi.MSG_F_DISCARD;
export const ULOOP_MSG_F_NOUNMAP = abi.MSG_F_NOUNMAP;

const MAX_INDEX = 2 ** 20 - 1;
const MAX_BLOCK = 2 ** 36;

/** A non-blocking fd of /dev/uloop-control (NativeError ENOENT without the module). */
export function uloopOpen(): number {
  return binding.uloopOpen();
}

/** GET_FEATURES: the module's ABI version and ULOOP_FEAT_* bits (any control fd). */
export function uloopGetFeatures(fd: number): UloopFeatures {
  validateFd(fd);
  return binding.uloopGetFeatures(fd);
}

/** What ADD takes beyond the cache file and the bitmaps (struct uloop_add). */
export interface UloopAddOptions {
  /** Bytes, a multiple of logicalBlockSize. */
  size: number;
  /** Cache block size in bytes: a power of two, 4 KiB .. 1 MiB. */
  blockSize: number;
  /** ULOOP_F_*. */
  flags: number;
  /** The N of /dev/uloopN wanted; ULOOP_INDEX_ANY (default) for any. */
  index?: number;
  /** The device's logical sector: 512 (default), 1024, 2048 or 4096. */
  logicalBlockSize?: number;
  /** Physical sector; 0 lets the module pick. */
  physicalBlockSize?: number;
  /** ULOOP_F_ACCESSED: a unit is 2^unitShift blocks. */
  unitShift?: number;
}

/**
 * ADD: creates /dev/uloopN over the cache file and attaches `fd` to it as its daemon; returns N.
 * `present` and `dirty` hold the whole-device bitmaps (ceil(blocks / 8) bytes at least).
 */
export function uloopAdd(fd: number, cacheFd: number, o: UloopAddOptions, present: Uint8Array, dirty: Uint8Array): number {
  validateFd(fd);
  validateFd(cacheFd);
  validateInteger(o.size, 'size', 512);
  validateInteger(o.blockSize, 'blockSize', 4096, 2 ** 20);
  validateInteger(o.flags, 'flags', 0, 0xffffffff);
  validateBytes(present, 'present');
  validateBytes(dirty, 'dirty');
  const need = Math.ceil(Math.ceil(o.size / o.blockSize) / 8);
  if (present.byteLength < need) throw outOfRange('present.byteLength', `>= ${need}`, present.byteLength);
  if (dirty.byteLength < need) throw outOfRange('dirty.byteLength', `>= ${need}`, dirty.byteLength);
  const index = o.index ?? ULOOP_INDEX_ANY;
  if (index !== ULOOP_INDEX_ANY) validateInteger(index, 'index', 0, MAX_INDEX);
  const lbs = o.logicalBlockSize ?? 512;
  validateInteger(lbs, 'logicalBlockSize', 512, 4096);
  validateInteger(o.physicalBlockSize ?? 0, 'physicalBlockSize', 0, 2 ** 20);
  validateInteger(o.unitShift ?? 0, 'unitShift', 0, 20);
  return binding.uloopAdd(fd, cacheFd, o.size, o.blockSize, o.flags, present, dirty, index, lbs, o.physicalBlockSize ?? 0, o.unitShift ?? 0);
}

/** Removes /dev/uloopN (EBUSY while it is open). */
export function uloopRemove(fd: number, index: number): void {
  validateFd(fd);
  validateInteger(index, 'index', 0, MAX_INDEX + 1);
  binding.uloopRemove(fd, index);
}

/** Attaches `fd` to an existing /dev/uloopN as its daemon (a restarted daemon). */
export function uloopAttach(fd: number, index: number): void {
  validateFd(fd);
  validateInteger(index, 'index', 0, MAX_INDEX + 1);
  binding.uloopAttach(fd, index);
}

/** QUERY: the state and counters of /dev/uloopN (NativeError ENODEV if there is none). */
export function uloopQuery(fd: number, index: number): UloopInfo {
  validateFd(fd);
  validateInteger(index, 'index', 0, MAX_INDEX + 1);
  return binding.uloopQuery(fd, index);
}

/**
 * CREDIT (ULOOP_FEAT_CREDIT): at most `limit` blocks (an integer >= 0) written whole while missing
 * without asking; past it a write sends a ROOM upcall first. `limit` -1 lifts the limit. Returns
 * the limit now set (-1: none) and the kernel's unasked blocks. NativeError EINVAL: a limit above
 * the device's blocks.
 */
export function uloopCredit(fd: number, limit: number): { limit: number; unasked: number } {
  validateFd(fd);
  validateInteger(limit, 'limit', -1, MAX_BLOCK);
  return binding.uloopCredit(fd, Math.max(0, limit), limit >= 0);
}

/**
 * BARRIER (ULOOP_FEAT_BARRIER): the kernel takes its pending blocks, syncs the cache file and, if
 * it took any, sends a BARRIER upcall that this process's event loop answers; resolves with the
 * blocks handed over (0: none). Runs on a worker thread; touches no page cache (a FLUSH of the
 * device writes its page cache back first). `flags` must be 0 (the kernel refuses others:
 * EINVAL). Rejects with a NativeError: EIO (sticky error, failed sync, error answer), EINTR.
 */
export function uloopBarrier(fd: number, flags = 0): Promise<number> {
  validateFd(fd);
  validateInteger(flags, 'flags', 0, 0xffffffff);
  return binding.uloopBarrier(fd, flags);
}

/** BARRIER_BITS: the present and dirty bits barrier `id` carries, into the two buffers. */
export function uloopBarrierBits(fd: number, id: number, present: Uint8Array, dirty: Uint8Array): void {
  validateFd(fd);
  validateInteger(id, 'id', 1);
  validateBytes(present, 'present');
  validateBytes(dirty, 'dirty');
  binding.uloopBarrierBits(fd, id, present, dirty);
}

/** EPOCH_BEGIN: the kernel's dirty bitmap into `dirty`; the kernel records writes from now on. */
export function uloopEpochBegin(fd: number, dirty: Uint8Array): number {
  validateFd(fd);
  validateBytes(dirty, 'dirty');
  return binding.uloopEpochBegin(fd, dirty);
}

/** EPOCH_COMMIT: narrows `flushed` in place to the blocks the kernel cleaned; returns their count. */
export function uloopEpochCommit(fd: number, epoch: number, flushed: Uint8Array): number {
  validateFd(fd);
  validateInteger(epoch, 'epoch', 1);
  validateBytes(flushed, 'flushed');
  return binding.uloopEpochCommit(fd, epoch, flushed);
}

/**
 * CLEAR_ERROR: the kernel syncs the cache file again (NativeError EIO: still failing, nothing
 * changed), drops the blocks set aside at the failed sync (their bits into `dropped`, a
 * whole-device bitmap, or an empty buffer) and serves writes again. `error` is the error it
 * cleared (0: none was set).
 */
export function uloopClearError(fd: number, dropped: Uint8Array): { error: number; dropped: number } {
  validateFd(fd);
  validateBytes(dropped, 'dropped');
  return binding.uloopClearError(fd, dropped);
}

const BLOCK_OPS = { claim: 0, filled: 1, evict: 2, accessed: 3, release: 4 } as const;

function blocksCall(fd: number, op: keyof typeof BLOCK_OPS, first: number, count: number, bits: Uint8Array, id: number): { done: number; id: number } {
  validateFd(fd);
  validateInteger(first, 'first', 0, MAX_BLOCK);
  validateInteger(count, 'count', 1, ULOOP_MAX_RANGE_BLOCKS);
  validateBytes(bits, 'bits');
  if (op !== 'release' && bits.byteLength < Math.ceil(count / 8)) throw outOfRange('bits.byteLength', `>= ${Math.ceil(count / 8)}`, bits.byteLength);
  validateInteger(id, 'id', 0);
  return binding.uloopBlocks(fd, BLOCK_OPS[op], first, count, bits, id);
}

/**
 * CLAIM: of blocks [first, first + count), those neither present, dirty nor busy are claimed for
 * a fill (requests touching them wait); they are returned in `bits` (bit i: block first + i).
 * `id` 0 when none was free.
 */
export function uloopClaim(fd: number, first: number, count: number, bits: Uint8Array): { id: number; done: number } {
  return blocksCall(fd, 'claim', first, count, bits, 0);
}

/** FILLED: ends claim `id`; the blocks set in `bits` become present, the others are let go. */
export function uloopFilled(fd: number, id: number, first: number, count: number, bits: Uint8Array): number {
  validateInteger(id, 'id', 1);
  return blocksCall(fd, 'filled', first, count, bits, id).done;
}

/**
 * EVICT: of the blocks set in `bits`, those present and clean stop being served; `bits` says which.
 * `pinned` (ULOOP_FEAT_BARRIER): also blocks in the range of requests still preparing (a last
 * resort: they may have been filled for that request).
 */
export function uloopEvict(fd: number, first: number, count: number, bits: Uint8Array, pinned = false): number {
  return blocksCall(fd, 'evict', first, count, bits, pinned ? abi.EVICT_F_PINNED : 0).done;
}

/**
 * uloopEvict with ULOOP_EVICT_F_HOLD (ULOOP_FEAT_BARRIER): the evicted blocks stay busy as a claim
 * until uloopFilled(fd, id, first, count, none set) lets them go, after the punch. Returns their
 * count and the claim's id (0: none evicted). NativeError EAGAIN: 64 claims outstanding.
 */
export function uloopEvictHeld(fd: number, first: number, count: number, bits: Uint8Array, pinned = false): { done: number; id: number } {
  return blocksCall(fd, 'evict', first, count, bits, (pinned ? abi.EVICT_F_PINNED : 0) | abi.EVICT_F_HOLD);
}

/** ACCESSED: the accessed bits of units [first, first + count) into `bits`, cleared in the kernel. */
export function uloopAccessed(fd: number, first: number, count: number, bits: Uint8Array): number {
  return blocksCall(fd, 'accessed', first, count, bits, 0).done;
}

/** EPOCH_RELEASE: the flusher has read blocks [first, first + count) of `epoch`: no PRESERVE for them. */
export function uloopEpochRelease(fd: number, epoch: number, first: number, count: number): void {
  validateInteger(epoch, 'epoch', 1);
  blocksCall(fd, 'release', first, count, new Uint8Array(0), epoch);
}

/** Answers message `id`: 0, or a negative errno that fails the request. */
export function uloopReply(fd: number, id: number, error = 0): void {
  validateFd(fd);
  validateInteger(id, 'id', 1);
  validateInteger(error, 'error', -4095, 0);
  binding.uloopReply(fd, id, error);
}

// A watch dropped without close() would leave a poll on an fd its owner may close and reuse: the
// finalizer stops it then. It cannot run while the callback holds the watch, which is fine: the
// watch is reachable then.
const unwatchLost = new FinalizationRegistry<object>((handle) => binding.uloopUnwatch(handle));

/**
 * The request channel of a control fd, watched on the event loop: `onMessages` gets every batch of
 * whole messages read when the fd turns readable, or the error that stopped the watch. The fd
 * stays the caller's: close() the watch once, before closing the fd.
 */
export class UloopWatch {
  #handle: object | null;

  constructor(fd: number, onMessages: OnMessages) {
    validateFd(fd);
    if (typeof onMessages !== 'function') throw invalidArgType('onMessages', 'of type function', onMessages);
    this.#handle = binding.uloopWatch(fd, onMessages);
    unwatchLost.register(this, this.#handle, this);
  }

  /** Stops the poll and releases it; idempotent. The fd may be closed once this returns. */
  close(): void {
    const handle = this.#handle;
    if (!handle) return;
    this.#handle = null;
    unwatchLost.unregister(this);
    binding.uloopUnwatch(handle);
  }
}
