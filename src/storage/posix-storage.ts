// Storage on real files and block devices: Node opens, the native addon does positioned I/O,
// fdatasync and fallocate on the libuv threadpool.
import { constants as fsc, promises as fsp } from 'node:fs';
import { blkGetSize64 } from '../native/blkdev.js';
import { fallocate, fdatasync, pread, preadNowait, pwrite } from '../native/io.js';
import type { BlockFile, OpenOptions, Storage } from './storage.js';

class PosixFile implements BlockFile {
  readonly path: string;
  #fd: number;
  #handle: fsp.FileHandle;

  readonly #direct: boolean;

  constructor(path: string, handle: fsp.FileHandle, direct: boolean) {
    this.path = path;
    this.#handle = handle;
    this.#fd = handle.fd;
    this.#direct = direct;
  }

  get fd(): number {
    return this.#fd;
  }

  read(buf: Uint8Array, position: number): Promise<number> {
    // Page-cache hits are copied right here; only what is not cached goes to the threadpool.
    const n = this.#direct ? -1 : preadNowait(this.#fd, buf, 0, buf.byteLength, position);
    if (n === buf.byteLength || n === 0) return Promise.resolve(n);
    if (n < 0) return pread(this.#fd, buf, 0, buf.byteLength, position);
    return pread(this.#fd, buf, n, buf.byteLength - n, position + n).then((m) => n + m);
  }

  write(buf: Uint8Array, position: number): Promise<void> {
    return pwrite(this.#fd, buf, 0, buf.byteLength, position);
  }

  sync(): Promise<void> {
    return fdatasync(this.#fd);
  }

  allocate(length: number): Promise<void> {
    return fallocate(this.#fd, 0, length);
  }

  async size(): Promise<number> {
    const st = await this.#handle.stat();
    return st.isBlockDevice() ? blkGetSize64(this.#fd) : st.size;
  }

  async close(): Promise<void> {
    this.#fd = -1;
    await this.#handle.close();
  }
}

export const posixStorage: Storage = {
  async open(path: string, options: OpenOptions = {}): Promise<BlockFile> {
    let flags = options.readOnly ? fsc.O_RDONLY : fsc.O_RDWR;
    if (options.create) flags |= fsc.O_CREAT | fsc.O_EXCL;
    else if (options.exclusive) flags |= fsc.O_EXCL;
    if (options.direct) flags |= fsc.O_DIRECT;
    const handle = await fsp.open(path, flags, 0o600);
    return new PosixFile(path, handle, options.direct ?? false);
  },

  async exists(path: string): Promise<boolean> {
    try {
      await fsp.stat(path);
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw err;
    }
  },

  async remove(path: string): Promise<void> {
    await fsp.rm(path, { force: true });
  },

  async syncDir(dir: string): Promise<void> {
    const handle = await fsp.open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  },
};

/** The fd of a file opened by posixStorage, for ioctls; undefined for other storages. */
export function fdOf(file: BlockFile): number | undefined {
  return file instanceof PosixFile ? file.fd : undefined;
}
