// What a kernel frontend that serves hits itself asks of its daemon (kernel/include/uapi/uloop.h,
// "the request channel"): fill a miss, make blocks durably dirty before the kernel overwrites them
// (an intent), record the bits a FLUSH's barrier hands over, keep an epoch's version of blocks
// about to change (preserve), record blocks as zeroed. One unit, driven by a frontend that reads
// the kernel's messages and writes its replies: /dev/uloopN (src/bdev/uloop.ts) today, another
// kernel frontend later. It never rejects: every upcall ends in 0 or a negative errno, which the
// frontend sends back, and a failure is logged once (see FailureLog), never thrown at the event
// loop: one failed miss must fail that request only, not the daemon (docs/design.md).
import { constants } from 'node:os';
import type { Logger } from 'pino';
import { Bitmap } from '../cache/bitmap.js';
import type { CacheEngine } from '../cache/engine.js';
import type { Extent } from '../cache/layout.js';
import { InternalError, InvalidArgumentError, ReadOnlyError } from '../errors.js';

/** The kinds of upcall, as the frontend decoded them from its kernel's messages. */
export type UpcallType = 'miss' | 'intent' | 'barrier' | 'preserve' | 'zero' | 'room';

/** One upcall: bytes [offset, offset + length) of the device, block-aligned (the last block may end at the device's end). */
export interface Upcall {
  /** The kernel's message id (for the log and for barrierBits). */
  id: number;
  type: UpcallType;
  offset: number;
  length: number;
  /** preserve: the kernel's flush epoch whose version to keep. */
  epoch?: number;
}

/** What the handler needs from the frontend's kernel channel. */
export interface UpcallPort {
  /**
   * barrier: the blocks the kernel hands over with barrier `id` (written whole while missing and
   * synced by the kernel before it asked), as a whole-device bitmap.
   */
  barrierBlocks(id: number): Bitmap;
  /**
   * preserve: keeps the flushing epoch's version of blocks [first, end) before the kernel lets
   * them change. Resolves when the copy is taken (or not needed: the epoch has ended).
   */
  preserve?(epoch: number, first: number, end: number): Promise<void>;
  /**
   * room: makes room in the budget for `blocks` more blocks the kernel will write whole while
   * missing, and raises its credit by them (kernelCredit's room). Absent without a budget: the
   * answer is then immediate (there is no limit to raise).
   */
  room?(blocks: number): Promise<void>;
  /**
   * barrier: `blocks` blocks the kernel wrote unasked are recorded in the store now (kernelCredit's
   * handedOver: they used up that much of its credit). Absent: they are taken off
   * store.outsideBlocks (the frontend's next look sets the exact count).
   */
  handedOver?(blocks: number): void;
  /**
   * intent (/dev/ublkbN with a budget): `blocks` blocks of the INTENT that the store did not hold
   * (the frontend wrote them whole while missing, within its credit) are recorded present and
   * dirty now, before the answer (kernelCredit's handedOver). Absent: nothing is told.
   */
  intentRecorded?(blocks: number): void;
}

export interface UpcallHandlerOptions {
  engine: CacheEngine;
  port: UpcallPort;
  logger: Logger;
  /** For the log lines: /dev/uloop0. */
  device: string;
}

/** The negative errno the kernel gets for an error thrown by a handler (the cause chain is searched). */
export function replyErrno(err: unknown): number {
  if (err instanceof ReadOnlyError) return -constants.errno.EROFS;
  if (err instanceof InvalidArgumentError) return -constants.errno.EINVAL;
  let e: unknown = err;
  for (let depth = 0; e && typeof e === 'object' && depth < 8; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && code in constants.errno) {
      const n = constants.errno[code as keyof typeof constants.errno];
      if (n > 0 && n < 4096) return -n;
    }
    e = (e as { cause?: unknown }).cause;
  }
  return -constants.errno.EIO;
}

/**
 * One log line per kind of failure, then silence: the same (what, message) again within
 * `quietMs` is counted, and the count is told with the next line of that kind after the quiet
 * time. A dead disk failing every miss writes a line every minute, not one per request.
 */
export class FailureLog {
  readonly #seen = new Map<string, { at: number; suppressed: number }>();
  readonly #logger: Logger;
  readonly #quietMs: number;

  constructor(logger: Logger, quietMs = 60_000) {
    this.#logger = logger;
    this.#quietMs = quietMs;
  }

  /** Logs `line` at warn level unless the same key was logged less than quietMs ago. */
  warn(key: string, line: string, fields: Record<string, unknown> = {}): void {
    const now = Date.now();
    const seen = this.#seen.get(key);
    if (seen && now - seen.at < this.#quietMs) {
      seen.suppressed++;
      return;
    }
    const more = seen?.suppressed ? ` (and ${seen.suppressed} more like it since the last line)` : '';
    this.#seen.set(key, { at: now, suppressed: 0 });
    if (this.#seen.size > 256) this.#seen.delete(this.#seen.keys().next().value!);
    this.#logger.warn(fields, `${line}${more}`);
  }
}

/**
 * Runs upcalls against the engine and its store. Upcalls run concurrently, as the kernel sends
 * them; the kernel keeps the blocks of each one busy until it is answered, so two upcalls never
 * cover the same block, except a preserve, which covers blocks no other upcall holds.
 */
export class UpcallHandler {
  readonly #engine: CacheEngine;
  readonly #port: UpcallPort;
  readonly #failures: FailureLog;
  readonly #device: string;
  readonly #inFlight = new Set<Promise<number>>();
  /** Barriers being recorded: a ZERO read after one waits for it (uloop.h, ULOOP_MSG_BARRIER). */
  readonly #barriers = new Set<Promise<unknown>>();

