// A source over any BlockFile: the backing disk or image, or a crashable model of one in tests.
import { alignedBuffer } from '../native/io.js';
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
    if (!this.#direct) {
      await this.#readFully(buf, position);
      return;
    }
    const bounce = alignedBuffer(buf.byteLength);
    await this.#readFully(bounce, position);
    buf.set(bounce);
  }

  async writeAt(buf: Uint8Array, position: number): Promise<void> {
    if (!this.#direct) return this.#file.write(buf, position);
    const bounce = alignedBuffer(buf.byteLength);
    bounce.set(buf);
    return this.#file.write(bounce, position);
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
