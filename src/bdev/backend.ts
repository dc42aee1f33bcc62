// What a block-device frontend (the NBD server, the FUSE loop) serves: a fixed-size array of bytes.
// CacheEngine satisfies it structurally; tests use small in-memory ones.

export interface BlockBackend {
  /** Size in bytes; fixed while the backend is served. */
  readonly size: number;
  /** Writes, write-zeroes and discards are refused (the frontend reports EPERM). */
  readonly readOnly: boolean;
  /** Reads exactly `length` bytes at `offset`; the range lies inside [0, size). */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Optional: read() into the caller's buffer (buf.byteLength bytes at `offset`). The NBD server
   * then reads straight into its reply and allocates nothing per request.
   */
  readInto?(buf: Buffer, offset: number): Promise<void>;
  /**
   * Optional: readInto() done now, with no promise, where that is cheap (a cache hit in memory).
   * True: buf holds the bytes. False: not done (buf's content undefined); call readInto() or
   * read(). Never throws. The NBD server then answers the read in the turn it arrived.
   */
  readNow?(buf: Buffer, offset: number): boolean;
  /**
   * Optional: write() without FUA done now, with no promise, where that is cheap and allowed (a
   * rewrite of durably dirty blocks). True: written, as a resolved write() would have it. False:
   * not done (maybe partly: the same bytes); call write(). Never throws.
   */
  writeNow?(offset: number, data: Uint8Array): boolean;
  /** Writes all of `data` at `offset`. With `fua`, the data is durable when it resolves. */
  write(offset: number, data: Uint8Array, options?: { fua?: boolean }): Promise<void>;
  /** Every write completed before the call, from any caller, is durable when it resolves. */
  flush(): Promise<void>;
  /**
   * TRIM: the range is no longer needed. The cache engine zeroes it (reads give zeros afterwards,
   * as the loop driver's punched hole does); other backends may leave any content.
   */
  discard(offset: number, length: number): Promise<void>;
  /**
   * WRITE_ZEROES: the range reads as zeros afterwards; with `fua`, durably. Optional: without it
   * the frontend writes zero buffers.
   */
  zero?(offset: number, length: number, options?: { fua?: boolean }): Promise<void>;
}
