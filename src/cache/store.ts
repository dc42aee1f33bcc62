// The persistence layer shared by every data path (userspace engine and the kernel module's
// daemon): cache file, present bitmap file, metadata. The durability rules of docs/design.md are
// enforced here: present bits only after a data sync, dirty bits durable before the data they guard
// changes, dirty bits cleared only through clearFlushed().
import { randomUUID } from 'node:crypto';
import { dirname } from 'node:path';
import {
  CorruptMetadataError,
  DirtyDataError,
  EngineClosedError,
  ForeignCacheError,
  InvalidArgumentError,
  SizeMismatchError,
  ioError,
} from '../errors.js';
import { Bitmap } from './bitmap.js';
import { Coalescer } from './coalesce.js';
import { FILE_ALIGN, Geometry, type Extent } from './layout.js';
import { Metadata, type CacheInfo, type CacheMode, type HistoryLog } from './metadata.js';
import { posixStorage } from '../storage/posix-storage.js';
import type { BlockFile, Storage } from '../storage/storage.js';

export interface CachePaths {
  cache: string;
  bitmap: string;
  metadata: string;
}

/** How the store opens its metadata; tests wrap it to inject crashes at each transaction. */
export interface MetadataFactory {
  create(path: string, identity: Parameters<typeof Metadata.create>[1], mode: CacheMode): Metadata;
  open(path: string): Metadata;
}

export interface OpenStoreOptions {
  paths: CachePaths;
  /** The backing disk as the store needs to know it. */
  backing: { size: number; id: string; description: string };
  mode: CacheMode;
  /** Block size for a new cache; for an existing one it must match if given. */
  blockSize?: number;
  /** Block size of a new cache when `blockSize` is not given (default 4 KiB); never checked against an existing one. */
  defaultBlockSize?: number;
  storage?: Storage;
  metadata?: MetadataFactory;
}

export class CacheStore {
  readonly paths: CachePaths;
  readonly geometry: Geometry;
  /** Blocks whose cache content is durable and valid (mirrors the bitmap file). */
  readonly present: Bitmap;
  /** Blocks whose cache content may differ from the backing disk (mirrors the metadata). */
  readonly dirty: Bitmap;
  /** True when the last shutdown did not close the store cleanly. */
  readonly recoveredFromCrash: boolean;

  readonly #cache: BlockFile;
  readonly #bitmapFile: BlockFile;
  readonly #meta: Metadata;
  readonly #dataSync: Coalescer;
  /** Group commit of the metadata WAL for markDirtyDurable(). */
  readonly #walSync: Coalescer;
  /** Extents of markDirtyDurable() calls whose transaction is written but not yet synced. */
  readonly #pendingDirty = new Set<readonly Extent[]>();
  readonly #dirtyPages = new Set<number>();
  #bitmapWrite: Promise<void> = Promise.resolve();
  #mode: CacheMode;
  #failed: Error | null = null;
  #closed = false;

  private constructor(args: {
    paths: CachePaths;
    geometry: Geometry;
    cache: BlockFile;
    bitmapFile: BlockFile;
    meta: Metadata;
    present: Bitmap;
    dirty: Bitmap;
  }) {
    this.paths = args.paths;
    this.geometry = args.geometry;
    this.#cache = args.cache;
    this.#bitmapFile = args.bitmapFile;
    this.#meta = args.meta;
    this.present = args.present;
    this.dirty = args.dirty;
    this.#mode = args.meta.info.mode;
    this.recoveredFromCrash = !args.meta.info.cleanShutdown;
    this.#dataSync = new Coalescer(() => this.#syncData());
    this.#walSync = new Coalescer(() => this.#meta.syncWal());
  }

