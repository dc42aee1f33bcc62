// A Storage that keeps its files in memory, sparse (64 KiB chunks, allocated on first write), for
// simulations that run the real store and engine under a virtual clock: every call resolves in a
// microtask, with no libuv threadpool round trip, so fake timers drive the whole daemon
// deterministically (bench/power.js, test/unit/power-model.test.ts). Nothing is durable: a crash
// model is test/support/crashable.ts. Paths it does not hold (the SQLite metadata, which is a real
// file) are left to the real filesystem for exists() and remove().
import { posixStorage } from './posix-storage.js';
import type { BlockFile, OpenOptions, Storage } from './storage.js';

const CHUNK = 64 * 1024;

class MemoryFile {
  size = 0;
  readonly chunks = new Map<number, Buffer>();

  read(buf: Uint8Array, position: number): number {
    const n = Math.max(0, Math.min(buf.byteLength, this.size - position));
    for (let done = 0; done < n; ) {
      const at = position + done;
      const index = Math.floor(at / CHUNK);
      const within = at - index * CHUNK;
      const len = Math.min(CHUNK - within, n - done);
      const chunk = this.chunks.get(index);
      if (chunk) buf.set(chunk.subarray(within, within + len), done);
      else buf.fill(0, done, done + len);
      done += len;
    }
    return n;
  }

  write(buf: Uint8Array, position: number): void {
    for (let done = 0; done < buf.byteLength; ) {
      const at = position + done;
      const index = Math.floor(at / CHUNK);
      const within = at - index * CHUNK;
      const len = Math.min(CHUNK - within, buf.byteLength - done);
      let chunk = this.chunks.get(index);
      if (!chunk) this.chunks.set(index, (chunk = Buffer.alloc(CHUNK)));
      chunk.set(buf.subarray(done, done + len), within);
      done += len;
    }
    this.size = Math.max(this.size, position + buf.byteLength);
  }

  /** Zeros [offset, offset + length); chunks wholly inside are freed when `free` (a punched hole). */
  clear(offset: number, length: number, free: boolean): void {
    const end = Math.min(offset + length, this.size);
    for (let at = offset; at < end; ) {
      const index = Math.floor(at / CHUNK);
      const within = at - index * CHUNK;
      const len = Math.min(CHUNK - within, end - at);
      const chunk = this.chunks.get(index);
      if (chunk) {
        if (free && len === CHUNK) this.chunks.delete(index);
        else chunk.fill(0, within, within + len);
      }
      at += len;
    }
  }

  truncate(length: number): void {
    if (length < this.size) {
      this.clear(length, this.size - length, true);
      for (const index of this.chunks.keys()) if (index * CHUNK >= length) this.chunks.delete(index);
    }
    this.size = length;
  }

  /** The first run of allocated chunks at or after `offset`, as [start, end), like SEEK_DATA/SEEK_HOLE. */
  nextData(offset: number): [number, number] | null {
    if (offset >= this.size) return null;
    let first: number | null = null;
    for (const index of this.chunks.keys()) if ((index + 1) * CHUNK > offset && (first === null || index < first)) first = index;
    if (first === null) return null;
    let last = first;
    while (this.chunks.has(last + 1)) last++;
    return [Math.max(offset, first * CHUNK), Math.min(this.size, (last + 1) * CHUNK)];
  }
}

function errno(code: string, message: string): Error {
  return Object.assign(new Error(`${code}: ${message}`), { code });
}

/** In-memory files by path. `storage` is the Storage over them. */
export class MemoryStorage {
  readonly #files = new Map<string, MemoryFile>();

  /** Bytes held in chunks (what the files would take on a sparse filesystem). */
  get allocatedBytes(): number {
    let n = 0;
    for (const f of this.#files.values()) n += f.chunks.size * CHUNK;
    return n;
  }

  /** Makes a file of `size` zero bytes (e.g. a simulated disk), replacing any of that name. */
  create(path: string, size: number): void {
    const f = new MemoryFile();
    f.size = size;
    this.#files.set(path, f);
  }

  readonly storage: Storage = {
    open: async (path: string, options: OpenOptions = {}): Promise<BlockFile> => {
      let f = this.#files.get(path);
      if (options.create) {
        if (f) throw errno('EEXIST', path);
        this.#files.set(path, (f = new MemoryFile()));
      }
      if (!f) throw errno('ENOENT', path);
      return memoryHandle(path, f, options.readOnly ?? false);
    },
    exists: async (path: string): Promise<boolean> => this.#files.has(path) || posixStorage.exists(path),
    remove: async (path: string): Promise<void> => {
      if (!this.#files.delete(path)) await posixStorage.remove(path);
    },
    syncDir: async (): Promise<void> => undefined,
    // Memory is not what a simulation runs short of.
    freeBytes: async (): Promise<number> => Number.MAX_SAFE_INTEGER,
  };
}

function memoryHandle(path: string, file: MemoryFile, readOnly: boolean): BlockFile {
  let closed = false;
  const check = () => {
    if (closed) throw errno('EBADF', `${path} is closed`);
  };
  return {
    path,
    read: async (buf, position) => {
      check();
      return file.read(buf, position);
    },
    write: async (buf, position) => {
      check();
      if (readOnly) throw errno('EBADF', `${path} is open read-only`);
      file.write(buf, position);
    },
    sync: async () => check(),
    allocate: async (length) => {
      check();
      file.size = Math.max(file.size, length);
    },
    truncate: async (length) => {
      check();
      file.truncate(length);
    },
    punchHole: async (offset, length) => {
      check();
      file.clear(offset, length, true);
    },
    zeroRange: async (offset, length) => {
      check();
      file.clear(offset, length, false);
    },
    allocatedBytes: async () => file.chunks.size * CHUNK,
    nextData: async (offset) => file.nextData(offset),
    size: async () => file.size,
    close: async () => {
      closed = true;
    },
  };
}
