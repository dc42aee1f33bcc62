// The ublk server of native/ublk.cc: /dev/ublkbN through the kernel's ublk_drv, one thread per hardware
// queue on its own io_uring serving hits from the cache file, upcalls to JS for what needs the store. This module
// validates arguments and owns the handle's lifetime (one stop per server).
import { InternalError } from '../errors.js';
import { addon, invalidArgType, validateBytes, validateInteger } from './addon.js';

/** /dev/ublk-control: present when ublk_drv is loaded. */
export const UBLK_CONTROL = '/dev/ublk-control';

/** UBLK_F_* bits of GET_FEATURES the server looks at. */
export const UBLK_F_USER_RECOVERY = 1 << 3;
export const UBLK_F_USER_RECOVERY_REISSUE = 1 << 4;
export const UBLK_F_USER_COPY = 1 << 7;
export const UBLK_F_AUTO_BUF_REG = 1 << 11;
export const UBLK_F_CMD_IOCTL_ENCODE = 1 << 6;

/** The largest range one claim() takes (native/ublk.cc Server::kMaxClaimBlocks). */
export const UBLK_MAX_CLAIM_BLOCKS = 8192;

/** Upcall types the queue thread sends (native/ublk.cc kUp*). */
export const UBLK_UP_MISS = 0;
export const UBLK_UP_INTENT = 1;
export const UBLK_UP_PRESERVE = 2;
/** A cache budget: a write needs room for `length / blockSize` blocks it writes whole while missing. */
export const UBLK_UP_ROOM = 3;

export interface UblkServerOptions {
  /** The cache file; served at the same offsets (the identity mapping). */
  cachePath: string;
  /** Device size in bytes, a multiple of 512. */
  size: number;
  /** Cache block size in bytes (a power of two ≥ 512). */
  blockSize: number;
  /** The disk's logical and physical sector sizes (bytes) the device presents. */
  logical: number;
  physical: number;
  /** Hardware queues, each with its own thread, io_uring, tags and buffers (1-16; the driver may give fewer). */
  queues: number;
  /** Tags (requests in flight) per queue. */
  depth: number;
  /** Largest request in bytes (per-tag buffer), a multiple of 4096. */
  bufBytes: number;
  readOnly: boolean;
  /**
   * RUN_DIR/ublkbN.recovering, written (fsynced) before START_USER_RECOVERY and removed once every
   * queue has fetched; a start that finds it deletes the device and adds it again instead of
   * recovering it. Omitted: no marker (a recovery killed part-way then needs `ublk del`).
   */
  recoveryMarker?: string;
  /**
   * A cache budget: log2 of the eviction unit in blocks (0-20). The server then keeps an accessed
   * bit per unit (accessed()), can evict (evict()), and holds its whole-block writes into missing
   * blocks to a credit (credit(), starting at 0: such a write asks for ROOM until the first call).
   * Omitted: none of it (evict, accessed and credit throw EOPNOTSUPP).
   */
  unitShift?: number;
}

/** One upcall: blocks [offset, offset + length) (bytes), an id to reply with. */
export interface UblkUpcall {
  id: number;
  /** UBLK_UP_MISS, _INTENT, _PRESERVE or _ROOM. */
  type: number;
  offset: number;
  length: number;
  /** PRESERVE: the epoch whose version to keep. */
  epoch: number;
}

export interface UblkCounts {
  presentBlocks: number;
  dirtyBlocks: number;
  readHits: number;
  readMisses: number;
  /** Reads put straight into the request's pages by IORING_OP_READ_FIXED (the zero-copy path), hits and filled misses. */
  zeroCopyReads: number;
  writeHits: number;
  writeUpcalls: number;
  flushes: number;
  ioErrors: number;
  /** Blocks evict() let go since create. */
  evictedBlocks: number;
  /** ROOM upcalls sent since create. */
  rooms: number;
  /** Blocks claimed now by unit fills (claim() until filled()). */
  claimedBlocks: number;
  /** Requests served by each hardware queue (FETCHes that brought one). */
  queueRequests: number[];
  /** Every queue's ring was made with IORING_SETUP_COOP_TASKRUN (5.19+; without it on a kernel that refuses it). False until serving. */
  coopTaskrun: boolean;
  /**
   * Completions a queue thread waiting for new requests waits for, at most batchWaitUs µs
   * ($ULOBDEV_UBLK_BATCH=K[,US], Linux 6.12+: IORING_FEAT_MIN_TIMEOUT). 1 (and batchWaitUs 0): one
   * completion, unbounded (the knob unset, a kernel without it, or not serving yet).
   */
  batchWait: number;
  /** The bound of the batched wait in µs; 0 when batchWait is 1. */
  batchWaitUs: number;
  /** Every queue thread is serving. */
  running: boolean;
  /** The errno that stopped a queue thread, or 0. */
  threadError: number;
  /** The first failed write or fdatasync of the cache file (a positive errno, sticky), or 0. */
  cacheError: number;
}

