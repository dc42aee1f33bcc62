// A source over any BlockFile: the backing disk or image, or a crashable model of one in tests.
import { alignedBuffer, isAligned } from '../native/io.js';
import { POOL_ALIGNMENT } from '../storage/buffer-pool.js';
import { InternalError, IOFailedError } from '../errors.js';
import type { BlockFile } from '../storage/storage.js';
import type { SectorSize, WritableSource } from './source.js';

export interface FileSourceOptions {
  id: string;
  size: number;
  /**
   * The file was opened O_DIRECT: transfers go through a bounce buffer aligned to a page (and to
   * the logical sector), and every offset and length must be whole logical sectors.
   */
  direct?: boolean;
  description?: string;
  /** A block device's sector sizes (BLKSSZGET, BLKPBSZGET). */
  sectorSize?: SectorSize;
  /** Source.present: whether the device still exists. */
  present?: () => boolean;
  /** A whole disk's partitions' start offsets in bytes (the disk fingerprint hashes each one's first MiB). */
  partitionStarts?: () => Promise<number[]>;
}

export class FileSource implements WritableSource {
  readonly size: number;
  readonly id: string;
  readonly description: string;
  readonly sectorSize?: SectorSize;
  readonly present?: () => boolean;
  /** FileSourceOptions.partitionStarts (absent for a file or a test's model: no partitions). */
  readonly partitionStarts?: () => Promise<number[]>;
  readonly #file: BlockFile;
  readonly #direct: boolean;
  readonly #alignment: number;

  constructor(file: BlockFile, options: FileSourceOptions) {
    this.#file = file;
    this.size = options.size;
    this.id = options.id;
    this.#direct = options.direct ?? false;
    this.description = options.description ?? file.path;
    this.sectorSize = options.sectorSize;
    if (options.present) this.present = options.present;
    if (options.partitionStarts) this.partitionStarts = options.partitionStarts;
    this.#alignment = Math.max(4096, options.sectorSize?.logical ?? 512);
  }

