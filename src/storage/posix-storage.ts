// Storage on real files and block devices: Node opens, the native addon does positioned I/O,
// fdatasync and fallocate on the libuv threadpool.
import { constants as fsc, promises as fsp, writeSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { blkGetSize64, blkZeroOut } from '../native/blkdev.js';
import { errnoError } from '../native/addon.js';
import { alignedBuffer, copyRange, copyRanges, copyStream, fallocate, fdatasync, pread, preadNowait, punchHole, pwrite, pwriteList, seekData } from '../native/io.js';
import type { BlockFile, OpenOptions, Storage } from './storage.js';

/** Written zeros go out in pieces this large when the file cannot zero a range itself. */
const ZERO_CHUNK = 1 << 20;

/** Writes up to this size are gathered per event-loop turn; larger ones go to the threadpool alone. */
const GATHER_MAX_WRITE = 64 * 1024;
/** Bytes per gathered threadpool job at most, so several jobs still share the threads. */
const GATHER_MAX_JOB = 256 * 1024;
/**
 * Reads up to this size are copied from the page cache on the calling thread (preadNowait);
 * longer ones go to the threadpool even when cached: a 1 MiB copy on the event loop is ~250 us of
 * its time (bench/README.md, "Session 10"), and on the threadpool it runs beside the event loop's
 * socket writes.
 */
const NOWAIT_MAX_READ = 128 * 1024;
/** writeNow() takes writes up to this size (a few page copies); larger ones go to the threadpool. */
const NOW_MAX_WRITE = 64 * 1024;
/**
 * A writeNow() that took longer than this (ms) held the event loop for a wait (dirty-page
 * throttling, a journal commit, a page to read in) or was preempted (a loaded machine): writeNow()
 * then declines for a while, so writes go to the threadpool while the file is slow. The while
 * starts at NOW_BACKOFF_MIN_MS (a preemption costs little) and doubles with each slow write in a
 * row up to NOW_BACKOFF_MAX_MS (a throttled page cache stalls the loop rarely); a fast one resets it.
 */
const NOW_STALL_MS = 1;
const NOW_BACKOFF_MIN_MS = 20;
const NOW_BACKOFF_MAX_MS = 2000;

interface QueuedWrite {
  buf: Uint8Array;
  position: number;
  resolve: () => void;
  reject: (err: Error) => void;
}

class PosixFile implements BlockFile {
  readonly path: string;
  #fd: number;
  #handle: fsp.FileHandle;

  readonly #direct: boolean;
  #blockDevice: boolean | undefined;
  /** Small writes waiting for the end of this event-loop turn (write()). */
  #gathered: QueuedWrite[] = [];
  /** performance.now() before which writeNow() declines (a slow one was seen: NOW_STALL_MS). */
  #nowWritesFrom = 0;
  /** How long the next slow writeNow() makes it decline (ms). */
  #nowBackoffMs = NOW_BACKOFF_MIN_MS;

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
    // Page-cache hits of up to NOWAIT_MAX_READ are copied right here; what is not cached, and
    // longer reads, go to the threadpool.
    const n = this.#direct || buf.byteLength > NOWAIT_MAX_READ ? -1 : preadNowait(this.#fd, buf, 0, buf.byteLength, position);
    if (n === buf.byteLength || n === 0) return Promise.resolve(n);
    if (n < 0) return pread(this.#fd, buf, 0, buf.byteLength, position);
    return pread(this.#fd, buf, n, buf.byteLength - n, position + n).then((m) => n + m);
  }

  /** BlockFile.readNow: preadv2(RWF_NOWAIT) of up to NOWAIT_MAX_READ, so only page-cache hits; never on an O_DIRECT file. */
  readNow(buf: Uint8Array, position: number): boolean {
    if (this.#direct || buf.byteLength === 0 || buf.byteLength > NOWAIT_MAX_READ) return false;
    try {
      return preadNowait(this.#fd, buf, 0, buf.byteLength, position) === buf.byteLength;
    } catch {
      return false;
    }
  }

  /**
   * BlockFile.writeNow: a plain pwrite on the calling thread (the event loop) for writes of up to
   * NOW_MAX_WRITE bytes to a buffered file, as nbdkit's file plugin writes on the thread that read
   * the request: no threadpool hand-off, and the reply can leave in the same turn. Buffered
   * writes cannot ask not to wait (ext4 refuses RWF_NOWAIT for them), so a write that took over
   * NOW_STALL_MS makes this decline for NOW_BACKOFF_MS: while the page cache throttles or the
   * journal commits, writes wait on the threadpool, not on the event loop.
   */
  writeNow(buf: Uint8Array, position: number): boolean {
    const length = buf.byteLength;
    if (this.#direct || length === 0 || length > NOW_MAX_WRITE) return false;
    const started = performance.now();
    if (started < this.#nowWritesFrom) return false;
    let n: number;
    try {
      n = writeSync(this.#fd, buf, 0, length, position);
    } catch {
      return false;
    }
    const ended = performance.now();
    if (ended - started > NOW_STALL_MS) {
      this.#nowWritesFrom = ended + this.#nowBackoffMs;
      this.#nowBackoffMs = Math.min(NOW_BACKOFF_MAX_MS, this.#nowBackoffMs * 2);
    } else {
      this.#nowBackoffMs = NOW_BACKOFF_MIN_MS;
    }
    return n === length;
  }

  /**
   * Small writes to a buffered file are gathered: every one issued in the same turn of the event
   * loop goes to the threadpool in one job (pwriteList), run in the check phase of that turn. A
   * busy NBD connection then costs one thread hand-off per turn, not one per request. Each write
   * still resolves or rejects on its own; none is durable before sync(), as before.
   */
  write(buf: Uint8Array, position: number): Promise<void> {
    if (this.#direct || buf.byteLength > GATHER_MAX_WRITE) return pwrite(this.#fd, buf, 0, buf.byteLength, position);
    return new Promise<void>((resolve, reject) => {
      if (this.#gathered.push({ buf, position, resolve, reject }) === 1) setImmediate(this.#issueGathered);
    });
  }

  readonly #issueGathered = (): void => {
    const queue = this.#gathered;
    this.#gathered = [];
    for (let i = 0; i < queue.length; ) {
      let bytes = 0;
      let j = i;
      while (j < queue.length && (j === i || bytes + queue[j]!.buf.byteLength <= GATHER_MAX_JOB)) bytes += queue[j++]!.buf.byteLength;
      const job = queue.slice(i, j);
      i = j;
      if (job.length === 1) {
        const w = job[0]!;
        // Validation errors (a closed fd) reject the write rather than throw out of setImmediate.
        Promise.resolve()
          .then(() => pwrite(this.#fd, w.buf, 0, w.buf.byteLength, w.position))
          .then(w.resolve, w.reject);
        continue;
      }
      Promise.resolve()
        .then(() => pwriteList(this.#fd, job.map((w) => w.buf), Float64Array.from(job, (w) => w.position)))
        .then(
          (errnos) => job.forEach((w, k) => (errnos[k] === 0 ? w.resolve() : w.reject(errnoError(errnos[k]!, 'pwrite')))),
          (err: Error) => job.forEach((w) => w.reject(err)),
        );
    }
  };

  async writeMany(buffers: Uint8Array[], positions: Float64Array): Promise<void> {
    const errnos = await pwriteList(this.#fd, buffers, positions);
    const failed = errnos.findIndex((e) => e !== 0);
    if (failed >= 0) throw errnoError(errnos[failed]!, 'pwrite');
  }

  async copyFrom(src: BlockFile, buf: Uint8Array, srcPosition: number, position: number): Promise<number> {
    if (src instanceof PosixFile) return copyRange(src.#fd, srcPosition, this.#fd, position, buf, 0, buf.byteLength);
    const n = await src.read(buf, srcPosition);
    // Short: nothing written, as the native copy.
    if (n === buf.byteLength) await this.write(buf, position);
    return n;
  }

  async copyStreamFrom(src: BlockFile, buf: Uint8Array, srcPosition: number, position: number, length: number, sequential = false): Promise<number> {
    if (src instanceof PosixFile) return copyStream(src.#fd, srcPosition, this.#fd, position, buf, 0, buf.byteLength, length, sequential);
    if (buf.byteLength === 0 && length > 0) throw new RangeError('copyStreamFrom needs a buffer of at least one byte');
    let done = 0;
    while (done < length) {
      const piece = buf.subarray(0, Math.min(buf.byteLength, length - done));
      const n = await src.read(piece, srcPosition + done);
      // Short: this piece is not written, as the native copy.
      if (n < piece.byteLength) return done;
      await this.write(piece, position + done);
      done += n;
    }
    return done;
  }

  async copyManyFrom(src: BlockFile, buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<number> {
    if (src instanceof PosixFile) {
      const ranges = new Float64Array(pieces.length * 4);
      pieces.forEach(([at, length, position], i) => ranges.set([at, length, position, position], i * 4));
      return copyRanges(src.#fd, this.#fd, buf, ranges);
    }
    let total = 0;
    for (const [at, length, position] of pieces) {
      const n = await src.read(buf.subarray(at, at + length), position);
      total += n;
      // Short: stop, nothing written, as the native copy.
      if (n < length) return total;
    }
    await Promise.all(pieces.map(([at, length, position]) => this.write(buf.subarray(at, at + length), position)));
    return total;
  }

  sync(): Promise<void> {
    return fdatasync(this.#fd);
  }

  allocate(length: number): Promise<void> {
    return fallocate(this.#fd, 0, length);
  }

  truncate(length: number): Promise<void> {
    return this.#handle.truncate(length);
  }

  punchHole(offset: number, length: number): Promise<void> {
    return punchHole(this.#fd, offset, length);
  }

  async zeroRange(offset: number, length: number): Promise<void> {
    this.#blockDevice ??= (await this.#handle.stat()).isBlockDevice();
    try {
      await (this.#blockDevice ? blkZeroOut(this.#fd, offset, length) : punchHole(this.#fd, offset, length));
      return;
    } catch (err) {
      // No zeroing offload here (an old filesystem, a device or driver without it): write zeros.
      if (!['EOPNOTSUPP', 'ENOTSUP', 'ENOTTY', 'EINVAL'].includes((err as { code?: string }).code ?? '')) throw err;
    }
    const zeros = alignedBuffer(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length; done += zeros.byteLength) {
      const n = Math.min(zeros.byteLength, length - done);
      await pwrite(this.#fd, zeros, 0, n, offset + done);
    }
  }

  async allocatedBytes(): Promise<number> {
    return (await this.#handle.stat()).blocks * 512;
  }

  async nextData(offset: number): Promise<[number, number] | null> {
    const start = seekData(this.#fd, offset);
    if (start < 0) return null;
    return [start, seekData(this.#fd, start, true)];
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

  async freeBytes(dir: string): Promise<number> {
    const st = await fsp.statfs(dir);
    return st.bavail * st.bsize;
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