export interface UblkStarted {
  devId: number;
  /** Taken back from a dead daemon with UBLK_F_USER_RECOVERY (its queued I/O carried on). */
  recovered: boolean;
  /** A device of this number was left dead or half-recovered: deleted and added again (its queued I/O failed). */
  replaced: boolean;
  /** UBLK_CMD_GET_FEATURES of the running kernel (0: the command is older than this kernel). */
  features: number;
  /**
   * The device is served zero copy (added with UBLK_F_AUTO_BUF_REG and UBLK_F_USER_COPY, Linux
   * 6.16+): reads go from the cache file straight into the request's pages, the driver copies
   * nothing. False: through the server's buffers, which the driver copies (also a device taken
   * back from a daemon that added it without).
   */
  zeroCopy: boolean;
}

type Handle = object;
interface UblkBinding {
  ublkCreate(o: UblkServerOptions, present: Uint8Array, dirty: Uint8Array, onUpcall: (id: number, type: number, offset: number, length: number, epoch: number) => void): Handle;
  ublkStart(h: Handle, devId: number): Promise<UblkStarted>;
  ublkStop(h: Handle): Promise<void>;
  ublkReply(h: Handle, id: number, error: number): void;
  ublkEpochBegin(h: Handle, dirty: Uint8Array): number;
  ublkEpochCommit(h: Handle, epoch: number, flushed: Uint8Array): number;
  ublkQuery(h: Handle): UblkCounts;
  ublkTestHook(h: Handle, op: string, first: number, end: number): boolean;
  ublkAccessed(h: Handle, first: number, count: number, bits: Uint8Array): number;
  ublkEvict(h: Handle, first: number, count: number, bits: Uint8Array): number;
  ublkCredit(h: Handle, limit: number): { limit: number; unasked: number };
  ublkEvictDone(h: Handle, first: number, count: number): void;
  ublkGrant(h: Handle, n: number): number;
  ublkClaim(h: Handle, first: number, count: number, bits: Uint8Array): number;
  ublkFilled(h: Handle, id: number, first: number, count: number, bits: Uint8Array): void;
}
const b = addon<UblkBinding>();

/**
 * A ublk server over a cache file. `present` and `dirty` (the store's bitmaps, one bit per block)
 * say which blocks the queue thread may serve from the start; it keeps its own copy from then on.
 * start() adds /dev/ublkbN (or recovers it from a dead daemon) and serves it; stop() stops and
 * deletes it. Upcalls arrive on the event loop; each must be answered with reply().
 */
export class UblkServer {
  readonly #h: Handle;
  #stopped = false;
  #gone = false;
  #started = false;

  constructor(options: UblkServerOptions, present: Uint8Array, dirty: Uint8Array, onUpcall: (u: UblkUpcall) => void) {
    if (typeof options.cachePath !== 'string' || options.cachePath === '') throw invalidArgType('options.cachePath', 'a non-empty string', options.cachePath);
    if (options.recoveryMarker !== undefined && (typeof options.recoveryMarker !== 'string' || options.recoveryMarker === '')) {
      throw invalidArgType('options.recoveryMarker', 'a non-empty string', options.recoveryMarker);
    }
    validateInteger(options.size, 'options.size', 512);
    validateInteger(options.blockSize, 'options.blockSize', 512, 1 << 30);
    validateInteger(options.logical, 'options.logical', 512, 4096);
    validateInteger(options.physical, 'options.physical', 512, 1 << 30);
    validateInteger(options.queues, 'options.queues', 1, 16);
    validateInteger(options.depth, 'options.depth', 1, 4096);
    validateInteger(options.bufBytes, 'options.bufBytes', 4096, 1 << 30);
    if (options.unitShift !== undefined) validateInteger(options.unitShift, 'options.unitShift', 0, 20);
    validateBytes(present, 'present');
    validateBytes(dirty, 'dirty');
    this.#h = b.ublkCreate(options, present, dirty, (id, type, offset, length, epoch) => onUpcall({ id, type, offset, length, epoch }));
  }