  /**
   * Opens the cache for `backing`, creating it if none of its files exist. Every check runs before
   * anything is written, so a refused open changes nothing.
   */
  static async open(options: OpenStoreOptions): Promise<CacheStore> {
    const storage = options.storage ?? posixStorage;
    const factory = options.metadata ?? Metadata;
    const { paths, backing } = options;
    if (options.blockSize !== undefined) new Geometry(backing.size, options.blockSize);

    let meta: Metadata;
    const metaExists = await storage.exists(paths.metadata);
    if (metaExists) {
      meta = factory.open(paths.metadata);
    } else {
      for (const p of [paths.cache, paths.bitmap]) {
        if (await storage.exists(p)) {
          throw new CorruptMetadataError(
            `${p} exists but its metadata ${paths.metadata} does not; move it away or re-create the cache with 'ulobdev discard --force'`,
          );
        }
      }
      const blockSize = options.blockSize ?? options.defaultBlockSize ?? 4096;
      meta = factory.create(
        paths.metadata,
        { uuid: randomUUID(), blockSize, backingSize: backing.size, backingId: backing.id },
        options.mode,
      );
    }

    let files: { cache: BlockFile; bitmapFile: BlockFile } | undefined;
    try {
      const info = meta.info;
      checkIdentity(info, backing, options.blockSize, paths.metadata);
      const geometry = new Geometry(info.backingSize, info.blockSize);
      files =
        info.state === 'creating'
          ? await createFiles(storage, paths, geometry, meta)
          : await openFiles(storage, paths, geometry);
      const { cache, bitmapFile } = files;
      const present = new Bitmap(geometry.blockCount, Buffer.alloc(geometry.bitmapFileSize));
      await readFully(bitmapFile, present.buffer, paths.bitmap);
      const dirty = new Bitmap(geometry.blockCount);
      for (const e of meta.dirtyExtents()) dirty.setRange(e.start, e.start + e.count);
      // Bits past the last block are padding; a set one means the bitmap is not ours.
      const padded = new Bitmap(present.buffer.byteLength * 8, present.buffer);
      if (padded.nextSet(geometry.blockCount) < padded.bits) {
        throw new CorruptMetadataError(`${paths.bitmap} has bits set beyond the disk's last block`);
      }
      // Dirty implies present: a dirty block's only valid copy is in the cache.
      for (const e of dirty.runs()) present.setRange(e.start, e.start + e.count);

      const store = new CacheStore({ paths, geometry, cache, bitmapFile, meta, present, dirty });
      // From here on the open is accepted: mark the cache in use (unclean until close).
      meta.replaceDirty(dirty.runs());
      if (info.mode !== options.mode) meta.setMode(options.mode);
      store.#mode = options.mode;
      meta.setCleanShutdown(false);
      return store;
    } catch (err) {
      meta.close();
      await files?.cache.close().catch(() => undefined);
      await files?.bitmapFile.close().catch(() => undefined);
      // A cache this call began to create is removed again: a refused open leaves nothing behind.
      if (!metaExists) {
        for (const p of [paths.cache, paths.bitmap, paths.metadata, `${paths.metadata}-wal`, `${paths.metadata}-shm`]) {
          await storage.remove(p).catch(() => undefined);
        }
      }
      throw err;
    }
  }

  /**
   * Removes a cache (cache file, bitmap, metadata) so the next open re-creates it. Refused while
   * dirty blocks exist, unless `force`: they are the only copy of data the disk has not received.
   */
  static async discard(paths: CachePaths, options: { force?: boolean; storage?: Storage; metadata?: MetadataFactory } = {}): Promise<{ dirtyBlocks: number }> {
    const storage = options.storage ?? posixStorage;
    let dirtyBlocks = 0;
    if (await storage.exists(paths.metadata)) {
      let meta: Metadata;
      try {
        meta = (options.metadata ?? Metadata).open(paths.metadata);
      } catch (err) {
        // Unreadable metadata cannot say what is dirty: only --force may throw such a cache away.
        // A cache in use (CacheBusyError) is never removed.
        if (err instanceof CorruptMetadataError && options.force) {
          for (const p of [paths.metadata, `${paths.metadata}-wal`, `${paths.metadata}-shm`, paths.bitmap, paths.cache]) {
            await storage.remove(p);
          }
          return { dirtyBlocks: 0 };
        }
        throw err;
      }
      try {
        const dirty = new Bitmap(new Geometry(meta.info.backingSize, meta.info.blockSize).blockCount);
        for (const e of meta.dirtyExtents()) dirty.setRange(e.start, e.start + e.count);
        dirtyBlocks = dirty.count();
        if (dirtyBlocks > 0 && !options.force) {
          throw new DirtyDataError(
            `${paths.cache} holds ${dirtyBlocks} dirty blocks the disk has not received; flush first, or pass --force to lose them`,
          );
        }
      } finally {
        meta.close();
      }
    }
    for (const p of [paths.metadata, `${paths.metadata}-wal`, `${paths.metadata}-shm`, paths.bitmap, paths.cache]) {
      await storage.remove(p);
    }
    return { dirtyBlocks };
  }