  async readAt(buf: Uint8Array, position: number): Promise<void> {
    // O_DIRECT wants aligned memory: pooled buffers are (the flusher's, the engine's fills); any
    // other buffer goes through a bounce copy.
    if (this.#direct) this.#checkAligned(buf.byteLength, position);
    if (!this.#direct || isAligned(buf, POOL_ALIGNMENT)) {
      await this.#readFully(buf, position);
      return;
    }
    const bounce = alignedBuffer(buf.byteLength, this.#alignment);
    await this.#readFully(bounce, position);
    buf.set(bounce);
  }

  async copyInto(into: BlockFile, buf: Uint8Array, position: number, intoPosition: number): Promise<void> {
    // Unaligned memory on an O_DIRECT disk needs the bounce copy of readAt.
    if (!into.copyFrom || (this.#direct && !isAligned(buf, POOL_ALIGNMENT))) {
      await this.readAt(buf, position);
      await into.write(buf, intoPosition);
      return;
    }
    if (this.#direct) this.#checkAligned(buf.byteLength, position);
    const n = await into.copyFrom(this.#file, buf, position, intoPosition);
    if (n !== buf.byteLength) throw this.#short(position, n, buf.byteLength);
  }

  async streamInto(into: BlockFile, buf: Uint8Array, position: number, intoPosition: number, length: number): Promise<void> {
    if (!into.copyStreamFrom || (this.#direct && !isAligned(buf, POOL_ALIGNMENT))) {
      // Piece after piece through copyInto (its own fallbacks included).
      for (let done = 0; done < length; done += buf.byteLength) {
        const piece = buf.subarray(0, Math.min(buf.byteLength, length - done));
        await this.copyInto(into, piece, position + done, intoPosition + done);
      }
      return;
    }
    if (this.#direct) {
      this.#checkAligned(buf.byteLength, position);
      this.#checkAligned(length, position);
    }
    // A buffered file (an image) gets a larger readahead for the stream; O_DIRECT has none.
    const n = await into.copyStreamFrom(this.#file, buf, position, intoPosition, length, !this.#direct);
    // The copy stopped at a short piece (the pieces before it are written: the caller fails the range).
    if (n !== length) throw this.#short(position, n, length);
  }

  async writeAt(buf: Uint8Array, position: number): Promise<void> {
    if (!this.#direct) return this.#file.write(buf, position);
    this.#checkAligned(buf.byteLength, position);
    if (isAligned(buf, POOL_ALIGNMENT)) return this.#file.write(buf, position);
    const bounce = alignedBuffer(buf.byteLength, this.#alignment);
    bounce.set(buf);
    return this.#file.write(bounce, position);
  }

  /** BLKZEROOUT on a disk, a punched hole in an image file, written zeros where neither works. */
  zeroAt(position: number, length: number): Promise<void> {
    return this.#file.zeroRange(position, length);
  }

  async writeMany(buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<void> {
    let data = buf;
    if (this.#direct) for (const [, length, position] of pieces) this.#checkAligned(length, position);
    if (this.#direct && !isAligned(buf, POOL_ALIGNMENT)) {
      data = alignedBuffer(buf.byteLength, this.#alignment);
      data.set(buf);
    }
    if (!this.#file.writeMany) {
      for (const [at, length, position] of pieces) await this.#file.write(data.subarray(at, at + length), position);
      return;
    }
    return this.#file.writeMany(
      pieces.map(([at, length]) => data.subarray(at, at + length)),
      Float64Array.from(pieces, ([, , position]) => position),
    );
  }

  async writeManyFrom(from: BlockFile, buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<void> {
    if (this.#direct) for (const [, length, position] of pieces) this.#checkAligned(length, position);
    // Unaligned memory on an O_DIRECT disk needs writeMany's bounce copy.
    if (!this.#file.copyManyFrom || (this.#direct && !isAligned(buf, POOL_ALIGNMENT))) {
      for (const [at, length, position] of pieces) {
        const n = await from.read(buf.subarray(at, at + length), position);
        if (n !== length) throw this.#shortCache(from, position, n, length);
      }
      return this.writeMany(buf, pieces);
    }
    const n = await this.#file.copyManyFrom(from, buf, pieces);
    const want = pieces.reduce((sum, [, length]) => sum + length, 0);
    if (n !== want) {
      // The copy stopped at the first short piece and wrote nothing: name that piece.
      let before = 0;
      for (const [, length, position] of pieces) {
        if (before + length > n) throw this.#shortCache(from, position, n - before, length);
        before += length;
      }
    }
  }

  // The engine and the flusher move whole cache blocks (a multiple of the logical sector, checked
  // at attach) and the disk's last bytes; anything else is a bug, and O_DIRECT would answer EINVAL.
  #checkAligned(length: number, position: number): void {
    const sector = this.sectorSize?.logical ?? 512;
    if (position % sector !== 0 || (length % sector !== 0 && position + length !== this.size)) {
      throw new InternalError(`direct I/O of ${length} bytes at ${position} on ${this.description} is not in whole ${sector}-byte sectors`);
    }
  }

  sync(): Promise<void> {
    return this.#file.sync();
  }

  close(): Promise<void> {
    return this.#file.close();
  }

  async #readFully(buf: Uint8Array, position: number): Promise<void> {
    const n = await this.#file.read(buf, position);
    if (n !== buf.byteLength) throw this.#short(position, n, buf.byteLength);
  }

  #short(position: number, n: number, length: number): IOFailedError {
    return new IOFailedError(`short read from ${this.description} at ${position}: ${n} of ${length} bytes (did the disk shrink?)`, { path: this.description, syscall: 'pread' });
  }

  /** The cache file ended early under a flush: the cache's failure, not the disk's. */
  #shortCache(from: BlockFile, position: number, n: number, length: number): IOFailedError {
    return new IOFailedError(`short read from the cache file ${from.path} at ${position}: ${n} of ${length} bytes (was it truncated?)`, { path: from.path, syscall: 'pread' });
  }
}
