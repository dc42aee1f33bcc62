// The backing disk's state as `status` shows it: ok, failing (its last I/O failed), gone (it was
// removed, or its transport is down) or stuck (an I/O sent to it has not come back for
// STUCK_AFTER_MS: a hung disk or transport), with the last error and when it happened. Learnt from every
// read (misses, hydration) and write and sync (flushes) that reach the disk, and for a block device
// from sysfs at each look, so a removed disk shows as gone even while nothing reads it. Nothing here
// touches the disk: a sleeping disk stays asleep.
import { wrapSource, type Source, type WritableSource } from './source.js';
import type { BlockFile } from '../storage/storage.js';
import { nameUnknownErrno, systemErrorCode } from '../errno.js';

export type DiskState = 'ok' | 'failing' | 'gone' | 'stuck';

export interface DiskHealthStatus {
  state: DiskState;
  /** The last I/O error of the disk (kept after it recovers), or null. */
  lastError: string | null;
  /** When it happened, ms since the epoch, or null. */
  lastErrorAt: number | null;
  /** I/O errors since the daemon started. */
  errors: number;
  /** Seconds the oldest I/O still waiting on the disk has waited, or null when none waits. */
  waitingSeconds: number | null;
}

/**
 * An I/O of the disk still waiting after this long makes the state `stuck`. Longer than a spin-up
 * from standby (up to about 10 s for a 3.5" disk), so a sleeping disk woken by a miss is not
 * called stuck.
 */
export const STUCK_AFTER_MS = 15_000;

/**
 * errno names meaning the disk (or the transport to it) is no longer there, rather than that one
 * request failed: the device was removed (ENODEV, ENXIO), its medium taken out (ENOMEDIUM), or its
 * connection is down (ENOTCONN, ESHUTDOWN: a network or FUSE-backed disk), or a file handle went
 * stale (ESTALE).
 */
const GONE_CODES = new Set(['ENODEV', 'ENXIO', 'ENOMEDIUM', 'ENOTCONN', 'ESHUTDOWN', 'ESTALE']);

export class DiskHealth {
  #state: DiskState = 'ok';
  #lastError: string | null = null;
  #lastErrorAt: number | null = null;
  #errors = 0;
  /** Start times (ms) of the I/Os sent to the disk and not yet returned, by a token each. */
  readonly #waiting = new Map<symbol, number>();
  readonly #present: (() => boolean) | undefined;

  /**
   * `present`, if given, says whether the disk still exists without touching it (Source.present:
   * a block device's sysfs entry); false makes the state gone.
   */
  constructor(options: { present?: () => boolean } = {}) {
    this.#present = options.present;
  }

  /** An I/O of the disk succeeded: it is back, whatever failed before. */
  succeeded(): void {
    this.#state = 'ok';
  }

  /** An I/O of the disk failed with `err`. */
  failed(err: unknown): void {
    const e = err as { code?: unknown; message?: unknown };
    this.#state = GONE_CODES.has(systemErrorCode(err) ?? '') ? 'gone' : 'failing';
    this.#lastError = nameUnknownErrno(typeof e?.message === 'string' ? e.message : String(err), err);
    this.#lastErrorAt = Date.now();
    this.#errors++;
  }

  /**
   * The state now. Never waits for the disk: an I/O that has not returned for STUCK_AFTER_MS makes
   * it `stuck` (learnt from the I/Os in flight, not from asking the disk).
   */
  status(now = Date.now()): DiskHealthStatus {
    let state = this.#state;
    let oldest = Infinity;
    for (const t of this.#waiting.values()) oldest = Math.min(oldest, t);
    const waitedMs = oldest === Infinity ? null : Math.max(0, now - oldest);
    if (waitedMs !== null && waitedMs >= STUCK_AFTER_MS) state = 'stuck';
    if (this.#present && !this.#present()) state = 'gone';
    return { state, lastError: this.#lastError, lastErrorAt: this.#lastErrorAt, errors: this.#errors, waitingSeconds: waitedMs === null ? null : Math.floor(waitedMs / 1000) };
  }

  /** `io`, counted as waiting on the disk from now until it settles. */
  #timed<T>(io: () => Promise<T>): Promise<T> {
    const token = Symbol('io');
    this.#waiting.set(token, Date.now());
    let p: Promise<T>;
    try {
      p = io();
    } catch (err) {
      this.#waiting.delete(token);
      throw err;
    }
    return p.finally(() => this.#waiting.delete(token));
  }

  /**
   * `source` with every read, write, zero and sync that reaches the disk reported here (the
   * daemon's view of the disk); every other method is the source's own (wrapSource).
   */
  watch<S extends Source>(source: S): S {
    const track = async <T>(io: () => Promise<T>): Promise<T> => {
      try {
        const r = await this.#timed(io);
        this.succeeded();
        return r;
      } catch (err) {
        this.failed(err);
        throw err;
      }
    };
    const w = source as unknown as WritableSource; // its write methods are overridden only where it has them
    return wrapSource(source, {
      readAt: (buf, position) => track(() => source.readAt(buf, position)),
      // A fill's read and cache write in one request: only the read side is the disk's.
      copyInto: async (into, buf, position, intoPosition) => {
        try {
          await this.#timed(() => source.copyInto!(into, buf, position, intoPosition));
          this.succeeded();
        } catch (err) {
          if ((err as { syscall?: string }).syscall !== 'pwrite') this.failed(err);
          throw err;
        }
      },
      streamInto: async (into, buf, position, intoPosition, length) => {
        try {
          await this.#timed(() => source.streamInto!(into, buf, position, intoPosition, length));
          this.succeeded();
        } catch (err) {
          if ((err as { syscall?: string }).syscall !== 'pwrite') this.failed(err);
          throw err;
        }
      },
      writeAt: (buf, position) => track(() => w.writeAt(buf, position)),
      writeMany: (buf, pieces) => track(() => w.writeMany!(buf, pieces)),
      // A flush batch's cache reads and disk writes in one request: only the write side is the disk's.
      writeManyFrom: async (from: BlockFile, buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>) => {
        try {
          await this.#timed(() => w.writeManyFrom!(from, buf, pieces));
          this.succeeded();
        } catch (err) {
          if ((err as { syscall?: string }).syscall !== 'pread') this.failed(err);
          throw err;
        }
      },
      zeroAt: (position, length) => track(() => w.zeroAt!(position, length)),
      sync: () => track(() => w.sync()),
    });
  }
}