  get info(): Readonly<CacheInfo> {
    return this.#meta.info;
  }

  /**
   * The history tables of the metadata, for the write-back scheduler. Exposed as the narrow
   * HistoryLog interface: history rows are not durable state, and nothing here can change the
   * dirty set, the epoch or the flags this class guards.
   */
  get history(): HistoryLog {
    return this.#meta;
  }

  get mode(): CacheMode {
    return this.#mode;
  }

  get failed(): Error | null {
    return this.#failed;
  }

  readData(buf: Uint8Array, position: number): Promise<number> {
    this.#assertUsable();
    return this.#cache.read(buf, position);
  }

  async writeData(buf: Uint8Array, position: number): Promise<void> {
    this.#assertUsable();
    await this.#cache.write(buf, position);
  }

  /** Makes every cache write that completed before the call durable (one fdatasync, shared). */
  syncData(): Promise<void> {
    this.#assertUsable();
    return this.#dataSync.run();
  }

  /**
   * Invariant 1: marks blocks present. The caller must have synced their data (syncData) after
   * writing it. Persisted lazily: a lost present bit only costs a refetch.
   */
  markPresent(extents: Iterable<Extent>): void {
    for (const e of extents) {
      this.present.setRange(e.start, e.start + e.count);
      this.#touchBitmap(e);
    }
  }

  /**
   * Invariant 2: makes blocks dirty (and present) durably, in one metadata transaction. Callers
   * await this before changing the cache content of a clean block.
   */
  markDirty(extents: readonly Extent[]): void {
    if (extents.length === 0) return;
    this.#assertUsable();
    this.#guard(() => this.#meta.addDirty(extents));
    this.#setDirty(extents);
  }

