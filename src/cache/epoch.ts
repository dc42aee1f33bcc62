// A flush epoch (durability rule 7 of docs/design.md): the dirty blocks the flusher writes back,
// snapshotted by CacheEngine.beginEpoch(), and the copy-on-write that makes the disk a
// point-in-time image of the epoch (invariant 7). Until the epoch ends, a write to a block of the
// snapshot that the flusher has not read yet first saves the block's current content aside, in
// memory up to a budget and beyond it in a spill file; the flusher reads blocks through read(),
// which returns the saved version, and a write to a block being read waits for the read.
// Zeroed blocks of the snapshot (dirty, not present) have zeros as their epoch version: nothing is
// saved for them, and the flusher zeroes them on the disk (zeroRuns) instead of copying.
import { open as openFile, rm, type FileHandle } from 'node:fs/promises';
import { EngineClosedError } from '../errors.js';
import { Bitmap } from './bitmap.js';
import type { Extent, Geometry } from './layout.js';

/** A flush epoch as the flusher sees it. */
export interface Epoch {
  readonly id: number;
  /** Dirty extents at the snapshot, sorted by start (zeroed blocks included). */
  readonly extents: readonly Extent[];
  readonly blocks: number;
  /** Whether block `b` (of the snapshot) was zeroed at the snapshot: the disk gets zeros. */
  isZero(b: number): boolean;
}

export interface EpochOptions {
  geometry: Geometry;
  /** Reads the cache file: buf.length bytes at `position` (CacheStore.readData). */
  readCache: (buf: Buffer, position: number) => Promise<unknown>;
  /** Bytes of saved block versions kept in memory before the spill file is used. */
  memoryBytes: number;
  /** The spill file (created on first use, removed by release()). */
  spillPath: string;
}

/** Owned by the engine from beginEpoch() until commitEpoch() or abortEpoch() releases it. */
export class FlushEpoch implements Epoch {
  readonly id: number;
  readonly extents: readonly Extent[];
  readonly blocks: number;
  /** The snapshot: dirty blocks the flusher writes back. */
  readonly flushing: Bitmap;
  /** Blocks of the snapshot that were zeroed at the snapshot. */
  readonly zeros: Bitmap;
  /** Blocks of the snapshot written since it was taken (or being written then): they stay dirty. */
  readonly rewritten = new Set<number>();
  /** A preservation failed: the epoch cannot be written as a point-in-time image; the flush aborts. */
  failed: Error | null = null;
  /**
   * The cache file's fdatasync begun at the snapshot (CacheEngine.beginEpoch): it makes the
   * content the flusher reads durable in the cache. It runs while the flusher copies and the disk
   * syncs; commitEpoch awaits it before any dirty bit goes (invariant 2). Never an unhandled
   * rejection: commitEpoch rethrows its failure.
   */
  cacheSynced: Promise<void> = Promise.resolve();

  readonly #o: EpochOptions;
  // Per block of `flushing`, at most one of these holds:
  /** Blocks read() has read: the disk gets (or got) their epoch version; writes go ahead. */
  readonly #copied: Bitmap;
  /** Blocks read() is reading now; writes to them wait. */
  readonly #reading = new Map<number, Promise<void>>();
  /** Blocks whose epoch version is being saved aside; read() waits. */
  readonly #preserving = new Map<number, Promise<void>>();
  /** Saved epoch versions: in memory, or a slot of the spill file. */
  readonly #preserved = new Map<number, Buffer | number>();
  #memoryBytes = 0;
  #spill: { handle: FileHandle; path: string; slots: number } | null = null;
  /** The spill file's open while it is under way (#openSpill). */
  #spillOpening: Promise<{ handle: FileHandle; path: string; slots: number }> | null = null;

  /** `zeros`: the blocks of `flushing` zeroed at the snapshot (a bitmap of the same size). */
  constructor(id: number, flushing: Bitmap, zeros: Bitmap, options: EpochOptions) {
    this.id = id;
    this.flushing = flushing;
    this.zeros = zeros;
    this.extents = [...flushing.runs()];
    this.blocks = this.extents.reduce((n, e) => n + e.count, 0);
    this.#o = options;
    this.#copied = new Bitmap(options.geometry.blockCount);
  }

