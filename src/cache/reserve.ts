// The flash reserve: a small preallocated file next to the metadata (METADATA-reserve), owned by
// the cache. When another program fills the flash filesystem and the cache holds only dirty blocks,
// nothing clean can be given back, and the flush that would make blocks clean must still write its
// own metadata commit (SQLite's WAL grows by a page per page changed). The reserve is that room:
// released (truncated to 0, its blocks back to the filesystem) when a flush's metadata write finds
// the filesystem full, and taken again (fallocate) once space returns.
//
// Size (DEFAULT_FLASH_RESERVE, 1 MiB), measured with Metadata on ext4 (4 KiB pages): a flush commit
// (replaceDirty) of 1 dirty run adds 8 KiB to the WAL, of 1,000 runs 24 KiB, of 10,000 runs 72 KiB,
// of 100,000 runs 632 KiB; one first-write intent adds 4 KiB. 1 MiB covers the commit of a dirty
// set in ~150,000 scattered runs plus the history rows and a few dozen intents.
//
// Crash safety: the reserve holds no data. A crash while it is released leaves a short file; the
// next open takes it again (or what fits). The metadata is not touched by releasing or taking it.

import { closeSync, fstatSync, ftruncateSync, openSync, constants as fsConstants } from 'node:fs';
import { ioError } from '../errors.js';
import { fallocate, fdatasync } from '../native/io.js';

/** Bytes of the flash reserve by default (see the measurement above). */
export const DEFAULT_FLASH_RESERVE = 1 << 20;

/** Status of the flash reserve (EngineStats.flashReserve). */
export interface FlashReserveStatus {
  /** Bytes the reserve should hold. */
  bytes: number;
  /** Bytes it holds now (less while released, or while the filesystem has no room to take it back). */
  heldBytes: number;
  /** Times it was released since the cache opened. */
  releases: number;
}

/** The path of the reserve for metadata at `metadataPath` (removed with it: discard, a refused open). */
export function reservePath(metadataPath: string): string {
  return `${metadataPath}-reserve`;
}

export class FlashReserve {
  readonly path: string;
  /** Bytes it should hold (> 0). */
  readonly bytes: number;
  #fd: number | null;
  #held: number;
  #releases = 0;
  #taking: Promise<boolean> | null = null;
  /** Bumped by release(): a take() running across it stops and gives back what it took (review11 R-4). */
  #generation = 0;

  private constructor(path: string, bytes: number, fd: number, held: number) {
    this.path = path;
    this.bytes = bytes;
    this.#fd = fd;
    this.#held = held;
  }

  /**
   * Opens (creating it if missing) the reserve at `path` and takes `bytes` (> 0) of the filesystem
   * for it, or what fits (a full filesystem: taken later, see take()). A file larger than `bytes`
   * is cut down. Throws an IoError when the file cannot be opened.
   */
  static async open(path: string, bytes: number): Promise<FlashReserve> {
    let fd: number;
    try {
      fd = openSync(path, fsConstants.O_RDWR | fsConstants.O_CREAT, 0o600);
    } catch (err) {
      throw ioError('open the flash reserve', path, err);
    }
    let size = 0;
    try {
      size = fstatSync(fd).size;
      if (size > bytes) {
        ftruncateSync(fd, bytes);
        size = bytes;
      }
    } catch (err) {
      closeSync(fd);
      throw ioError('open the flash reserve', path, err);
    }
    const reserve = new FlashReserve(path, bytes, fd, size);
    await reserve.take();
    return reserve;
  }

  status(): FlashReserveStatus {
    return { bytes: this.bytes, heldBytes: this.#held, releases: this.#releases };
  }

  /** Bytes held now. */
  get heldBytes(): number {
    return this.#held;
  }

  /**
   * Gives the reserve's blocks back to the filesystem (truncate to 0, then fdatasync so a journalling
   * filesystem lets them be allocated again). Resolves with the bytes freed (0 if none were held).
   * Never throws: a reserve that cannot be released frees nothing.
   */
  async release(): Promise<number> {
    const fd = this.#fd;
    if (fd === null || this.#held === 0) return 0;
    const freed = this.#held;
    try {
      ftruncateSync(fd, 0);
    } catch {
      return 0;
    }
    this.#held = 0;
    this.#releases++;
    this.#generation++;
    // ext4 in data=ordered mode lets freed blocks be allocated only once the transaction that
    // freed them commits; the sync commits it now.
    await fdatasync(fd).catch(() => undefined);
    return freed;
  }

  /**
   * Takes the reserve back: allocates what it lacks (fallocate), or as much as fits. Resolves true
   * once it holds all of it. Never throws (a full filesystem is the reason it may lack room).
   * Concurrent calls share one attempt.
   */
  take(): Promise<boolean> {
    if (this.#held >= this.bytes) return Promise.resolve(true);
    return (this.#taking ??= this.#take().finally(() => (this.#taking = null)));
  }

  async #take(): Promise<boolean> {
    const step = 64 << 10;
    const generation = this.#generation;
    while (this.#held < this.bytes && this.#fd !== null) {
      const length = Math.min(step, this.bytes - this.#held);
      try {
        await fallocate(this.#fd, this.#held, length);
      } catch {
        // ENOSPC (or a filesystem without fallocate): keep what it holds, try again later.
        break;
      }
      if (generation !== this.#generation) {
        // Released meanwhile: that room is the flush's. Give back the step just taken.
        if (this.#fd !== null) {
          try {
            ftruncateSync(this.#fd, this.#held);
          } catch {
            // the next release truncates it
          }
        }
        return false;
      }
      this.#held += length;
    }
    if (this.#fd !== null) await fdatasync(this.#fd).catch(() => undefined);
    return this.#held >= this.bytes;
  }

  /** Closes the file, keeping it (the next open takes it again). */
  close(): void {
    if (this.#fd === null) return;
    closeSync(this.#fd);
    this.#fd = null;
  }
}