  /** The in-memory side of markDirty: dirty implies present. */
  #setDirty(extents: readonly Extent[]): void {
    for (const e of extents) {
      this.dirty.setRange(e.start, e.start + e.count);
      if (!this.present.allSet(e.start, e.start + e.count)) {
        this.present.setRange(e.start, e.start + e.count);
        this.#touchBitmap(e);
      }
    }
  }

  /**
   * markDirty() that keeps the event loop free while the disk works (rule 3, as markDirty): the
   * transaction is written at once (Metadata.addDirtyUnsynced, microseconds), and its WAL fsync
   * runs on the threadpool, shared with every other intent that arrives meanwhile (group commit).
   * The blocks turn dirty (`dirty`, `present`) only when it resolves: callers await it before
   * changing the cache content of a clean block. Until then they are pending, and clearFlushed()
   * and close(), which rewrite the whole dirty table, keep them in it.
   */
  async markDirtyDurable(extents: readonly Extent[]): Promise<void> {
    if (extents.length === 0) return;
    this.#assertUsable();
    this.#guard(() => this.#meta.addDirtyUnsynced(extents));
    this.#pendingDirty.add(extents);
    try {
      await this.#io(() => this.#walSync.run(), 'sync the metadata', this.paths.metadata);
    } finally {
      this.#pendingDirty.delete(extents);
    }
    this.#setDirty(extents);
  }

  /**
   * Invariant 4: clears dirty bits of blocks the backing disk has durably received. The caller
   * must have synced the backing after writing them. Bumps the flush epoch.
   */
  clearFlushed(extents: readonly Extent[]): void {
    this.#assertUsable();
    // The remaining set is computed from the runs, not a copy of the bitmap: a copy is 512 MiB on
    // a 16 TiB disk of 4 KiB blocks. Intents still being synced stay in the table this rewrites
    // (their blocks are being written); rows may overlap.
    const pending = [...this.#pendingDirty].flat();
    const rows = [...subtractExtents(this.dirty.runs(), extents), ...pending];
    this.#guard(() => this.#meta.replaceDirty(rows, this.#meta.info.flushEpoch + 1));
    for (const e of extents) this.dirty.clearRange(e.start, e.start + e.count);
  }

  /**
   * Drops clean blocks from the cache. Durable before it resolves, so the freed cache space can be
   * rewritten without a stale present bit surviving a crash.
   */
  async evict(extents: readonly Extent[]): Promise<void> {
    for (const e of extents) {
      if (this.dirty.nextSet(e.start, e.start + e.count) < e.start + e.count) {
        throw new InvalidArgumentError(`cannot evict dirty blocks in ${e.start}+${e.count}`);
      }
    }
    for (const e of extents) {
      this.present.clearRange(e.start, e.start + e.count);
      this.#touchBitmap(e);
    }
    await this.persistBitmap(true);
  }

  /** Writes changed bitmap pages; with `sync`, also fdatasyncs the bitmap file. Serialized. */
  persistBitmap(sync: boolean): Promise<void> {
    const run = this.#bitmapWrite.then(async () => {
      this.#assertUsable();
      const pages = [...this.#dirtyPages].sort((a, b) => a - b);
      this.#dirtyPages.clear();
      for (const page of pages) {
        // A copy: the live bitmap changes while the write is in flight.
        const bytes = Buffer.from(this.present.buffer.subarray(page * FILE_ALIGN, (page + 1) * FILE_ALIGN));
        await this.#io(() => this.#bitmapFile.write(bytes, page * FILE_ALIGN), 'write the bitmap', this.paths.bitmap);
      }
      if (sync) await this.#io(() => this.#bitmapFile.sync(), 'sync the bitmap', this.paths.bitmap);
    });
    this.#bitmapWrite = run.catch(() => undefined);
    return run;
  }

  /** Persists everything and marks the shutdown clean. */
  async close(): Promise<void> {
    if (this.#closed) return;
    try {
      if (!this.#failed) {
        await this.#dataSync.idle();
        // No WAL sync may be running on the fd that closing the metadata closes.
        await this.#walSync.idle();
        await this.syncData();
        await this.persistBitmap(true);
        const dirty = this.dirty.clone();
        for (const pending of this.#pendingDirty) for (const e of pending) dirty.setRange(e.start, e.start + e.count);
        this.#meta.replaceDirty(dirty.runs());
        this.#meta.setCleanShutdown(true);
      }
    } finally {
      this.#closed = true;
      this.#meta.close();
      await this.#cache.close().catch(() => undefined);
      await this.#bitmapFile.close().catch(() => undefined);
    }
  }

  /** Drops the store as a crash would: no syncs, no clean flag. For tests and fatal errors. */
  async abandon(): Promise<void> {
    this.#closed = true;
    this.#failed ??= new EngineClosedError('cache store abandoned');
    this.#meta.close();
    await this.#cache.close().catch(() => undefined);
    await this.#bitmapFile.close().catch(() => undefined);
  }

  #touchBitmap(e: Extent): void {
    const first = Math.floor(e.start / 8 / FILE_ALIGN);
    const last = Math.floor((e.start + e.count - 1) / 8 / FILE_ALIGN);
    for (let p = first; p <= last; p++) this.#dirtyPages.add(p);
  }

  async #syncData(): Promise<void> {
    this.#assertUsable();
    await this.#io(() => this.#cache.sync(), 'sync the cache');
  }

  #assertUsable(): void {
    if (this.#failed) throw new EngineClosedError(`cache ${this.paths.cache} failed earlier: ${this.#failed.message}`);
    if (this.#closed) throw new EngineClosedError(`cache ${this.paths.cache} is closed`);
  }

  /**
   * A failed sync or metadata write leaves the cache's durable state unknown (the kernel may have
   * dropped the dirty pages), so the store refuses all further I/O rather than guess.
   */
  async #io(fn: () => Promise<void>, what: string, path = this.paths.cache): Promise<void> {
    try {
      await fn();
    } catch (err) {
      const wrapped = ioError(what, path, err);
      this.#failed ??= wrapped;
      throw wrapped;
    }
  }

  #guard(fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.#failed ??= err as Error;
      throw err;
    }
  }
}