  constructor(options: UpcallHandlerOptions) {
    this.#engine = options.engine;
    this.#port = options.port;
    this.#failures = new FailureLog(options.logger);
    this.#device = options.device;
  }

  /** Upcalls started and not yet finished. */
  get inFlight(): number {
    return this.#inFlight.size;
  }

  /** Runs one upcall: resolves with 0 or a negative errno for the reply; never rejects. */
  run(u: Upcall): Promise<number> {
    // Records of a block in message order: a barrier's markPresent before a later ZERO's punch
    // (a barrier that timed out in the kernel puts its blocks back, and a ZERO of one may follow).
    const before = u.type === 'zero' && this.#barriers.size > 0 ? Promise.allSettled([...this.#barriers]) : null;
    const work = before ? before.then(() => this.#run(u)) : this.#run(u);
    if (u.type === 'barrier') {
      const done = work.catch(() => undefined);
      this.#barriers.add(done);
      void done.finally(() => this.#barriers.delete(done));
    }
    const p: Promise<number> = work.then(
      () => 0,
      (err: unknown) => {
        const errno = replyErrno(err);
        const msg = (err as Error)?.message ?? String(err);
        // One line per kind of upcall and errno: the messages differ by offset.
        this.#failures.warn(`${u.type}:${errno}`, `${this.#device}: ${u.type} of ${u.length} bytes at ${u.offset} failed (${errnoName(errno)} to the kernel): ${msg}`, {
          upcall: u.type,
          offset: u.offset,
          length: u.length,
        });
        return errno;
      },
    );
    this.#inFlight.add(p);
    void p.finally(() => this.#inFlight.delete(p));
    return p;
  }

  /** Resolves once every upcall started before the call has finished. */
  async drain(): Promise<void> {
    await Promise.all([...this.#inFlight]);
  }

  async #run(u: Upcall): Promise<void> {
    const engine = this.#engine;
    const store = engine.store;
    const { blockSize } = engine.geometry;
    const first = Math.floor(u.offset / blockSize);
    const end = Math.ceil((u.offset + u.length) / blockSize);
    const range: Extent[] = [{ start: first, count: end - first }];
    switch (u.type) {
      case 'miss':
        // A zeroed block (ULOOP_F_ZERO: dirty, not present) gets its zeros written into the cache
        // file, synced and recorded present before the answer: the kernel reads the file from then
        // on, and the store must never hold it zero while the kernel serves it (a partial write
        // plus FLUSH would be lost in a crash; uapi-changes, CLEAR_ERROR's known gap).
        if (store.dirty.nextSet(first, end) < end && store.present.nextClear(first, end) < end) await engine.materializeZeroed(first, end);
        // Fills the cache file and answers before the sync (rule 1): the kernel sets its present
        // bit now, the store's only after the engine's commit synced the fill.
        await engine.prefetch(u.offset, u.length);
        return;
      case 'intent': {
        // The kernel counts a block present once its MISS is answered, but the store only after
        // the commit that synced the fill (and not at all if the daemon that filled it died
        // before that commit): a dirty bit must never be durable over unsynced fill data
        // (invariant 1), so the fill is synced first.
        let unheld = 0;
        if (!store.present.allSet(first, end)) {
          await engine.flush();
          if (!store.present.allSet(first, end)) {
            unheld = end - first - store.present.count(first, end);
            await store.syncData();
          }
        }
        // Waits for a room flush on a full flash (bounded), as the engine's own first writes do.
        await engine.recordDirty(range, { skipDirty: true, waitForRoom: true });
        if (unheld > 0) this.#port.intentRecorded?.(unheld);
        return;
      }
      case 'barrier': {
        // The kernel synced the cache file before it asked: these blocks may be recorded.
        const blocks = this.#port.barrierBlocks(u.id);
        const runs = [...blocks.runs()];
        await engine.recordDirty(runs);
        // Counted as held outside the store (the kernel's pending count) until now: present here
        // from now on. The frontend's next look sets the exact count again.
        const handed = runs.reduce((n, e) => n + e.count, 0);
        if (this.#port.handedOver) this.#port.handedOver(handed);
        else if (store.outsideBlocks > 0) store.outsideBlocks -= handed;
        return;
      }
      case 'room':
        // A write covers missing blocks whole past the kernel's credit (ULOOP_MSG_ROOM): it waits
        // until the budget has room for them, as a fill waits (evicting, flushing: back-pressure).
        // ULOOP_FEAT_BARRIER: `epoch` carries their count (the range is their span, and the
        // kernel grants exactly the count); an older module sends the span alone.
        if (this.#port.room) await this.#port.room(u.epoch && u.epoch > 0 ? Math.min(u.epoch, end - first) : end - first);
        return;
      case 'preserve': {
        if (!this.#port.preserve) throw new InternalError('a PRESERVE upcall from a device added without ULOOP_F_PRESERVE');
        await this.#port.preserve(u.epoch ?? 0, first, end);
        return;
      }
      case 'zero':
        // DISCARD or WRITE_ZEROES of whole blocks (ULOOP_F_ZERO): the store's zeroed blocks, the
        // same bits as the kernel's (dirty, not present). engine.zero commits staged fills of
        // them first, records them durably, and with a budget syncs the bitmap and punches;
        // the kernel then serves them as zeros and the flusher writes zeros to the disk. A ZERO
        // sent again after a re-attach (its outcome unknown to the kernel) does the same again.
        if (engine.readOnly) throw new ReadOnlyError(`${this.#device} is attached read-only: a ZERO upcall cannot be recorded`);
        await engine.zero(u.offset, u.length);
        return;
    }
  }
}

function errnoName(errno: number): string {
  for (const [name, n] of Object.entries(constants.errno)) if (n === -errno) return name;
  return String(errno);
}