  isZero(b: number): boolean {
    return this.zeros.get(b);
  }

  /** Bytes of epoch versions saved aside (memory and spill file). */
  get preservedBytes(): number {
    return this.#preserved.size * this.#o.geometry.blockSize;
  }

  /** Blocks [first, end) are being written: those of the snapshot stay dirty after the epoch. */
  markRewritten(first: number, end: number): void {
    for (let b = this.flushing.nextSet(first, end); b < end; b = this.flushing.nextSet(b + 1, end)) {
      this.rewritten.add(b);
    }
  }

  /**
   * One pass of copy-on-write before a write to [first, end): starts saving the epoch version of
   * every block of the snapshot there that the flusher has not read yet, and returns what the
   * write must wait for (reads in progress and the saves). Empty when the write may go ahead at
   * once; the caller loops until it is, and then writes without awaiting anything else first.
   */
  copyBeforeWrite(first: number, end: number): Promise<void>[] {
    if (this.failed) return [];
    const waits: Promise<void>[] = [];
    const todo: number[] = [];
    for (let b = this.flushing.nextSet(first, end); b < end; b = this.flushing.nextSet(b + 1, end)) {
      if (this.#copied.get(b) || this.#preserved.has(b) || this.zeros.get(b)) continue;
      const busy = this.#reading.get(b) ?? this.#preserving.get(b);
      if (busy) waits.push(busy);
      else todo.push(b);
    }
    if (todo.length > 0) {
      const p = this.#preserve(todo);
      for (const b of todo) this.#preserving.set(b, p);
      waits.push(p);
    }
    return waits;
  }

  /**
   * The epoch's version of blocks [start, start + count): the cache content as of the snapshot,
   * even for blocks rewritten since (their saved copies). Each block should be read once;
   * afterwards writes to it no longer need a copy. Throws the epoch's failure, if any.
   * With `into` (at least the extent's bytes long) the blocks are read there and a view of `into`
   * is returned: the flusher reuses its buffers.
   */
  async read(start: number, count: number, into?: Buffer): Promise<Buffer> {
    const bytes = this.#checkPiece(start, count);
    if (into && into.byteLength < bytes) throw new RangeError(`a buffer of ${into.byteLength} bytes cannot hold blocks ${start}+${count}`);
    const buf = into ? into.subarray(0, bytes) : Buffer.allocUnsafe(bytes);
    await this.readInto(buf, [[start, count, 0]]);
    return buf;
  }

  /**
   * read() for many pieces at once, into one buffer: each piece is [first block, blocks, byte
   * offset in buf]. One pass of bookkeeping for all of them, and their cache reads run together;
   * the flusher copies scattered dirty blocks this way. Resolves once every read has settled (the
   * buffer is then the caller's again), rejecting with the first failure.
   */
  async readInto(buf: Buffer, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<void> {
    await this.copyOut(buf, pieces, { write: async () => undefined });
  }

  /**
   * The flusher's batch: the epoch's version of the pieces ([first block, blocks, byte offset in
   * buf]) sent to the disk through `buf`.
   *
   * Where none of their blocks has a saved version or was zeroed at the snapshot, the cache file
   * holds the epoch's version and `io.copy` (if given) reads it and writes it to the disk in one
   * request. Writes to these blocks are not held up meanwhile: they save the epoch's version first
   * as they would before any read (copyBeforeWrite), so `io.copy` may read their new content; once
   * it has settled, those saved versions are written over it (`io.write` of those blocks), before
   * the flush's closing sync. Otherwise the pieces are read into `buf` here (writes to them wait for
   * the read), saved versions and zeros put in, and `io.write` writes them.
   *
   * `io.write(pieces)` writes those pieces of `buf` to the disk; `io.read`, if given, is called once
   * the batch's reads are done or handed to `io.copy` (the flusher then starts the next batch).
   * Resolves once everything has settled (the buffer is the caller's again), rejecting with the
   * first failure.
   */
  async copyOut(
    buf: Buffer,
    pieces: ReadonlyArray<readonly [number, number, number]>,
    io: { copy?: () => Promise<void>; write: (pieces: ReadonlyArray<readonly [number, number, number]>) => Promise<void>; read?: () => void },
  ): Promise<void> {
    const g = this.#o.geometry;
    for (const [start, count, at] of pieces) {
      const bytes = this.#checkPiece(start, count);
      if (!Number.isSafeInteger(at) || at < 0 || at + bytes > buf.byteLength) throw new RangeError(`blocks ${start}+${count} at byte ${at} do not fit a buffer of ${buf.byteLength} bytes`);
    }
    await this.#settle(pieces);
    // From here to the first await, no save of these blocks starts.
    let plain = io.copy !== undefined;
    for (const [start, count] of pieces) {
      if (plain && (this.zeros.nextSet(start, start + count) < start + count || this.#hasSaved(start, count))) plain = false;
    }
    if (plain) {
      // No per-block work on this path (a contiguous flush's every batch): 65,536 blocks per 256 MiB.
      const copying = io.copy!();
      io.read?.();
      await copying;
      // Blocks written during the copy saved their epoch version first: it goes over what the copy
      // may have read of the new content. (Only saves that started after #settle can be in
      // #preserving for these blocks: the ones of writes during the copy.) The wait is not what
      // keeps the disk right: a save still in flight means its write has not landed, so the copy
      // read the epoch's version there. It settles the batch with its saves: a failed save fails
      // the batch here rather than only at the commit, and no saved version comes in unused.
      while (this.#preserving.size > 0) {
        const waits: Promise<void>[] = [];
        for (const [start, count] of pieces) {
          for (let b = start; b < start + count; b++) {
            const p = this.#preserving.get(b);
            if (p) waits.push(p);
          }
        }
        if (waits.length === 0) break;
        await Promise.all(waits);
      }
      if (this.failed) throw this.failed;
      const fix: Array<[number, number, number]> = [];
      const saved: Array<[number, Buffer | number]> = [];
      for (const [start, count, at] of pieces) {
        if (!this.#hasSaved(start, count)) continue;
        for (let b = start; b < start + count; b++) {
          const v = this.#preserved.get(b);
          if (v === undefined) continue;
          fix.push([b, 1, at + g.blockOffset(b) - g.blockOffset(start)]);
          saved.push([b, v]);
        }
      }
      // Copied from here on: later writes need no save (the versions taken above are ours). Only
      // flushing blocks' bits are ever looked at (copyBeforeWrite), so whole pieces are marked.
      for (const [start, count] of pieces) this.#copied.setRange(start, start + count);
      if (fix.length === 0) return;
      for (let i = 0; i < fix.length; i++) {
        const [b, v] = saved[i]!;
        await this.#takeSaved(buf, fix[i]![2], b, v);
      }
      await io.write(fix);
      return;
    }
    const mine: number[] = [];
    for (const [start, count] of pieces) {
      for (let b = start; b < start + count; b++) if (this.flushing.get(b) && !this.#copied.get(b)) mine.push(b);
    }
    let done!: () => void;
    const reading = new Promise<void>((resolve) => (done = resolve));
    for (const b of mine) this.#reading.set(b, reading);
    try {
      const reads = await Promise.allSettled(pieces.map(([start, count, at]) => this.#o.readCache(buf.subarray(at, at + g.extentBytes(start, count)), g.blockOffset(start))));
      for (const r of reads) if (r.status === 'rejected') throw r.reason;
      for (const [start, count, at] of pieces) {
        // Blocks zeroed when the epoch began are holes in the cache file: zeros, whatever is there.
        for (const z of this.zeros.runs(start, start + count)) {
          const from = at + g.blockOffset(z.start) - g.blockOffset(start);
          buf.fill(0, from, from + g.extentBytes(z.start, z.count));
        }
        if (!this.#hasSaved(start, count)) continue;
        for (let b = start; b < start + count; b++) {
          const v = this.#preserved.get(b);
          if (v !== undefined) await this.#takeSaved(buf, at + g.blockOffset(b) - g.blockOffset(start), b, v);
        }
      }
      if (this.failed) throw this.failed;
      for (const b of mine) this.#copied.set(b);
    } finally {
      for (const b of mine) this.#reading.delete(b);
      done();
      io.read?.();
    }
    await io.write(pieces);
  }

  /** Waits until no block of the pieces is being saved or read. Throws the epoch's failure. */
  async #settle(pieces: ReadonlyArray<readonly [number, number, number]>): Promise<void> {
    for (;;) {
      if (this.failed) throw this.failed;
      if (this.#preserving.size === 0 && this.#reading.size === 0) return;
      const waits = [];
      for (const [start, count] of pieces) {
        for (let b = start; b < start + count; b++) {
          const p = this.#preserving.get(b) ?? this.#reading.get(b);
          if (p) waits.push(p);
        }
      }
      if (waits.length === 0) return;
      await Promise.all(waits);
    }
  }

  /** Puts block b's saved version `v` into buf at `into` and forgets it. */
  async #takeSaved(buf: Buffer, into: number, b: number, v: Buffer | number): Promise<void> {
    const g = this.#o.geometry;
    this.#preserved.delete(b);
    if (typeof v === 'number') {
      await this.#spill!.handle.read(buf, into, g.blockLength(b), v * g.blockSize);
    } else {
      v.copy(buf, into);
      this.#memoryBytes -= v.byteLength;
    }
  }

  /** Whether a block of [start, start + count) has a saved epoch version. */
  #hasSaved(start: number, count: number): boolean {
    if (this.#preserved.size === 0) return false;
    for (let b = start; b < start + count; b++) if (this.#preserved.has(b)) return true;
    return false;
  }

  /** Bytes of blocks [start, start + count), which must lie on the disk. */
  #checkPiece(start: number, count: number): number {
    const g = this.#o.geometry;
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(count) || start < 0 || count < 1 || start + count > g.blockCount) {
      throw new RangeError(`blocks ${start}+${count} outside the disk`);
    }
    return g.extentBytes(start, count);
  }

  /** Frees the saved copies (and the spill file) once no save or read is in flight. */
  async release(): Promise<void> {
    await Promise.all([...this.#preserving.values(), ...this.#reading.values()]);
    this.#preserved.clear();
    this.#memoryBytes = 0;
    const spill = this.#spill;
    this.#spill = null;
    this.#spillOpening = null;
    if (spill) {
      await spill.handle.close().catch(() => undefined);
      await rm(spill.path, { force: true }).catch(() => undefined);
    }
  }

  /**
   * The spill file, opened once however many saves need it at the same time: each save that found
   * it not open yet used to open it itself ('w+' truncates) and number its slots from 0 again, so
   * two blocks shared a slot and one's epoch version was the other's (invariant 7).
   */
  #openSpill(): Promise<{ handle: FileHandle; path: string; slots: number }> {
    if (this.#spill) return Promise.resolve(this.#spill);
    this.#spillOpening ??= openFile(this.#o.spillPath, 'w+', 0o600).then(
      (handle) => (this.#spill = { handle, path: this.#o.spillPath, slots: 0 }),
      (err: unknown) => {
        this.#spillOpening = null;
        throw err;
      },
    );
    return this.#spillOpening;
  }

  /** Saves the current cache content of `blocks` as the epoch's version. Never rejects. */
  async #preserve(blocks: number[]): Promise<void> {
    const g = this.#o.geometry;
    try {
      for (const b of blocks) {
        const buf = Buffer.allocUnsafe(g.blockLength(b));
        await this.#o.readCache(buf, g.blockOffset(b));
        if (this.#memoryBytes + buf.byteLength <= this.#o.memoryBytes) {
          this.#preserved.set(b, buf);
          this.#memoryBytes += buf.byteLength;
        } else {
          const spill = await this.#openSpill();
          // Taken in the same turn as the open's answer: saves running at once get their own slots.
          const slot = spill.slots++;
          await spill.handle.write(buf, 0, buf.byteLength, slot * g.blockSize);
          this.#preserved.set(b, slot);
        }
      }
    } catch (err) {
      // Without the copy the epoch is no point-in-time image any more: it fails as a whole (its
      // blocks stay dirty; a later flush starts a new epoch) and the user's write goes ahead.
      this.failed ??= new EngineClosedError(`cannot keep the flush epoch's copy of a rewritten block: ${(err as Error).message}`);
    } finally {
      for (const b of blocks) this.#preserving.delete(b);
    }
  }
}
