// The backing disk's state as `status` shows it: ok, failing (its last I/O failed) or gone (it was
// removed, or its transport is down), with the last error and when it happened. Learnt from every
// read (misses, hydration) and write and sync (flushes) that reach the disk, and for a block device
// from sysfs at each look, so a removed disk shows as gone even while nothing reads it. Nothing here
// touches the disk: a sleeping disk stays asleep.
import { isWritable, type SectorSize, type Source } from './source.js';
import type { BlockFile } from '../storage/storage.js';

export type DiskState = 'ok' | 'failing' | 'gone';

export interface DiskHealthStatus {
  state: DiskState;
  /** The last I/O error of the disk (kept after it recovers), or null. */
  lastError: string | null;
  /** When it happened, ms since the epoch, or null. */
  lastErrorAt: number | null;
  /** I/O errors since the daemon started. */
  errors: number;
}

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
    const code = typeof e?.code === 'string' ? e.code : '';
    this.#state = GONE_CODES.has(code) ? 'gone' : 'failing';
    this.#lastError = typeof e?.message === 'string' ? e.message : String(err);
    this.#lastErrorAt = Date.now();
    this.#errors++;
  }

  status(): DiskHealthStatus {
    let state = this.#state;
    if (this.#present && !this.#present()) state = 'gone';
    return { state, lastError: this.#lastError, lastErrorAt: this.#lastErrorAt, errors: this.#errors };
  }

  /** `source` with every read, write and sync reported here (the daemon's view of the disk). */
  watch(source: Source): Source {
    const track = async <T>(io: Promise<T>): Promise<T> => {
      try {
        const r = await io;
        this.succeeded();
        return r;
      } catch (err) {
        this.failed(err);
        throw err;
      }
    };
    const wrapped: Source & { sectorSize?: SectorSize } = {
      size: source.size,
      id: source.id,
      description: source.description,
      sectorSize: source.sectorSize,
      readAt: (buf, position) => track(source.readAt(buf, position)),
      close: () => source.close(),
      // A fill's read and cache write in one request: only the read side is the disk's.
      copyInto: source.copyInto
        ? async (into, buf, position, intoPosition) => {
            try {
              await source.copyInto!(into, buf, position, intoPosition);
              this.succeeded();
            } catch (err) {
              if ((err as { syscall?: string }).syscall !== 'pwrite') this.failed(err);
              throw err;
            }
          }
        : undefined,
      stats: source.stats ? () => source.stats!() : undefined,
      present: source.present ? () => source.present!() : undefined,
    };
    if (isWritable(source)) {
      Object.assign(wrapped, {
        writeAt: (buf: Uint8Array, position: number) => track(source.writeAt(buf, position)),
        sync: () => track(source.sync()),
      });
      // The flusher's fast paths (scattered blocks in one request, zeroing offload) must survive
      // the wrapping: without them every piece is its own threadpool trip and zeros are written.
      const { writeMany, writeManyFrom, zeroAt } = source;
      // A flush batch's cache reads and disk writes in one request: only the write side is the disk's.
      if (writeManyFrom) {
        Object.assign(wrapped, {
          writeManyFrom: async (from: BlockFile, buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>) => {
            try {
              await writeManyFrom.call(source, from, buf, pieces);
              this.succeeded();
            } catch (err) {
              if ((err as { syscall?: string }).syscall !== 'pread') this.failed(err);
              throw err;
            }
          },
        });
      }
      if (writeMany) {
        Object.assign(wrapped, {
          writeMany: (buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>) => track(writeMany.call(source, buf, pieces)),
        });
      }
      if (zeroAt) Object.assign(wrapped, { zeroAt: (position: number, length: number) => track(zeroAt.call(source, position, length)) });
    }
    return wrapped;
  }
}
