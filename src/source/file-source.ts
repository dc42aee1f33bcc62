// A source over any BlockFile: the backing disk or image, or a crashable model of one in tests.
import { alignedBuffer, isAligned } from '../native/io.js';
import { POOL_ALIGNMENT } from '../storage/buffer-pool.js';
import { IOFailedError } from '../errors.js';
import type { BlockFile } from '../storage/storage.js';
import type { WritableSource } from './source.js';

export interface FileSourceOptions {
  id: string;
  size: number;
  /** The file was opened O_DIRECT: transfers go through an aligned bounce buffer. */
  direct?: boolean;
  description?: string;
}

export class FileSource implements WritableSource {
  readonly size: number;
  readonly id: string;
  readonly description: string;
  readonly #file: BlockFile;
  readonly #direct: boolean;

  constructor(file: BlockFile, options: FileSourceOptions) {
    this.#file = file;
    this.size = options.size;
    this.id = options.id;
    this.#direct = options.direct ?? false;
    this.description = options.description ?? file.path;
  }

  async readAt(buf: Uint8Array, position: number): Promise<void> {
    // O_DIRECT wants aligned memory: pooled buffers are (the flusher's, the engine's fills); any
    // other buffer goes through a bounce copy.
    if (!this.#direct || isAligned(buf, POOL_ALIGNMENT)) {
      await this.#readFully(buf, position);
      return;
    }
    const bounce = alignedBuffer(buf.byteLength);
    await this.#readFully(bounce, position);
    buf.set(bounce);
  }

  async writeAt(buf: Uint8Array, position: number): Promise<void> {
    if (!this.#direct || isAligned(buf, POOL_ALIGNMENT)) return this.#file.write(buf, position);
    const bounce = alignedBuffer(buf.byteLength);
    bounce.set(buf);
    return this.#file.write(bounce, position);
  }

  async writeMany(buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<void> {
    let data = buf;
    if (this.#direct && !isAligned(buf, POOL_ALIGNMENT)) {
      data = alignedBuffer(buf.byteLength);
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

  sync(): Promise<void> {
    return this.#file.sync();
  }

  close(): Promise<void> {
    return this.#file.close();
  }

  async #readFully(buf: Uint8Array, position: number): Promise<void> {
    const n = await this.#file.read(buf, position);
    if (n !== buf.byteLength) {
      throw new IOFailedError(`short read from ${this.description} at ${position}: ${n} of ${buf.byteLength} bytes (did the disk shrink?)`, { path: this.description, syscall: 'pread' });
    }
  }
}