  /**
   * Adds /dev/ublkb`devId` (-1: any free N) and serves it. Rejects with a NativeError (ENOENT: no
   * ublk_drv, EBUSY, EEXIST, EADDRINUSE: a leftover deleted but still open, ...).
   */
  async start(devId: number): Promise<UblkStarted> {
    validateInteger(devId, 'devId', -1, 1 << 20);
    if (this.#started) throw new InternalError('UblkServer.start: already started');
    this.#started = true;
    return b.ublkStart(this.#h, devId);
  }

  /** Stops the device (waits for I/O in flight), the queue thread, and deletes the device. Once. */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    try {
      await b.ublkStop(this.#h);
    } finally {
      this.#gone = true;
    }
  }

  /**
   * Answers upcall `id` with 0 or a negative errno. Answers keep flowing while stop() runs: STOP_DEV
   * waits for requests in flight, which may be waiting for exactly this answer.
   */
  reply(id: number, error: number): void {
    if (this.#gone) return;
    validateInteger(id, 'id', 0, 0xffffffff);
    validateInteger(error, 'error', -4095, 0);
    b.ublkReply(this.#h, id, error);
  }

  /** Opens a flush epoch: the dirty blocks now into `dirty`; returns the epoch. */
  epochBegin(dirty: Uint8Array): number {
    validateBytes(dirty, 'dirty');
    return b.ublkEpochBegin(this.#h, dirty);
  }

  /** Ends epoch `epoch`: narrows `flushed` to blocks not written since the begin and clears their dirty bits. Throws ESTALE. */
  epochCommit(epoch: number, flushed: Uint8Array): number {
    validateInteger(epoch, 'epoch', 1);
    validateBytes(flushed, 'flushed');
    return b.ublkEpochCommit(this.#h, epoch, flushed);
  }

  /**
   * A budget: the accessed bits of eviction units [first, first + count) ORed into `bits` (bit i:
   * unit first + i; at least count bits) and cleared in the server; returns how many were set. A
   * unit is accessed when a hit the server served (a read of present blocks, a write into dirty
   * ones) touched it. Throws RangeError past the last unit, EOPNOTSUPP without a budget.
   */
  accessed(first: number, count: number, bits: Uint8Array): number {
    validateInteger(first, 'first', 0);
    validateInteger(count, 'count', 0);
    validateBytes(bits, 'bits');
    return b.ublkAccessed(this.#h, first, count, bits);
  }

  /**
   * A budget: evicts the blocks set in `bits` (bit i: block first + i), narrowing `bits` in place
   * to those evicted; returns their count. Dirty blocks and blocks a request holds (a miss being
   * filled, a first write) or writes are refused; the rest stop being served, and the call returns
   * once no hit read of them is in flight (it blocks the event loop that long: reads of the cache
   * file). Only then may the store clear and punch them. The present blocks of a read waiting
   * for its MISS (not the oldest such read) are taken too: that read misses again. Throws
   * RangeError, EOPNOTSUPP, ETIMEDOUT (reads still in flight after 60 s: nothing evicted).
   */
  evict(first: number, count: number, bits: Uint8Array): number {
    validateInteger(first, 'first', 0);
    validateInteger(count, 'count', 0);
    validateBytes(bits, 'bits');
    return b.ublkEvict(this.#h, first, count, bits);
  }

  /**
   * A budget: blocks [first, first + count), which evict() returned, are cleared durably and
   * punched in the store (or it gave up on them): requests that waited on them go on (as misses).
   * Until then a request touching them waits: a whole-block write must not put data there that
   * the punch would remove.
   */
  evictDone(first: number, count: number): void {
    validateInteger(first, 'first', 0);
    validateInteger(count, 'count', 0);
    b.ublkEvictDone(this.#h, first, count);
  }

  /**
   * A budget: a ROOM for `n` blocks is answered (call it before the reply): they are counted in
   * the credit now, outside its limit, for the write that asked alone (a raised limit could be
   * taken by another write first). Returns the blocks counted (`unasked`).
   */
  grant(n: number): number {
    validateInteger(n, 'n', 0);
    return b.ublkGrant(this.#h, n);
  }

  /**
   * A budget: sets the credit's limit (blocks; -1: none) for blocks written whole while missing
   * before the store records them; returns it and the blocks counted against it now (`unasked`:
   * written or granted and not yet recorded, plus those of writes that failed after writing them).
   */
  credit(limit: number): { limit: number; unasked: number } {
    validateInteger(limit, 'limit', -1);
    return b.ublkCredit(this.#h, limit);
  }

  /**
   * A budget, the unit fill: CLAIM of blocks [first, first + count) (count at most
   * UBLK_MAX_CLAIM_BLOCKS). The blocks neither present, dirty, busy in a request (held, written,
   * evicting) nor claimed already are set in `bits` (bit i: block first + i; pass it zeroed) and
   * stay claimed until filled(): a request touching one waits, evict() refuses it. Returns the
   * claim's id (> 0), or 0 when no block was free. Throws EAGAIN (64 claims outstanding),
   * EOPNOTSUPP (no budget), RangeError.
   */
  claim(first: number, count: number, bits: Uint8Array): number {
    validateInteger(first, 'first', 0);
    validateInteger(count, 'count', 0, UBLK_MAX_CLAIM_BLOCKS);
    validateBytes(bits, 'bits');
    return b.ublkClaim(this.#h, first, count, bits);
  }

  /**
   * FILLED of claim `id` over its range: the claimed blocks set in `bits` become present (call it
   * only once their data is in the cache file and synced: invariant 1), the other claimed blocks
   * are let go, still missing; requests waiting on them go on. Throws ENOENT (no such claim),
   * EINVAL (not the claim's range, or a bit on a block it does not hold: nothing changes).
   */
  filled(id: number, first: number, count: number, bits: Uint8Array): void {
    validateInteger(id, 'id', 1);
    validateInteger(first, 'first', 0);
    validateInteger(count, 'count', 0);
    validateBytes(bits, 'bits');
    b.ublkFilled(this.#h, id, first, count, bits);
  }

  query(): UblkCounts {
    return b.ublkQuery(this.#h);
  }

  /**
   * Tests only: one block-state step a queue thread takes, on blocks [first, end), without a device
   * ('dirty': an answered INTENT; 'needs-preserve': whether a write there preserves first;
   * 'write-begin'/'write-end': a native write in flight; 'dirty-mid-copy': 'dirty' inside the next
   * epochBegin's copy; 'hold'/'unhold': a request holds [first, end) busy; 'parks': would a
   * request on [first, end) wait (held, claimed, or evicted and not yet punched); 'miss-waitK': a read
   * on slot K (0, 1) holds [first, end) waiting for its MISS; 'miss-answerK': its MISS is
   * answered, true when it must miss again (an eviction took blocks of its range); 'hit': a read hit of
   * queue 0 begins (true if present; counted for evict's wait), 'hit-end-in': it completes `end`
   * ms later on another thread; 'take-credit': a write's credit step, true when it needs ROOM;
   * 'take-credit-granted': the same after its ROOM for end - first blocks was granted;
   * 'intent-answered': end - first blocks leave the credit). Returns the answer of
   * 'needs-preserve', 'parks', 'miss-answerK', 'hit' or 'take-credit', else false.
   */
  testHook(
    op: 'dirty' | 'needs-preserve' | 'write-begin' | 'write-end' | 'dirty-mid-copy' | 'hold' | 'unhold' | 'miss-wait0' | 'miss-wait1' | 'miss-answer0' | 'miss-answer1' | 'parks' | 'hit' | 'hit-end-in' | 'take-credit' | 'take-credit-granted' | 'intent-answered',
    first: number,
    end: number,
  ): boolean {
    return b.ublkTestHook(this.#h, op, first, end);
  }
}
