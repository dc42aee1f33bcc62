// The uloop control device (native/uloop.cc over kernel/include/uapi/uloop.h). Synchronous
// ioctls; the request channel is watched on the event loop (uv_poll) and delivers whole messages.
// The ABI's constants come from the addon, which is compiled against the uapi header: they are
// never retyped here.
import { addon, invalidArgType, NativeError, outOfRange, validateBytes, validateFd, validateInteger } from './addon.js';

export interface UloopMessage {
  /** Unique per device while outstanding; the reply carries it back. */
  id: number;
  /** ULOOP_MSG_MISS, ULOOP_MSG_INTENT or ULOOP_MSG_BARRIER. */
  type: number;
  /** Bytes into the device (block-aligned). */
  offset: number;
  /** Bytes (block-aligned); for a barrier, the bitmap length. */
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

/** The #defines and enum values of uloop.h, as the addon was compiled against them. */
interface UloopAbi {
  ABI_VERSION: number;
  CONTROL_NAME: string;
  INDEX_ANY: number;
  F_WRITEBACK: number;
  MSG_MISS: number;
  MSG_INTENT: number;
  MSG_BARRIER: number;
}

type OnMessages = (err: NativeError | null, msgs: UloopMessage[]) => void;

interface UloopBinding {
  uloopAbi: UloopAbi;
  uloopOpen(): number;
  uloopAdd(fd: number, cacheFd: number, size: number, blockSize: number, flags: number, present: Uint8Array, dirty: Uint8Array, index: number): number;
  uloopRemove(fd: number, index: number): void;
  uloopAttach(fd: number, index: number): void;
  uloopQuery(fd: number, index: number): UloopInfo;
  uloopBarrierBits(fd: number, id: number, present: Uint8Array, dirty: Uint8Array): void;
  uloopEpochBegin(fd: number, dirty: Uint8Array): number;
  uloopEpochCommit(fd: number, epoch: number, flushed: Uint8Array): number;
  uloopReply(fd: number, id: number, error: number): void;
  uloopWatch(fd: number, cb: OnMessages): object;
  uloopUnwatch(handle: object): void;
}

const binding = addon<UloopBinding>();
const abi = binding.uloopAbi;

/** ULOOP_ABI_VERSION the addon was built for; ADD and ATTACH carry it, the module checks it. */
export const ULOOP_ABI_VERSION = abi.ABI_VERSION;
/** The control device: /dev/uloop-control. */
export const ULOOP_CONTROL = `/dev/${abi.CONTROL_NAME}`;
/** uloop_add.flags: writes allowed; without it the device is read-only. */
export const ULOOP_F_WRITEBACK = abi.F_WRITEBACK;
/** Fill the range from the source (enum uloop_msg_type). */
export const ULOOP_MSG_MISS = abi.MSG_MISS;
/** Persist the blocks dirty before the kernel overwrites them. */
export const ULOOP_MSG_INTENT = abi.MSG_INTENT;
/** Fetch and persist the bits set since the last barrier. */
export const ULOOP_MSG_BARRIER = abi.MSG_BARRIER;

const MAX_INDEX = 2 ** 20 - 1;

/** A non-blocking fd of /dev/uloop-control (NativeError ENOENT without the module). */
export function uloopOpen(): number {
  return binding.uloopOpen();
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
  validateInteger(index, 'index', -1, MAX_INDEX);
  return binding.uloopAdd(fd, cacheFd, size, blockSize, flags, present, dirty, index);
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

export function uloopQuery(fd: number, index: number): UloopInfo {
  validateFd(fd);
  validateInteger(index, 'index', 0, MAX_INDEX + 1);
  return binding.uloopQuery(fd, index);
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
