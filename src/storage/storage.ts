// The one seam between the engine and the files it persists to. The engine and the store call only
// these methods, so tests can put a crashable model underneath (test/support/crashable.ts) and the
// real code runs unchanged above it.

export interface BlockFile {
  readonly path: string;
  /** Reads buf.length bytes at `position`; returns fewer only at end of file. */
  read(buf: Uint8Array, position: number): Promise<number>;
  /** Writes all of `buf` at `position`. Not durable until sync(). */
  write(buf: Uint8Array, position: number): Promise<void>;
  /**
   * Optional: read() done now on the calling thread, where the bytes need no wait for a disk (a
   * buffered file's page cache). True: all of buf.length bytes at `position` are in `buf`. False:
   * not done (buf's content is then undefined, the file unchanged); the caller calls read(). Never
   * throws for an I/O error: that is read()'s to report.
   */
  readNow?(buf: Uint8Array, position: number): boolean;
  /**
   * Optional: write() done now on the calling thread, where that is cheap (a small write into a
   * buffered file's page cache). True: all of `buf` is written at `position`, as a resolved
   * write() would have it (not durable until sync()). False: not done; some of the bytes may have
   * reached the file, and the caller calls write() with the same bytes. Never throws for an I/O
   * error: that is write()'s to report.
   */
  writeNow?(buf: Uint8Array, position: number): boolean;
  /**
   * Optional: writes each of `buffers` at the matching entry of `positions`, in order, as write()
   * of each would, in one request to the I/O threads; rejects with the first failure. Not durable
   * until sync(). Callers fall back to write() per buffer where it is missing.
   */
  writeMany?(buffers: Uint8Array[], positions: Float64Array): Promise<void>;
  /**
   * Optional: reads buf.length bytes of `src` at `srcPosition` into `buf` and writes the bytes read
   * here at `position`, as src.read() then write() would, but in one request to the I/O threads
   * where both are files of this storage (a cache fill). Resolves with the bytes read: all, and
   * written; fewer only at src's end of file, and then nothing is written. A failure's `syscall` says the side: 'pread' src, 'pwrite' this file.
   * Not durable until sync().
   */
  copyFrom?(src: BlockFile, buf: Uint8Array, srcPosition: number, position: number): Promise<number>;
  /**
   * Optional: a long copyFrom() through a smaller buffer: `length` bytes of `src` at `srcPosition`
   * written here at `position`, in pieces of buf.length, each read whole and then written before the
   * next is read (one sequential reading stream), in one request to the I/O threads where both are
   * files of this storage (a hydration chunk). With `sequential`, src is advised it is read in order
   * (posix_fadvise SEQUENTIAL). Resolves with the bytes copied (read and written): `length`, or
   * fewer when src ended early; then the pieces before the short one are written, not it. A
   * failure's `syscall` says the side: 'pread' src, 'pwrite' this file. Not durable until sync().
   */
  copyStreamFrom?(src: BlockFile, buf: Uint8Array, srcPosition: number, position: number, length: number, sequential?: boolean): Promise<number>;
  /**
   * Optional: copyFrom() of many pieces through one buffer: `pieces` are [offset in buf, length,
   * position] (bytes), each read from `src` at `position` into buf and then written here at the same
   * position (the cache file mirrors the disk), in one request to the I/O threads where both are
   * files of this storage (the flusher's batch). Every piece is read before any is written. Resolves
   * with the bytes read: the pieces' sum, all written; fewer when src ended early, and then the
   * copy stopped at that piece and wrote nothing. A failure's `syscall`
   * says the side: 'pread' src, 'pwrite' this file. Not durable until sync().
   */
  copyManyFrom?(src: BlockFile, buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<number>;
  /** fdatasync: everything written before the call is durable when it resolves. */
  sync(): Promise<void>;
  /** Reserves space for [0, length) so later writes never meet ENOSPC; extends the size. */
  allocate(length: number): Promise<void>;
  /** Sets the size (ftruncate); growing adds a hole: no space is allocated. */
  truncate(length: number): Promise<void>;
  /**
   * Frees [offset, offset + length), which reads as zeros afterwards; the size stays
   * (fallocate PUNCH_HOLE | KEEP_SIZE). Like a write, not durable before sync().
   */
  punchHole(offset: number, length: number): Promise<void>;
  /**
   * Makes [offset, offset + length) read as zeros at the least cost the file allows: BLKZEROOUT on
   * a block device, a punched hole in a regular file, written zeros where neither works. Like a
   * write, not durable before sync(). Offsets and lengths are multiples of 512.
   */
  zeroRange(offset: number, length: number): Promise<void>;
  /** Bytes of storage the file holds now (st_blocks x 512): what the filesystem charges for it. */
  allocatedBytes(): Promise<number>;
  /**
   * The first run of allocated bytes at or after `offset`, as [start, end) (lseek SEEK_DATA and
   * SEEK_HOLE; whole filesystem blocks), or null when only holes follow.
   */
  nextData(offset: number): Promise<[number, number] | null>;
  size(): Promise<number>;
  close(): Promise<void>;
}

export interface OpenOptions {
  /** Create the file; fails if it exists. */
  create?: boolean;
  readOnly?: boolean;
  /** O_DIRECT: the caller passes aligned buffers, offsets and lengths. */
  direct?: boolean;
  /** O_EXCL on a block device: fails with EBUSY if it is mounted or claimed. */
  exclusive?: boolean;
}

export interface Storage {
  open(path: string, options?: OpenOptions): Promise<BlockFile>;
  exists(path: string): Promise<boolean>;
  remove(path: string): Promise<void>;
  /** Makes a create or remove in `dir` durable (fsync of the directory). */
  syncDir(dir: string): Promise<void>;
  /** Bytes an unprivileged file in `dir` may still take on its filesystem (statfs f_bavail). */
  freeBytes(dir: string): Promise<number>;
}