/** The parts of sorted, disjoint `runs` outside `remove` (any order, may overlap). */
export function* subtractExtents(runs: Iterable<Extent>, remove: readonly Extent[]): Generator<Extent> {
  const cut = [...remove].filter((e) => e.count > 0).sort((a, b) => a.start - b.start);
  let i = 0;
  for (const run of runs) {
    let start = run.start;
    const end = run.start + run.count;
    while (i < cut.length && cut[i]!.start + cut[i]!.count <= start) i++;
    for (let j = i; j < cut.length && cut[j]!.start < end && start < end; j++) {
      const c = cut[j]!;
      if (c.start > start) yield { start, count: c.start - start };
      start = Math.max(start, c.start + c.count);
    }
    if (start < end) yield { start, count: end - start };
  }
}

function checkIdentity(info: CacheInfo, backing: OpenStoreOptions['backing'], blockSize: number | undefined, metaPath: string): void {
  if (info.backingId !== backing.id) {
    throw new ForeignCacheError(
      `${metaPath} is the cache of another disk (${info.backingId}), not of ${backing.description} (${backing.id})`,
    );
  }
  if (info.backingSize !== backing.size) {
    throw new SizeMismatchError(
      `${backing.description} is ${backing.size} bytes but its cache was made for ${info.backingSize} bytes; re-create it with 'ulobdev discard'`,
    );
  }
  if (blockSize !== undefined && blockSize !== info.blockSize) {
    throw new SizeMismatchError(`${metaPath}: the cache uses ${info.blockSize}-byte blocks, not ${blockSize}; omit --block-size or re-create it`);
  }
}

async function createFiles(storage: Storage, paths: CachePaths, geometry: Geometry, meta: Metadata) {
  // A previous creation may have crashed midway: its files are ours to replace.
  await storage.remove(paths.cache);
  await storage.remove(paths.bitmap);
  let cache: BlockFile | undefined;
  let bitmapFile: BlockFile | undefined;
  try {
    cache = await storage.open(paths.cache, { create: true });
    await cache.allocate(geometry.cacheFileSize);
    bitmapFile = await storage.open(paths.bitmap, { create: true });
    await bitmapFile.allocate(geometry.bitmapFileSize);
    await cache.sync();
    await bitmapFile.sync();
    for (const dir of new Set([dirname(paths.cache), dirname(paths.bitmap)])) await storage.syncDir(dir);
    meta.setState('ready');
    return { cache, bitmapFile };
  } catch (err) {
    await cache?.close().catch(() => undefined);
    await bitmapFile?.close().catch(() => undefined);
    const code = (err as { code?: string }).code;
    throw code === 'ENOSPC'
      ? ioError('allocate the cache (not enough space for a cache the size of the disk)', paths.cache, err)
      : ioError('create the cache', (err as { path?: string }).path ?? paths.cache, err);
  }
}

async function openFiles(storage: Storage, paths: CachePaths, geometry: Geometry) {
  let cache: BlockFile | undefined;
  try {
    cache = await storage.open(paths.cache);
    const cacheSize = await cache.size();
    if (cacheSize !== geometry.cacheFileSize) {
      throw new SizeMismatchError(`${paths.cache} is ${cacheSize} bytes, expected ${geometry.cacheFileSize} for this disk`);
    }
    const bitmapFile = await storage.open(paths.bitmap);
    const bitmapSize = await bitmapFile.size();
    if (bitmapSize !== geometry.bitmapFileSize) {
      await bitmapFile.close();
      throw new SizeMismatchError(`${paths.bitmap} is ${bitmapSize} bytes, expected ${geometry.bitmapFileSize} for this disk`);
    }
    return { cache, bitmapFile };
  } catch (err) {
    await cache?.close().catch(() => undefined);
    if (err instanceof SizeMismatchError) throw err;
    throw ioError('open the cache', (err as { path?: string }).path ?? paths.cache, err);
  }
}

async function readFully(file: BlockFile, buf: Buffer, path: string): Promise<void> {
  let n: number;
  try {
    n = await file.read(buf, 0);
  } catch (err) {
    throw ioError('read', path, err);
  }
  if (n !== buf.byteLength) throw new SizeMismatchError(`${path}: short read (${n} of ${buf.byteLength} bytes)`);
}

