// The persistence layer shared by every data path (userspace engine and the kernel module's
// daemon): cache file, present bitmap file, metadata. The durability rules of docs/design.md are
// enforced here: present bits only after a data sync, dirty bits durable before the data they guard
// changes, dirty bits cleared only through clearFlushed(), present bits cleared durably before the
// cache file is punched (evict), zeroed blocks recorded before they are punched (zero).
//
// Zeroed blocks (TRIM, WRITE_ZEROES) are dirty and not present: they read as zeros, the disk gets
// zeros at the next flush, and the cache file need not hold them. That is the uloop module's
// representation too (ULOOP_F_ZERO), so its bitmaps and ours are the same bits.
//
// With a budget (--cache-size) the cache file is sparse and the store counts the blocks it holds:
// present ones, blocks the engine has reserved for data not yet present, and blocks being punched.
import { randomUUID } from 'node:crypto';
import { existsSync, promises as fsp } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { blockStack, majorMinor } from '../sys.js';
import {
  CorruptMetadataError,
  DirtyDataError,
  DiskChangedError,
  EngineClosedError,
  ForeignCacheError,
  InvalidArgumentError,
  MetadataFullError,
  SizeMismatchError,
  ioError,
} from '../errors.js';
import { formatBytes } from '../units.js';
import { Bitmap } from './bitmap.js';
import { Clock } from './clock.js';
import { Coalescer } from './coalesce.js';
import { checkDiskRecord, ownerEntry, type DiskRecord, type DiskRecords } from './disk-record.js';
import { FILE_ALIGN, Geometry, MAX_BLOCK_SIZE, type Extent } from './layout.js';
import { DEFAULT_EVICTION_UNIT, Metadata, type CacheInfo, type CacheMode, type HistoryLog } from './metadata.js';
import { DEFAULT_FLASH_RESERVE, FlashReserve, reservePath } from './reserve.js';
import { posixStorage } from '../storage/posix-storage.js';
import type { BlockFile, Storage } from '../storage/storage.js';
import type { Source, WritableSource } from '../source/source.js';

export interface CachePaths {
  cache: string;
  bitmap: string;
  metadata: string;
}

/** How the store opens its metadata; tests wrap it to inject crashes at each transaction. */
export interface MetadataFactory {
  create(path: string, identity: Parameters<typeof Metadata.create>[1], mode: CacheMode, space?: Parameters<typeof Metadata.create>[3]): Metadata;
  open(path: string): Metadata;
}

/** Smallest and largest eviction unit (bytes); a unit is never smaller than the block. */
export const MIN_EVICTION_UNIT = 64 * 1024;
export const MAX_EVICTION_UNIT = MAX_BLOCK_SIZE;

/** Where the space of a budgeted cache goes, in blocks (docs/reference.md, "Status"). */
export interface SpaceUse {
  /** Blocks the budget allows; Infinity without a budget. */
  budgetBlocks: number;
  /** presentBlocks + reservedBlocks + punchingBlocks: what the cache file may hold. */
  usedBlocks: number;
  /** Present blocks (clean or dirty): the cache file holds them. */
  presentBlocks: number;
  /** Reserved by the data path for data being written that is not present yet. */
  reservedBlocks: number;
  /** Evicted or zeroed, not yet punched. */
  punchingBlocks: number;
  /** Held in the cache file by a kernel frontend and not recorded here yet (see outsideBlocks). */
  outsideBlocks: number;
}

/** Dirty-intent rounds since the store opened (CacheStore.intentStats, status `intents`). */
export interface IntentStats {
  /** Rounds completed: one transaction and one WAL fsync each. */
  rounds: number;
  /** Blocks those rounds made durably dirty. */
  blocks: number;
  /** Milliseconds spent waiting for the rounds' WAL fsyncs, summed. */
  syncMs: number;
  /** Rounds whose start waited for the writers of the round before to come back (the gather). */
  gathered: number;
  /** Of those, waits that ended at CacheStore.intentGatherMs with fewer blocks than expected. */
  gatherTimeouts: number;
}

/**
 * How long a dirty-intent round may wait at least, counted from the end of the round before it,
 * for that round's writers to come back with their next first writes (CacheStore.intentGatherMs).
 */
export const INTENT_GATHER_MS = 1;
/**
 * A round may wait as long as the round before took in its WAL fsync (as jbd2 batches a journal
 * commit for up to its average commit time: a wait shorter than an fsync that fills the round
 * costs less than the fsync of a second round), but no longer than this.
 */
const INTENT_GATHER_MAX_MS = 10;
/** After a gather that timed out, this many rounds start without waiting. */
const GATHER_SKIP_ROUNDS = 8;

export interface OpenStoreOptions {
  paths: CachePaths;
  /** The backing disk as the store needs to know it. */
  backing: { size: number; id: string; description: string };
  mode: CacheMode;
  /** Block size for a new cache; for an existing one it must match if given. */
  blockSize?: number;
  /**
   * Bytes of flash the cache file may take (--cache-size). A new cache without it is a full,
   * preallocated mirror of the disk; an existing cache without it keeps what it has. Given for an
   * existing cache it replaces the budget: a smaller one evicts clean blocks before the open
   * returns; one below the dirty data is refused.
   */
  budget?: number;
  /**
   * The command's option for a budget ('--cache-size'), named when a new full mirror does not fit
   * on its filesystem; without it the refusal names only a larger filesystem.
   */
  budgetOption?: string;
  /** Eviction unit in bytes for a new cache (default 256 KiB); an existing cache keeps its own. */
  evictionUnit?: number;
  /**
   * A kernel device still serves this cache file (a /dev/uloopN whose daemon died, about to be
   * taken back): it may serve blocks the store never recorded (fills answered, not committed), so
   * the open punches no leftovers and evicts nothing (a smaller budget is reached later, through
   * the kernel's EVICT). Such blocks stay in the cache file, uncounted, until the device is added
   * afresh.
   */
  servedByKernel?: boolean;
  /** Block size of a new cache when `blockSize` is not given (default 4 KiB); never checked against an existing one. */
  defaultBlockSize?: number;
  /**
   * Bytes of the flash reserve (src/cache/reserve.ts: METADATA-reserve, released so a flush can
   * commit on a full flash filesystem). Default DEFAULT_FLASH_RESERVE (1 MiB); 0: none.
   */
  flashReserve?: number;
  storage?: Storage;
  metadata?: MetadataFactory;
  /**
   * The host's disk records (src/cache/disk-record.ts): with them the open refuses a second cache
   * of a disk whose cache holds dirty data and a cache the disk was written past; a write-back open
   * takes the disk's record, and every flush bumps its generation before it writes the disk.
   * Without them (an HTTP image, tests) none of this happens.
   */
  records?: DiskRecords;
  /**
   * Reads the disk's fingerprint (src/cache/fingerprint.ts: a few MiB where filesystems write at
   * mount). With it the open compares it with the one the cache kept, and a disk written without
   * ulobdev since is found: a cache without dirty data starts cold (diskChanged), one with dirty
   * data is refused (DiskChangedError). The store keeps it current: cleared before a flush writes
   * the disk, taken again once that flush is synced (refreshDiskFingerprint). Without it (an HTTP
   * image, tests) none of this happens.
   */
  fingerprint?: () => Promise<string>;
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
  /**
   * Clean blocks evicted at open to fit a budget smaller than what the cache held (a full mirror
   * given --cache-size, or a smaller budget than before); 0 when nothing had to go.
   */
  shrunkBlocks = 0;
  /**
   * Blocks of data the cache file held that no present bit covered, punched at open after a crash
   * (fills and writes the dead daemon had not committed). Counted for a cache that already had a
   * budget only: its file then held nothing else (a full mirror's file is preallocated).
   */
  droppedBlocks = 0;
  /** This open gave the cache a smaller budget than it had (or a first one). */
  budgetLowered = false;
  /** Blocks per eviction unit (at least 1). */
  readonly unitBlocks: number;
  /** The eviction clock; null without a budget (nothing is ever evicted then). */
  readonly clock: Clock | null;
  /** The host's disk records and this disk's id, when the open was given them. */
  readonly #records: { records: DiskRecords; disk: string; device: string } | null;
  /** The generation the running flush took (prepareDiskWrite), written with its clearFlushed. */
  #pendingGeneration: number | undefined;
  /** OpenStoreOptions.fingerprint. */
  readonly #fingerprint: (() => Promise<string>) | null;
  /** prepareDiskWrite calls so far: a fingerprint read across one is of a disk being written. */
  #diskWrites = 0;
  /** A flush wrote the disk since the fingerprint was last taken (it is null in the metadata). */
  #fingerprintDue = false;
  #diskChanged = false;
  /** CacheStore.fingerprintError. */
  #fingerprintError: unknown = null;
  /** The refreshDiskFingerprint running now, which close() waits for (a detach right after a flush). */
  #refreshing: Promise<void> | null = null;

  readonly #cache: BlockFile;
  readonly #bitmapFile: BlockFile;
  readonly #meta: Metadata;
  readonly #dataSync: Coalescer;
  /** Group commit of dirty intents for markDirtyDurable(): one transaction and one WAL fsync per round. */
  readonly #intentRound: Coalescer;
  /** Extents of markDirtyDurable() calls waiting for the next round (not yet in any transaction). */
  #gatheredDirty: Extent[] = [];
  /** Extents of rounds whose transaction is written but not yet synced. */
  readonly #pendingDirty = new Set<readonly Extent[]>();
  /** What markDirtyDurable's rounds have cost since open (intentStats()). */
  readonly #intentCounts: IntentStats = { rounds: 0, blocks: 0, syncMs: 0, gathered: 0, gatherTimeouts: 0 };
  /**
   * How long a dirty-intent round may wait at least for the writers of the round before it to come
   * back (milliseconds from that round's end; #gatherGate); longer, up to 10 ms, when that round's
   * WAL fsync took longer. Timers have a resolution of 1 ms, so a wait of 1 ms that runs out
   * ends 1-2 ms after the round before.
   */
  intentGatherMs = INTENT_GATHER_MS;
  /** When the last intent round ended (performance.now()), how many blocks of writers it made dirty, its fsync's ms. */
  #lastRoundEnd = 0;
  #lastRoundBlocks = 0;
  #lastRoundSyncMs = 0;
  /** Blocks of gathering markDirtyDurable() calls (options.gather) since the last round ended. */
  #arrivedSinceRound = 0;
  /** Of the extents gathered for the next round, the blocks of gathering calls. */
  #gatheredWriters = 0;
  /** A call that does not gather (a commit, a kernel's record) waits for the next round: start it now. */
  #gatherUrgent = false;
  /** Starts the round #gatherGate holds back, or null when none is held. */
  #gatherWake: (() => void) | null = null;
  /** Rounds left to start without waiting, after a gather that timed out. */
  #gatherSkip = 0;
  /** Bitmap pages changed in memory and not yet written. */
  readonly #dirtyPages = new Set<number>();
  #bitmapWrite: Promise<void> = Promise.resolve();
  #mode: CacheMode;
  #failed: Error | null = null;
  /** True while #failed is a failed fdatasync of the cache file and nothing worse (recoverDataSync). */
  #dataSyncFailed = false;
  #closed = false;
  #presentCount: number;
  /**
   * Zeroed blocks (dirty and not present), kept where the bits change (markPresent, #setDirty,
   * zero, clearFlushed) so that zeroBlocks(), which status and the write-back scheduler's tick
   * call, does not walk every dirty run; null: count again on the next zeroBlocks().
   */
  #zeroCount: number | null = null;
  /** The bitmaps' generations #zeroCount was counted at (a direct write of a buffer makes it stale). */
  #zeroAt = { dirty: -1, present: -1 };
  #reserved = 0;
  #punching = 0;
  /**
   * Blocks a failed punch left allocated: still held in the cache file (counted as used) but no
   * longer on their way back, so a wait for room does not wait for them (it would never end).
   * The next open's leftover punch frees them.
   */
  #leaked = 0;
  #outside = 0;
  #spaceListeners: (() => void)[] = [];
  /**
   * The flash reserve (src/cache/reserve.ts), or null (OpenStoreOptions.flashReserve 0): room on
   * the flash filesystem the engine releases so that a flush can commit when it is full.
   */
  flashReserve: FlashReserve | null = null;

  private constructor(args: {
    paths: CachePaths;
    geometry: Geometry;
    cache: BlockFile;
    bitmapFile: BlockFile;
    meta: Metadata;
    present: Bitmap;
    dirty: Bitmap;
    /** The budget this open serves with (a full mirror getting one has none in its metadata yet). */
    budget: number | null;
    records?: { records: DiskRecords; disk: string; device: string };
    fingerprint?: () => Promise<string>;
  }) {
    this.#records = args.records ?? null;
    this.#fingerprint = args.fingerprint ?? null;
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
    this.#presentCount = args.present.count();
    this.unitBlocks = Math.max(1, args.meta.info.evictionUnit / args.geometry.blockSize);
    this.clock = args.budget === null ? null : new Clock(args.geometry.blockCount, this.unitBlocks);
    this.#intentRound = new Coalescer(
      () => this.#recordIntents(),
      () => this.#gatherGate(),
    );
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
    if (options.evictionUnit !== undefined) assertEvictionUnit(options.evictionUnit, 4096);
    if (options.budget !== undefined && !(Number.isSafeInteger(options.budget) && options.budget > 0)) {
      throw new InvalidArgumentError(`the cache budget must be a positive number of bytes, got ${String(options.budget)}`);
    }

    let meta: Metadata;
    const metaExists = await storage.exists(paths.metadata);
    if (metaExists) {
      meta = factory.open(paths.metadata);
    } else {
      for (const p of [paths.cache, paths.bitmap]) {
        if (await storage.exists(p)) {
          // Not a cache we can prove is ours (it may be the disk, or another program's file): never
          // point at 'discard', which would remove it.
          throw new CorruptMetadataError(
            `${p} exists but its metadata ${paths.metadata} does not, so it is not a ulobdev cache; give -c and -b paths that do not exist yet (a new cache is made there)`,
          );
        }
      }
      const blockSize = options.blockSize ?? options.defaultBlockSize ?? 4096;
      meta = factory.create(
        paths.metadata,
        { uuid: randomUUID(), blockSize, backingSize: backing.size, backingId: backing.id },
        options.mode,
        { budget: options.budget ?? null, evictionUnit: Math.max(options.evictionUnit ?? DEFAULT_EVICTION_UNIT, blockSize) },
      );
    }

    let files: { cache: BlockFile; bitmapFile: BlockFile } | undefined;
    try {
      const info = meta.info;
      checkIdentity(info, backing, options.blockSize, paths.metadata, () => madeFor(options.records, info), () => dirtyBytesOf(meta!, info.blockSize), paths.cache);
      // Fixed at creation like the block size, and refused alike rather than ignored (newuser11 finding 8).
      if (options.evictionUnit !== undefined && info.state === 'ready' && Math.max(options.evictionUnit, info.blockSize) !== info.evictionUnit) {
        throw new SizeMismatchError(
          `${paths.metadata}: the cache uses ${formatBytes(info.evictionUnit)} eviction units, not ${formatBytes(options.evictionUnit)}; omit --eviction-unit or re-create it`,
        );
      }
      const geometry = new Geometry(info.backingSize, info.blockSize);
      const budget = options.budget ?? info.budget;
      const creating = info.state === 'creating';
      if (budget !== null) checkBudget(budget, Math.max(info.evictionUnit, info.blockSize), paths.cache);
      // A new cache's bitmap (preallocated: 384 MiB for a 12 TiB disk) takes from the same free
      // space when it lives beside the cache file (newuser13: it was left out).
      if (creating && budget !== null) await checkFreeSpace(storage, paths, budget, geometry, 0, bitmapBesideCache(paths, geometry));
      if (creating && budget === null) await checkMirrorSpace(storage, paths, geometry, backing.description, options.budgetOption);
      files = creating ? await createFiles(storage, paths, geometry, meta, budget !== null) : await openFiles(storage, paths, geometry, backing.description, info.bitmapPath);
      const { cache, bitmapFile } = files;
      const present = new Bitmap(geometry.blockCount, Buffer.alloc(geometry.bitmapFileSize));
      await readFully(bitmapFile, present.buffer, paths.bitmap);
      // Bits past the last block are padding; a set one means the bitmap is not ours.
      const padded = new Bitmap(present.buffer.byteLength * 8, present.buffer);
      if (padded.nextSet(geometry.blockCount) < padded.bits) {
        throw new CorruptMetadataError(`${paths.bitmap} has bits set beyond the disk's last block`);
      }
      // The dirty set is the union of the rows; whether a block is zeroed, the last row naming it.
      const dirty = new Bitmap(geometry.blockCount);
      const zeroed = new Bitmap(geometry.blockCount);
      for (const r of meta.dirtyRows()) {
        dirty.setRange(r.start, r.start + r.count);
        if (r.zero) zeroed.setRange(r.start, r.start + r.count);
        else zeroed.clearRange(r.start, r.start + r.count);
      }
      // Dirty implies present, except for zeroed blocks: the cache file does not hold those, and a
      // present bit the bitmap file may still carry for one is stale (cleared below, durably).
      const staleBits: Extent[] = [];
      for (const e of dirty.runs()) {
        for (const data of zeroed.gaps(e.start, e.start + e.count)) present.setRange(data.start, data.start + data.count);
      }
      for (const z of zeroed.runs()) {
        if (present.nextSet(z.start, z.start + z.count) < z.start + z.count) staleBits.push(z);
        present.clearRange(z.start, z.start + z.count);
      }
      if (budget !== null) {
        // Checked before anything is written: a refused budget changes nothing. Only a budget set
        // or changed now: a cache may hold more dirty data than its own budget (on /dev/uloopN
        // the kernel writes whole missing blocks without asking, and a daemon killed before its
        // budget flush leaves them), and its next attach must take it back and flush it down.
        const dirtyData = dirty.count() - zeroed.count();
        if (budget !== info.budget && dirtyData * geometry.blockSize > budget) {
          throw new InvalidArgumentError(
            `a cache budget of ${formatBytes(budget)} is smaller than the ${formatBytes(dirtyData * geometry.blockSize)} of dirty data ${paths.cache} holds; ` +
              `flush first ('ulobdev flush --wait'), or give at least ${formatBytes(dirtyData * geometry.blockSize)}`,
          );
        }
        if (!creating && budget !== info.budget) await checkFreeSpace(storage, paths, budget, geometry, await cache.allocatedBytes());
        // The last check: a full mirror getting a budget must be able to punch. A block nothing
        // holds (not present, not dirty) is punched as the probe: nothing reads its bytes.
        const free = present.nextClear(0);
        if (!creating && info.budget === null && free < geometry.blockCount && !dirty.get(free)) {
          try {
            await cache.punchHole(geometry.blockOffset(free), geometry.blockLength(free) + (-geometry.blockLength(free) & (FILE_ALIGN - 1)));
          } catch (err) {
            const code = (err as { code?: string }).code;
            if (code !== 'EOPNOTSUPP' && code !== 'ENOTSUP') throw ioError('punch a hole in', paths.cache, err);
            throw new InvalidArgumentError(
              `the filesystem of ${paths.cache} cannot punch holes, which a cache budget needs (ext4, XFS, btrfs and tmpfs can); keep it without --cache-size`,
            );
          }
        }
      }

      // The last refusal: another cache of this disk with dirty data, or a disk written past this
      // cache (src/cache/disk-record.ts). Nothing is written before it.
      let generation: number | undefined;
      if (options.records) {
        generation = checkDiskRecord(options.records, backing.id, {
          uuid: info.uuid,
          cache: resolve(paths.cache),
          metadata: resolve(paths.metadata),
          diskGeneration: info.diskGeneration,
          created: creating,
          dirtyBytes: dirty.count() * geometry.blockSize,
          flushEpoch: info.flushEpoch,
          description: backing.description,
        }).generation;
      }
      // A disk written without ulobdev since this cache last left it (docs/design.md, "A disk
      // written without ulobdev"): its clean blocks may be older than the disk's. Unknown (null:
      // a flush was cut, an older format, a new cache) is taken as it is.
      let fingerprint: string | undefined;
      let diskChanged = false;
      let fingerprintError: unknown = null;
      if (options.fingerprint) {
        // A disk that cannot be read there (a bad sector in its first or last MiB) loses the check
        // of this attach, not the attach: the stored fingerprint stays for the next one.
        try {
          fingerprint = await options.fingerprint();
        } catch (err) {
          fingerprintError = err;
        }
        const known = creating ? null : info.diskFingerprint;
        if (fingerprint !== undefined && known !== null && known !== fingerprint) {
          if (dirty.count() > 0) throw diskChangedDirty(paths.cache, backing.description, dirty.count() * geometry.blockSize, meta.journalMaybeMissing ? paths.metadata : undefined);
          if (options.servedByKernel) {
            throw new DiskChangedError(
              `${backing.description} was written without ulobdev while its device waited for the daemon that died, and that device still serves ${paths.cache}'s older blocks: ` +
                `detach it, then attach again (the cache holds no dirty data and starts cold); nothing was changed`,
            );
          }
          diskChanged = true;
        }
      }
      const records = options.records && { records: options.records, disk: backing.id, device: backing.description };
      // The clock from the budget of this open, not the metadata's: a full mirror given a budget
      // (--cache-size again) has none recorded yet, and without a clock nothing is ever evicted
      // (writes then waited for ever on a budget full of clean blocks).
      const store = new CacheStore({ paths, geometry, cache, bitmapFile, meta, present, dirty, budget, records, fingerprint: options.fingerprint });
      store.#fingerprintError = fingerprintError;
      // A write-back open takes the disk first: its record names this cache, which may hold dirty
      // data until a close says otherwise. A record that cannot be written fails the open before
      // the cache is changed. A read-only one writes nothing of the disk's.
      if (generation !== undefined && options.mode === 'writeback') store.#takeRecord(generation);
      // From here on the open is accepted: mark the cache in use (unclean until close).
      meta.upgrade();
      // Before anything else is written: the main file says it may need its WAL from now on, so
      // a copy of the cache without CACHE.meta-wal is refused (Metadata.open) instead of losing
      // the last dirty records.
      meta.markOpen();
      // The flushes a killed daemon left running in the history are over.
      meta.endInterruptedFlushes();
      if (generation !== undefined) {
        meta.setDiskState(generation, resolve(paths.bitmap));
      } else if (meta.info.bitmapPath !== resolve(paths.bitmap)) {
        meta.setDiskState(meta.info.diskGeneration, resolve(paths.bitmap));
      }
      if (budget !== info.budget) meta.setBudget(budget, info.evictionUnit);
      store.clock?.restore(meta.loadClock(), info.evictionUnit);
      for (const z of staleBits) store.#touchBitmap(z);
      if (staleBits.length > 0) await store.persistBitmap(true);
      // The disk changed outside: every present bit goes, durably, before the new fingerprint is
      // kept (a crash in between finds the old one again, and drops them again).
      if (diskChanged) await store.#dropAllPresent();
      if (fingerprint !== undefined && fingerprint !== meta.info.diskFingerprint) meta.setDiskFingerprint(fingerprint);
      meta.replaceDirty(store.#dataRuns(), undefined, store.#zeroRuns());
      if (info.mode !== options.mode) meta.setMode(options.mode);
      store.#mode = options.mode;
      meta.setCleanShutdown(false);
      if (budget !== null && !options.servedByKernel) {
        const unbudgeted = info.budget === null && !creating;
        const dropped = await store.#dropLeftovers(unbudgeted || store.recoveredFromCrash || diskChanged);
        if (info.budget !== null) store.droppedBlocks = dropped;
        store.budgetLowered = info.budget === null || budget < info.budget;
        await store.#shrinkTo(store.budgetBlocks);
      }
      // Last, once the open is accepted: a refused open leaves no reserve behind.
      const reserveBytes = options.flashReserve ?? DEFAULT_FLASH_RESERVE;
      // Best effort (review11 R-2): a reserve that cannot be opened holds no data and must not
      // refuse the cache; it is then none.
      if (reserveBytes > 0) store.flashReserve = await FlashReserve.open(reservePath(paths.metadata), reserveBytes).catch(() => null);
      return store;
    } catch (err) {
      meta.close();
      await files?.cache.close().catch(() => undefined);
      await files?.bitmapFile.close().catch(() => undefined);
      // A cache this call began to create is removed again: a refused open leaves nothing behind.
      if (!metaExists) {
        for (const p of [paths.cache, paths.bitmap, ...metadataFiles(paths.metadata)]) {
          await storage.remove(p).catch(() => undefined);
        }
      }
      throw err;
    }
  }

  /**
   * Removes a cache (cache file, bitmap, metadata) so the next open re-creates it. Refused while
   * dirty blocks exist, unless `force`: they are the only copy of data the disk has not received.
   * The bitmap removed is the cache's own only (see `bitmap` below); returns the dirty blocks lost,
   * the bitmap removed, and why a bitmap path was left alone (`keptBitmap`, one clause); for a
   * cache not there that the disk's record names, `forgotten` (only the record changed). Throws
   * InvalidArgumentError when no cache is at the path and no record names it.
   */
  static async discard(
    paths: CachePaths,
    options: {
      force?: boolean;
      storage?: Storage;
      metadata?: MetadataFactory;
      /** The disk as the user named it (for the path checks and messages). */
      backing?: string;
      /** The disk's identity: a cache made for another disk is refused (ForeignCacheError). */
      backingId?: string;
      /** The host's disk records: the disk's record stops naming the removed cache. */
      records?: DiskRecords;
    } = {},
  ): Promise<{ dirtyBlocks: number; bitmap?: string; keptBitmap?: string; forgotten?: boolean }> {
    const storage = options.storage ?? posixStorage;
    await assertCachePathsApart(paths, options.backing);
    let dirtyBlocks = 0;
    let uuid: string | undefined;
    // This cache's bitmap, removed with it: the one its metadata records (bitmap_path, the last
    // attach's -b), or for a cache from before that the given one, and either only while it is a
    // file of exactly this cache's bitmap size. Never another (newuser8 F2: a -b typo naming
    // another cache's bitmap deleted it, and with it that cache's dirty data).
    let bitmap: string | undefined;
    /** Why a bitmap path given or recorded was left alone, for the output. */
    let keptBitmap: string | undefined;
    const metaExists = await storage.exists(paths.metadata);
    if (!metaExists) {
      // Without metadata nothing says these files are a cache: they may be the disk or another
      // program's data. Removing them is the user's call, made by hand.
      for (const p of [paths.cache, paths.bitmap]) {
        if (await storage.exists(p)) {
          throw new InvalidArgumentError(
            `${p} is not a ulobdev cache (its metadata ${paths.metadata} does not exist); discard removes nothing: check what it is and move it away yourself`,
          );
        }
      }
      // A cache the disk's record says held dirty data, not there now: its flash may only be unmounted.
      const owner = options.records && options.backingId !== undefined ? options.records.read(options.backingId)?.owner : undefined;
      const recorded = owner !== undefined && owner !== null && owner.metadata === resolve(paths.metadata);
      if (recorded && owner.mayBeDirty && !options.force) {
        throw new DirtyDataError(
          `${paths.cache} is not there, but it held ${formatBytes(owner.dirtyBytes)} of dirty data at its last detach (flash not mounted?); mount it, or pass --force if it is gone for good`,
        );
      }
      // Nothing there and nothing to forget: a typo'd -c, or no default cache (newuser8 item 3).
      if (!recorded) {
        throw new InvalidArgumentError(
          `no cache at ${paths.cache} (no ${paths.metadata}); discard removes nothing: give the -c path the disk was attached with`,
        );
      }
      // The record names it: forget it (below), the only thing left to do.
      if (options.records && options.backingId !== undefined) releaseDisk(options.records, options.backingId, resolve(paths.metadata), undefined);
      return { dirtyBlocks: 0, forgotten: true };
    }
    if (metaExists) {
      let meta: Metadata;
      try {
        meta = (options.metadata ?? Metadata).open(paths.metadata);
      } catch (err) {
        // Unreadable metadata cannot say what is dirty: only --force may throw such a cache away.
        // A cache in use (CacheBusyError) is never removed.
        if (err instanceof CorruptMetadataError && options.force) {
          for (const p of [...metadataFiles(paths.metadata), paths.bitmap, paths.cache]) {
            await storage.remove(p);
          }
          if (options.records && options.backingId !== undefined) releaseDisk(options.records, options.backingId, resolve(paths.metadata), undefined);
          return { dirtyBlocks: 0 };
        }
        throw err;
      }
      try {
        if (options.backingId !== undefined && meta.info.backingId !== options.backingId) {
          throw new ForeignCacheError(
            `${paths.cache} is the cache of another disk (${meta.info.backingId}), not of ${options.backing ?? 'this disk'} (${options.backingId}); discard removes nothing: name the disk it was made for`,
          );
        }
        uuid = meta.info.uuid;
        const geometry = new Geometry(meta.info.backingSize, meta.info.blockSize);
        const recorded = meta.info.bitmapPath === null ? null : resolve(meta.info.bitmapPath);
        const given = resolve(paths.bitmap);
        const own = recorded ?? given;
        const st = await fsp.stat(own).catch(() => undefined);
        if (st?.isFile() && st.size === geometry.bitmapFileSize) bitmap = own;
        else if (st) keptBitmap = `left ${own} alone: it is ${st.isFile() ? `${st.size} bytes` : 'not a file'}, not this cache's bitmap of ${geometry.bitmapFileSize} bytes`;
        if (recorded !== null && given !== recorded && (await fsp.stat(given).catch(() => undefined))) {
          keptBitmap = `left ${paths.bitmap} alone: it is not this cache's bitmap, which is ${recorded} (is -b another cache's?)`;
        }
        // Zeroed blocks count too: the disk has not received their zeros.
        const dirty = new Bitmap(geometry.blockCount);
        for (const e of meta.dirtyExtents()) dirty.setRange(e.start, e.start + e.count);
        dirtyBlocks = dirty.count();
        if (dirtyBlocks > 0 && !options.force) {
          throw new DirtyDataError(
            `${paths.cache} holds ${formatBytes(dirtyBlocks * meta.info.blockSize)} of dirty data the disk has not received; flush first, or pass --force to lose it`,
          );
        }
      } finally {
        meta.close();
      }
    }
    for (const p of [...metadataFiles(paths.metadata), ...(bitmap ? [bitmap] : []), paths.cache]) {
      await storage.remove(p);
    }
    if (options.records && options.backingId !== undefined) releaseDisk(options.records, options.backingId, resolve(paths.metadata), uuid);
    return { dirtyBlocks, ...(bitmap ? { bitmap } : {}), ...(keptBitmap ? { keptBitmap } : {}) };
  }

  get info(): Readonly<CacheInfo> {
    return this.#meta.info;
  }

  /**
   * Called by a flush before it writes the disk (engine.beginEpoch, once its snapshot holds
   * dirty blocks): bumps the disk's generation in its record, durably, naming this cache as the
   * writer; the records of its whole disk and partitions too (their blocks change with it). The
   * flush's clearFlushed records the generation in the cache's metadata. A crash in between
   * leaves the record one ahead of this cache, which the next open of this cache adopts
   * (checkDiskRecord). Without records it does nothing. Throws IOFailedError: the flush must not
   * write the disk then.
   */
  prepareDiskWrite(): void {
    // The disk is about to change: its fingerprint is unknown until this flush is synced
    // (refreshDiskFingerprint), durably so, before the disk is written: a flush cut here leaves
    // "unknown" (no check at the next attach), never a fingerprint the disk no longer has.
    this.#diskWrites++;
    if (this.#fingerprint) {
      this.#fingerprintDue = true;
      if (this.#meta.info.diskFingerprint !== null) this.#guard(() => this.#meta.setDiskFingerprint(null));
    }
    if (!this.#records) return;
    const { records, disk, device } = this.#records;
    const record = records.read(disk);
    const generation = Math.max(record?.generation ?? 0, this.#pendingGeneration ?? 0, this.#meta.info.diskGeneration ?? 0) + 1;
    const uuid = this.#meta.info.uuid;
    records.write({
      version: 1,
      disk,
      generation,
      writer: uuid,
      writerEpoch: this.#meta.info.flushEpoch + 1,
      owner: ownerEntry({ cache: this.paths.cache, metadata: this.paths.metadata, uuid, device }, true, 0),
      updatedAt: Date.now(),
    });
    for (const id of records.relatedOf(disk)) {
      const other = records.read(id);
      if (other) records.write({ ...other, generation: other.generation + 1, writer: uuid, writerEpoch: null, updatedAt: Date.now() });
    }
    this.#pendingGeneration = generation;
  }

  /**
   * Whether this open found the disk written without ulobdev since the cache last left it (its
   * fingerprint changed) and so dropped every present bit: the cache starts cold. The open wrote
   * a `disk-changed` event in the history; the caller says so in one warning line.
   */
  /**
   * Why the open could not read the disk's fingerprint (an I/O error of the disk), or null: that
   * attach could not check for writes made without ulobdev (the daemon says so in one line).
   */
  get fingerprintError(): unknown {
    return this.#fingerprintError;
  }

  get diskChanged(): boolean {
    return this.#diskChanged;
  }

  /**
   * Takes the disk's fingerprint again after a flush that wrote the disk (prepareDiskWrite) has
   * synced it (engine.commitEpoch), and keeps it, durably, in the metadata: the disk is as this
   * cache left it. Does nothing when no flush wrote the disk since the last one, or without
   * OpenStoreOptions.fingerprint. A read that fails, or a flush begun meanwhile, leaves the
   * fingerprint unknown (no check at the next attach): never throws for the disk's sake;
   * throws IOFailedError when the metadata cannot be written.
   */
  async refreshDiskFingerprint(): Promise<void> {
    if (!this.#fingerprint || !this.#fingerprintDue || this.#closed) return;
    const run = this.#refreshFingerprint(this.#fingerprint);
    this.#refreshing = run;
    try {
      await run;
    } finally {
      if (this.#refreshing === run) this.#refreshing = null;
    }
  }

  async #refreshFingerprint(read: () => Promise<string>): Promise<void> {
    const writes = this.#diskWrites;
    let fingerprint: string;
    try {
      fingerprint = await read();
    } catch {
      // The flush itself is done and synced; only the check of the next attach is lost.
      return;
    }
    if (writes !== this.#diskWrites || this.#closed || this.#failed) return;
    this.#fingerprintDue = false;
    try {
      this.#guard(() => this.#meta.setDiskFingerprint(fingerprint));
    } catch (err) {
      // A full flash filesystem: the fingerprint stays unknown (null since prepareDiskWrite), so
      // the next attach does not check; the flush itself is done and synced.
      if (!(err instanceof MetadataFullError)) throw err;
    }
  }

  /** The open's answer to a disk changed outside: no present bit (durably), a history event, and diskChanged. */
  async #dropAllPresent(): Promise<void> {
    const held = this.present.count();
    for (const r of this.present.runs()) this.#touchBitmap(r);
    this.present.clearRange(0, this.present.bits);
    this.#presentCount = 0;
    this.#zeroCount = null;
    await this.persistBitmap(true);
    this.#meta.addEvent(Date.now(), 'disk-changed', `the disk was written without ulobdev; ${formatBytes(held * this.geometry.blockSize)} of clean blocks dropped`);
    this.#diskChanged = true;
  }

  /** The write-back open's record: this cache owns the disk and may hold dirty data. */
  #takeRecord(generation: number): void {
    const { records, disk, device } = this.#records!;
    const record: DiskRecord | null = records.read(disk);
    const uuid = this.#meta.info.uuid;
    records.write({
      version: 1,
      disk,
      generation: Math.max(generation, record?.generation ?? 0),
      writer: record?.writer ?? null,
      writerEpoch: record?.writerEpoch ?? null,
      owner: ownerEntry({ cache: this.paths.cache, metadata: this.paths.metadata, uuid, device }, true, 0),
      updatedAt: Date.now(),
    });
  }

  /**
   * At a clean close: the record says whether this cache still holds dirty data (and how much,
   * for a refusal while its flash is not mounted). Left as it was (may be dirty) if another cache
   * took the record meanwhile or it cannot be written: the safe side.
   */
  #releaseRecord(): void {
    if (!this.#records) return;
    const { records, disk } = this.#records;
    try {
      const record = records.read(disk);
      const uuid = this.#meta.info.uuid;
      if (!record || record.owner?.uuid !== uuid) return;
      const dirtyBytes = this.dirty.count() * this.geometry.blockSize;
      records.write({ ...record, owner: ownerEntry(record.owner, dirtyBytes > 0, dirtyBytes), updatedAt: Date.now() });
    } catch {
      // The record keeps "may be dirty": a later attach reads this cache's metadata for the truth.
    }
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

  /**
   * readData() done now where the cache file can (BlockFile.readNow: bytes in the page cache).
   * True: buf holds buf.length bytes at `position`. False (also on a failed or closed store, or a
   * file without readNow): buf's content is undefined; call readData(). Never throws.
   */
  readDataNow(buf: Uint8Array, position: number): boolean {
    if (this.#failed || this.#closed || !this.#cache.readNow) return false;
    return this.#cache.readNow(buf, position);
  }

  /**
   * writeData() done now where the cache file can (BlockFile.writeNow: a small buffered write).
   * True: buf is written at `position`, as a resolved writeData() would have it. False (also on a
   * failed or closed store): not done, maybe part of it; call writeData() with the same bytes.
   * Never throws.
   */
  writeDataNow(buf: Uint8Array, position: number): boolean {
    if (this.#failed || this.#closed || !this.#cache.writeNow) return false;
    return this.#cache.writeNow(buf, position);
  }

  /**
   * The flusher's batch, the other way round from fillFrom: `pieces` ([offset in buf, length,
   * position], bytes) read from the cache file into `buf` and written to `source` at the same
   * positions, in one request (WritableSource.writeManyFrom, which the caller checked is there).
   * Rejects with the source's error, or the cache read's (`syscall: 'pread'`).
   */
  async copyTo(source: WritableSource, buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>): Promise<void> {
    this.#assertUsable();
    await source.writeManyFrom!(this.#cache, buf, pieces);
  }

  /**
   * A fill: `source`'s bytes [position, position + buf.length) into the cache file at the same
   * offset, through `buf`, in one request where the source can (Source.copyInto), else readAt and
   * writeData. Not durable until syncData(). Rejects with the source's error, or the cache
   * write's (`syscall: 'pwrite'`, ENOSPC included).
   */
  async fillFrom(source: Source, buf: Uint8Array, position: number): Promise<void> {
    this.#assertUsable();
    if (source.copyInto) return source.copyInto(this.#cache, buf, position, position);
    await source.readAt(buf, position);
    await this.writeData(buf, position);
  }

  /**
   * A long fill through a smaller buffer (a hydration chunk): `source`'s bytes [position, position +
   * length) into the cache file at the same offset, piece after piece of buf.length, in one request
   * where the source can (Source.streamInto: one sequential reading stream), else fillFrom per
   * piece. Not durable until syncData(). Rejects like fillFrom; leading pieces may have been
   * written then (the blocks stay missing: the caller marks nothing present).
   */
  async fillStream(source: Source, buf: Uint8Array, position: number, length: number): Promise<void> {
    this.#assertUsable();
    if (source.streamInto) return source.streamInto(this.#cache, buf, position, position, length);
    for (let done = 0; done < length; done += buf.byteLength) {
      await this.fillFrom(source, buf.subarray(0, Math.min(buf.byteLength, length - done)), position + done);
    }
  }

  /** Makes every cache write that completed before the call durable (one fdatasync, shared). */
  syncData(): Promise<void> {
    this.#assertUsable();
    return this.#dataSync.run();
  }

  /**
   * Invariant 1: marks blocks present. The caller must have synced their data (syncData) after
   * writing it. Persisted lazily: a lost present bit only costs a refetch. Blocks the caller had
   * reserved (reserve()) stay counted: call release() for them in the same tick.
   */
  markPresent(extents: Iterable<Extent>): void {
    for (const e of extents) {
      this.#lessZero(e);
      const before = this.present.count(e.start, e.start + e.count);
      this.present.setRange(e.start, e.start + e.count);
      this.#presentCount += e.count - before;
      this.#touchBitmap(e);
    }
  }

  /**
   * Invariant 2: makes blocks dirty (and present) durably, in one metadata transaction. Callers
   * await this before changing the cache content of a clean block. For a zeroed block it records
   * that the cache file holds its content again: the caller has written and synced that content.
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
      this.#lessZero(e);
      this.dirty.setRange(e.start, e.start + e.count);
      const before = this.present.count(e.start, e.start + e.count);
      if (before < e.count) {
        this.present.setRange(e.start, e.start + e.count);
        this.#presentCount += e.count - before;
        this.#touchBitmap(e);
      }
    }
  }

  /**
   * markDirty() that keeps the event loop free while the disk works (rule 3, as markDirty). Intents
   * are recorded in rounds (group commit): each round writes everything gathered since the last one
   * as one transaction (Metadata.addDirtyUnsynced, microseconds, no fsync), then fsyncs the WAL on
   * the threadpool; callers arriving while a round runs gather for the next, so a busy queue costs
   * one transaction and one fsync per round, not per caller or per event-loop turn. The blocks turn
   * dirty (`dirty`, `present`) only when their round's fsync resolves: callers await it before
   * changing the cache content of a clean block. Until then they are pending, and clearFlushed()
   * and close(), which rewrite the whole dirty table, keep the written ones in it (gathered ones are
   * not in the table yet; their transaction comes after the rewrite).
   *
   * A round starts when the blocks gathered since the last round ended are as many as that round
   * made dirty (its writers, answered, have come back with their next first writes), or at the
   * latest when intentGatherMs, or that round's fsync time up to 10 ms when longer, has passed
   * since it ended (#gatherGate): otherwise the writers of one round come
   * back while the next one already runs with the few that arrived during its fsync, and the
   * rounds stay small (2-3 blocks at QD16 through /dev/loopN, each paying a transaction and an
   * fsync). A writer alone (QD1) never waits: its own next write is the one expected. Only calls
   * with `options.gather` (the engine's own first writes, whose writers come back) count as
   * writers; any other call (a commit's staged blocks, a kernel frontend's record) starts the
   * next round without a wait.
   */
  async markDirtyDurable(extents: readonly Extent[], options: { gather?: boolean } = {}): Promise<void> {
    if (extents.length === 0) return;
    this.#assertUsable();
    let blocks = 0;
    for (const e of extents) {
      this.#gatheredDirty.push(e);
      blocks += e.count;
    }
    if (options.gather) {
      this.#arrivedSinceRound += blocks;
      this.#gatheredWriters += blocks;
    } else {
      this.#gatherUrgent = true;
    }
    if (this.#gatherWake && (this.#gatherUrgent || this.#arrivedSinceRound >= this.#lastRoundBlocks)) this.#gatherWake();
    await this.#intentRound.run();
  }

  /**
   * The intent rounds' gate (Coalescer): null to start the next round now; else a promise that
   * resolves when the writers of the round before are back (markDirtyDurable wakes it) or, after
   * that round ended, intentGatherMs or that round's fsync time (at most INTENT_GATHER_MAX_MS),
   * whichever is longer, has passed. A wait that runs out lets the
   * next GATHER_SKIP_ROUNDS rounds start without one (the writers went elsewhere: reads,
   * rewrites, or nowhere). Never rejects.
   */
  #gatherGate(): Promise<void> | null {
    if (this.#gatherSkip > 0) {
      this.#gatherSkip--;
      return null;
    }
    if (this.#gatherUrgent || this.#arrivedSinceRound >= this.#lastRoundBlocks || this.#failed || this.#closed) return null;
    const wait = Math.max(this.intentGatherMs, Math.min(this.#lastRoundSyncMs, INTENT_GATHER_MAX_MS));
    const left = wait - (performance.now() - this.#lastRoundEnd);
    if (!(left > 0)) return null;
    const counts = this.#intentCounts;
    counts.gathered++;
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.#gatherWake = null;
        this.#gatherSkip = GATHER_SKIP_ROUNDS;
        counts.gatherTimeouts++;
        resolve();
      }, Math.ceil(left));
      this.#gatherWake = () => {
        clearTimeout(timer);
        this.#gatherWake = null;
        resolve();
      };
    });
  }

  /** One round of markDirtyDurable(): the gathered intents in one transaction, then the WAL fsync. */
  async #recordIntents(): Promise<void> {
    const extents = this.#gatheredDirty;
    const writers = this.#gatheredWriters;
    this.#gatheredDirty = [];
    this.#gatheredWriters = 0;
    this.#gatherUrgent = false;
    if (extents.length === 0) return;
    this.#assertUsable();
    this.#guard(() => this.#meta.addDirtyUnsynced(extents));
    this.#pendingDirty.add(extents);
    const started = performance.now();
    try {
      await this.#io(() => this.#meta.syncWal(), 'sync the metadata', this.paths.metadata);
    } finally {
      this.#pendingDirty.delete(extents);
    }
    const counts = this.#intentCounts;
    const ended = performance.now();
    counts.rounds++;
    for (const e of extents) counts.blocks += e.count;
    counts.syncMs += ended - started;
    // The gather of the next round counts from here (#gatherGate): these writers may come back.
    this.#lastRoundEnd = ended;
    this.#lastRoundBlocks = writers;
    this.#lastRoundSyncMs = ended - started;
    this.#arrivedSinceRound = 0;
    this.#setDirty(extents);
  }

  /**
   * Dirty-intent rounds (markDirtyDurable) completed since open: `rounds` transactions with their
   * WAL fsync, the `blocks` they made durably dirty, and `syncMs`, the milliseconds spent in
   * those fsyncs (wall clock, summed). blocks / rounds is how many first writes share one fsync.
   */
  intentStats(): IntentStats {
    const c = this.#intentCounts;
    return { rounds: c.rounds, blocks: c.blocks, syncMs: Math.round(c.syncMs * 10) / 10, gathered: c.gathered, gatherTimeouts: c.gatherTimeouts };
  }

  /**
   * Zeroes whole blocks (TRIM, WRITE_ZEROES): a metadata transaction makes them durably dirty
   * with all-zero content; then they are not present, so reads give zeros and the flusher writes
   * zeros. With a budget the bitmap is then written and synced and only then the blocks punched
   * out of the cache file (as evict: no present bit in the bitmap file ever covers a hole).
   * Without one the cache file keeps its preallocated space and stale bytes, which nothing reads;
   * the bitmap page follows lazily (the flush that cleans the blocks syncs it first).
   * `reserved` of the blocks were reserved by the caller for data it drops now (staged, never
   * made present): the punch frees their space too. The caller keeps every request off these
   * blocks until this resolves.
   */
  async zero(extents: readonly Extent[], reserved = 0): Promise<void> {
    if (extents.length === 0) return;
    this.#assertUsable();
    this.#guard(() => this.#meta.addDirty(extents, true));
    let held = 0;
    for (const e of extents) {
      // Every block of e is zeroed after this: the count gains those that were not.
      if (this.#zeroCount !== null) this.#zeroCount += e.count - this.#zeroIn(e.start, e.start + e.count);
      held += this.present.count(e.start, e.start + e.count);
      this.dirty.setRange(e.start, e.start + e.count);
      this.present.clearRange(e.start, e.start + e.count);
      this.#touchBitmap(e);
    }
    this.#presentCount -= held;
    this.#reserved -= reserved;
    const freed = held + reserved;
    if (this.#meta.info.budget === null) {
      if (freed > 0) this.#spaceChanged();
      return;
    }
    this.#punching += freed;
    try {
      await this.persistBitmap(true);
    } finally {
      this.#punching -= freed;
    }
    await this.#punch(extents, freed);
  }

  /**
   * Invariant 4: clears dirty bits of blocks the backing disk has durably received. The caller
   * must have synced the backing after writing them. Bumps the flush epoch. Zeroed blocks among
   * them become missing: their present bits must be durably clear in the bitmap file first (the
   * caller runs persistBitmap(true) after they were zeroed), or a crash would bring back a stale
   * present bit over content that is not the disk's.
   */
  clearFlushed(extents: readonly Extent[]): void {
    this.#assertUsable();
    // The remaining set is computed from the runs, not a copy of the bitmap: a copy is 512 MiB on
    // a 16 TiB disk of 4 KiB blocks. Intents still being synced stay in the table this rewrites
    // (their blocks are being written; after the zeroed rows, which they end); rows may overlap.
    const pending = [...this.#pendingDirty].flat();
    const remaining = [...subtractExtents(this.dirty.runs(), extents)];
    this.#guard(() =>
      this.#meta.replaceDirty(this.#dataRuns(remaining), this.#meta.info.flushEpoch + 1, this.#zeroRuns(remaining), pending, this.#pendingGeneration),
    );
    for (const e of extents) {
      this.#lessZero(e);
      this.dirty.clearRange(e.start, e.start + e.count);
    }
  }

  /**
   * Drops clean blocks from the cache (eviction): clears their present bits, writes and
   * fdatasyncs the bitmap, and only then, with a budget, punches them out of the cache file. The
   * order is invariant 1: a crash never leaves a present bit over a hole, nor over cache space a
   * later write (rule 4) filled with uncommitted data. The caller keeps new requests off these
   * blocks until this resolves; `quiesce`, called once their present bits are clear (in memory),
   * resolves when no request that began before is still reading them, and the punch waits for it.
   */
  async evict(extents: readonly Extent[], options: { quiesce?: () => Promise<void> } = {}): Promise<void> {
    for (const e of extents) {
      if (this.dirty.nextSet(e.start, e.start + e.count) < e.start + e.count) {
        throw new InvalidArgumentError(`cannot evict dirty blocks in ${e.start}+${e.count}`);
      }
    }
    let held = 0;
    for (const e of extents) {
      held += this.present.count(e.start, e.start + e.count);
      this.present.clearRange(e.start, e.start + e.count);
      this.#touchBitmap(e);
    }
    this.#presentCount -= held;
    this.#punching += held;
    try {
      await Promise.all([this.persistBitmap(true), options.quiesce?.()]);
    } finally {
      this.#punching -= held;
    }
    await this.#punch(extents, held);
  }

  // --- space (a budgeted cache) ----------------------------------------------------------------

  /** The budget in bytes, or null: a full, preallocated mirror that never evicts. */
  get budget(): number | null {
    return this.#meta.info.budget;
  }

  /** The budget in blocks (Infinity without one). */
  get budgetBlocks(): number {
    const b = this.#meta.info.budget;
    return b === null ? Infinity : Math.floor(b / this.geometry.blockSize);
  }

  /** Blocks the cache file may hold now: present, reserved, being punched and held outside. */
  get usedBlocks(): number {
    return this.#presentCount + this.#reserved + this.#punching + this.#leaked + this.#outside;
  }

  /**
   * Blocks a kernel frontend wrote into the cache file that the store learns of only later (on
   * /dev/uloopN, whole blocks written while missing: pending until the next barrier). The frontend
   * sets it from the kernel's exact count; it counts toward usedBlocks, so eviction keeps room for
   * them. A barrier recording them may count them twice until the next update: on the safe side.
   */
  get outsideBlocks(): number {
    return this.#outside;
  }

  set outsideBlocks(blocks: number) {
    const was = this.#outside;
    this.#outside = Math.max(0, blocks);
    if (this.#outside < was) this.#spaceChanged();
  }

  space(): SpaceUse {
    return {
      budgetBlocks: this.budgetBlocks,
      usedBlocks: this.usedBlocks,
      presentBlocks: this.#presentCount,
      reservedBlocks: this.#reserved,
      punchingBlocks: this.#punching,
      outsideBlocks: this.#outside,
    };
  }

  /**
   * Reserves room for `blocks` blocks of data about to be written into blocks that hold none
   * (missing or zeroed). False, reserving nothing, if that would pass the budget. The data path
   * calls this in the same tick as it takes the blocks, and markPresent/markDirty then release()
   * when they become present, or release() when it drops them.
   */
  reserve(blocks: number): boolean {
    if (this.usedBlocks + blocks > this.budgetBlocks) return false;
    this.#reserved += blocks;
    return true;
  }

  /** Gives back reserved blocks (they became present, or their data was dropped unwritten). */
  release(blocks: number): void {
    this.#reserved -= blocks;
    if (blocks > 0) this.#spaceChanged();
  }

  /** Resolves the next time space is freed or blocks become evictable (for waiters on the budget). */
  spaceChange(): Promise<void> {
    return new Promise((resolve) => this.#spaceListeners.push(resolve));
  }

  /** Tells waiters that space may be free (blocks became present and so evictable, or clean). */
  notifySpace(): void {
    this.#spaceChanged();
  }

  /**
   * Zeroed blocks: dirty and not present. Kept as the bits change, so a call costs nothing however
   * many dirty runs there are; counted over every dirty run only on the first call and after a
   * bitmap's buffer was written directly (Bitmap.changed()).
   */
  zeroBlocks(): number {
    if (this.#zeroCount === null || this.#zeroAt.dirty !== this.dirty.generation || this.#zeroAt.present !== this.present.generation) {
      this.#zeroCount = this.#zeroIn(0, this.dirty.bits);
      this.#zeroAt = { dirty: this.dirty.generation, present: this.present.generation };
    }
    return this.#zeroCount;
  }

  /** Zeroed blocks in [start, end): dirty runs there less their present blocks. */
  #zeroIn(start: number, end: number): number {
    let n = 0;
    for (const e of this.dirty.runs(start, end)) n += e.count - this.present.count(e.start, e.start + e.count);
    return n;
  }

  /**
   * Before e's blocks turn present or clean (markPresent, #setDirty, clearFlushed): none of them
   * is zeroed after, so the count loses those that were. Nothing to do while the count is 0 (the
   * usual case: no TRIM since open) or not kept.
   */
  #lessZero(e: Extent): void {
    if (this.#zeroCount) this.#zeroCount -= this.#zeroIn(e.start, e.start + e.count);
  }

  /** What the filesystem charges for the cache file now (st_blocks x 512). */
  allocatedBytes(): Promise<number> {
    return this.#cache.allocatedBytes();
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
    // A fingerprint being read after a flush is kept first: closed under it, it would stay unknown.
    await this.#refreshing?.catch(() => undefined);
    try {
      // A flush wrote the disk and its fingerprint was not taken again (the flush was cut: a
      // detach, an error): the disk is final now (the flusher has stopped), so take it here, or
      // the next attach would not check (a raw mount after this detach would go unseen).
      if (!this.#failed && this.#fingerprint && this.#fingerprintDue) await this.#refreshFingerprint(this.#fingerprint);
      if (!this.#failed) {
        await this.#dataSync.idle();
        // No intent round may be running on the fd that closing the metadata closes.
        await this.#intentRound.idle();
        await this.syncData();
        await this.persistBitmap(true);
        // A full flash filesystem: the reserve gives the close's transactions their room.
        await this.#withReserve(() => {
          this.#meta.replaceDirty(this.#dataRuns(), undefined, this.#zeroRuns(), [...this.#pendingDirty].flat());
          if (this.clock) this.#meta.saveClock(this.clock.state(this.#meta.info.evictionUnit));
          this.#meta.setCleanShutdown(true);
        });
        if (this.#mode === 'writeback') this.#releaseRecord();
      }
    } finally {
      this.#closed = true;
      this.flashReserve?.close();
      this.#meta.close();
      await this.#cache.close().catch(() => undefined);
      await this.#bitmapFile.close().catch(() => undefined);
    }
  }

  /**
   * Runs `write` (metadata transactions, each all or nothing); when the flash filesystem is full
   * (MetadataFullError) releases the flash reserve and runs it once more. Throws what `write`
   * throws otherwise.
   */
  async #withReserve(write: () => void): Promise<void> {
    try {
      write();
    } catch (err) {
      if (!(err instanceof MetadataFullError) || !this.flashReserve || (await this.flashReserve.release()) === 0) throw err;
      write();
    }
  }

  /** Drops the store as a crash would: no syncs, no clean flag. For tests and fatal errors. */
  async abandon(): Promise<void> {
    this.flashReserve?.close();
    this.#closed = true;
    this.#failed ??= new EngineClosedError('cache store abandoned');
    this.#meta.close();
    await this.#cache.close().catch(() => undefined);
    await this.#bitmapFile.close().catch(() => undefined);
    this.#spaceChanged();
  }

  /** Dirty blocks whose content the cache file holds: dirty and present (of `runs` of dirty blocks). */
  *#dataRuns(runs: Iterable<Extent> = this.dirty.runs()): Generator<Extent> {
    for (const e of runs) yield* this.present.runs(e.start, e.start + e.count);
  }

  /** Zeroed blocks: dirty and not present (of `runs` of dirty blocks). */
  *#zeroRuns(runs: Iterable<Extent> = this.dirty.runs()): Generator<Extent> {
    for (const e of runs) yield* this.present.gaps(e.start, e.start + e.count);
  }

  /**
   * Punches `extents` out of the cache file (with a budget; without one the space stays
   * allocated), then gives the `blocks` they held back to the budget. A failed punch is not a
   * durability problem (nothing present lies there), so the store goes on; the space stays
   * counted until the next open finds and punches it.
   */
  async #punch(extents: readonly Extent[], blocks: number): Promise<void> {
    if (this.#meta.info.budget === null) {
      if (blocks > 0) this.#spaceChanged();
      return;
    }
    this.#punching += blocks;
    let leaked = false;
    try {
      const g = this.geometry;
      for (const e of extents) {
        const offset = g.blockOffset(e.start);
        const length = Math.min(g.blockOffset(e.start + e.count), g.cacheFileSize) - offset;
        if (length > 0) await this.#cache.punchHole(offset, length);
      }
    } catch (err) {
      leaked = true;
      throw ioError('punch a hole in', this.paths.cache, err);
    } finally {
      this.#punching -= blocks;
      if (leaked) this.#leaked += blocks;
      this.#spaceChanged();
    }
  }

  /**
   * With a budget, after a crash or when a full mirror gets a budget: the cache file may hold data
   * no present bit covers (fills and writes never committed, evictions that did not punch, the
   * preallocation). Finds it with SEEK_DATA and punches it. Nothing present is touched. Returns
   * the blocks punched.
   */
  async #dropLeftovers(always: boolean): Promise<number> {
    const g = this.geometry;
    const held = await this.#cache.allocatedBytes();
    // Filesystem metadata (extent tree blocks) counts in st_blocks too: a little over is no leak.
    if (!always && held <= this.#presentCount * g.blockSize + this.unitBlocks * g.blockSize) return 0;
    const leftovers = await this.uncountedData();
    await this.#punch(leftovers, 0);
    return leftovers.reduce((n, e) => n + e.count, 0);
  }

  /**
   * The blocks the cache file holds data in (SEEK_DATA / SEEK_HOLE) that no present bit covers:
   * what st_blocks charges beyond the store's count (fills and writes never committed, an
   * eviction cut between its bitmap sync and its punch, on /dev/uloopN a kernel's pending
   * blocks). Ascending, disjoint block extents; none present.
   */
  async uncountedData(): Promise<Extent[]> {
    const g = this.geometry;
    const out: Extent[] = [];
    for (let pos = 0; pos < g.cacheFileSize; ) {
      const data = await this.#cache.nextData(pos);
      if (!data) break;
      const first = Math.floor(data[0] / g.blockSize);
      const end = Math.min(g.blockCount, Math.ceil(data[1] / g.blockSize));
      for (const gap of this.present.gaps(first, end)) out.push(gap);
      pos = Math.max(data[1], pos + 1);
    }
    return out;
  }

  /**
   * Punches blocks no present bit covers out of the cache file (with a budget; without one it
   * does nothing): data the store never counted, which nobody may read any more. The caller
   * keeps every reader and writer off them until this resolves (on /dev/uloopN: a CLAIM, or an
   * EVICT with ULOOP_EVICT_F_HOLD). Throws InvalidArgumentError if one is present (invariant 1:
   * a present bit never covers a hole), and the punch's I/O error.
   */
  async punchUncounted(extents: readonly Extent[]): Promise<void> {
    this.#assertUsable();
    for (const e of extents) {
      if (this.present.nextSet(e.start, e.start + e.count) < e.start + e.count) {
        throw new InvalidArgumentError(`cannot punch present blocks in ${e.start}+${e.count}`);
      }
    }
    if (extents.length > 0) await this.#punch(extents, 0);
  }

  /**
   * Evicts clean blocks until no more than `blocks` are held (at open, before anything is served:
   * no request can be in flight). Stops early when only dirty blocks are left.
   */
  async #shrinkTo(blocks: number): Promise<void> {
    const clock = this.clock;
    if (!clock) return;
    while (this.usedBlocks > blocks) {
      const want = Math.ceil((this.usedBlocks - blocks) / this.unitBlocks);
      const units = clock.pick(
        want,
        (u) => this.nextUnitWithData(u),
        (u) => this.cleanBlocksOf(u).length > 0,
      );
      if (units.length === 0) return;
      const victims: Extent[] = [];
      for (const u of units) victims.push(...this.cleanBlocksOf(u));
      await this.evict(victims);
      for (const v of victims) this.shrunkBlocks += v.count;
      for (const u of units) clock.forget(u);
    }
  }

  /** The first eviction unit at or after `u` with a present block; the unit count if none. */
  nextUnitWithData(u: number): number {
    const b = this.present.nextSet(u * this.unitBlocks);
    return b >= this.geometry.blockCount ? Math.ceil(this.geometry.blockCount / this.unitBlocks) : Math.floor(b / this.unitBlocks);
  }

  /** The present, clean blocks of eviction unit `u`, as extents. */
  cleanBlocksOf(u: number): Extent[] {
    const first = u * this.unitBlocks;
    const end = Math.min(first + this.unitBlocks, this.geometry.blockCount);
    const out: Extent[] = [];
    for (const run of this.present.runs(first, end)) {
      for (const clean of this.dirty.gaps(run.start, run.start + run.count)) out.push(clean);
    }
    return out;
  }

  #spaceChanged(): void {
    if (this.#spaceListeners.length === 0) return;
    const listeners = this.#spaceListeners;
    this.#spaceListeners = [];
    for (const l of listeners) l();
  }

  #touchBitmap(e: Extent): void {
    const first = Math.floor(e.start / 8 / FILE_ALIGN);
    const last = Math.floor((e.start + e.count - 1) / 8 / FILE_ALIGN);
    for (let p = first; p <= last; p++) this.#dirtyPages.add(p);
  }

  async #syncData(): Promise<void> {
    this.#assertUsable();
    try {
      await this.#io(() => this.#cache.sync(), 'sync the cache');
    } catch (err) {
      // Recoverable only when this sync failure is the store's first one (recoverDataSync).
      if (this.#failed === err) this.#dataSyncFailed = true;
      throw err;
    }
  }

  /** True when the store failed on an fdatasync of the cache file alone: recoverDataSync may bring it back. */
  get dataSyncFailed(): boolean {
    return this.#failed !== null && this.#dataSyncFailed && !this.#closed;
  }

  /**
   * Brings the store back after a failed fdatasync of the cache file. Pages written since the last
   * good sync may be gone, and a new sync would not say so (errseq reports an error once per open
   * file), so the caller must first have dropped every block whose data only such a page held
   * (the engine's staged blocks: CacheEngine.recoverSyncError); present and dirty blocks keep
   * their bits (a dirty block's unflushed rewrite may be lost, as the failed FLUSH said). Syncs the
   * cache file again: when that works the store serves I/O again and this returns true; when it
   * fails (the cause lasts) the store stays failed and this returns false. Throws
   * EngineClosedError when the store failed otherwise (a metadata or bitmap write) or is closed.
   */
  async recoverDataSync(): Promise<boolean> {
    if (!this.dataSyncFailed) {
      if (this.#failed === null && !this.#closed) return true;
      throw new EngineClosedError(`cache ${this.paths.cache} cannot recover: ${this.#failed?.message ?? 'closed'}`);
    }
    try {
      await this.#cache.sync();
    } catch {
      return false;
    }
    this.#failed = null;
    this.#dataSyncFailed = false;
    return true;
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
      if (this.#failed === null) this.#failed = wrapped;
      else this.#dataSyncFailed = false; // a second failure: not only the data sync
      throw wrapped;
    }
  }

  /**
   * A metadata write (one transaction). A full filesystem (MetadataFullError) leaves the metadata
   * as it was, and every caller changes its in-memory state only after the write: the store stays
   * usable and the caller frees room and tries again, or fails its one request. Any other
   * failure fails the store, as #io.
   */
  #guard(fn: () => void): void {
    try {
      fn();
    } catch (err) {
      if (err instanceof MetadataFullError) throw err;
      if (this.#failed === null) this.#failed = err as Error;
      this.#dataSyncFailed = false;
      throw err;
    }
  }
}

/** The files of the metadata at `metadata`: the database, its SQLite WAL and shared memory, the flash reserve. */
function metadataFiles(metadata: string): string[] {
  return [metadata, `${metadata}-wal`, `${metadata}-shm`, reservePath(metadata)];
}

/**
 * After a discard: the disk's record stops naming the removed cache (by uuid, or by metadata path
 * when the metadata was unreadable or missing), so the next attach of another cache is not refused
 * for it. The generation stays: caches the disk was written past stay refused.
 */
/**
 * The refusal of a disk changed outside under a cache holding `bytes` of dirty data;
 * `journalMissing`: the metadata path, when its WAL is missing after a crash (the likelier cause then).
 */
function diskChangedDirty(cache: string, disk: string, bytes: number, journalMissing?: string): DiskChangedError {
  if (journalMissing !== undefined) {
    return new DiskChangedError(
      `${cache}'s metadata is behind ${disk}: the daemon stopped without closing it and its journal ${journalMissing}-wal is missing, which holds the last flush and writes: ` +
        `copy ${journalMissing}-wal from where the cache was (every file of the cache: CACHE*) and attach again; if it is lost for good, 'ulobdev discard --force -c ${cache} ${disk}' drops the cache and what only it held; nothing was changed`,
    );
  }
  return new DiskChangedError(
    `${disk} was written without ulobdev (mounted directly?) since ${cache} last left it, and the cache holds ${formatBytes(bytes)} of dirty data that a flush would write over the newer data: ` +
      `to keep the disk as it is now, 'ulobdev discard --force -c ${cache} ${disk}' (losing the cache's changes); to keep the cache's, restore the disk as ulobdev left it; nothing was changed`,
  );
}

function releaseDisk(records: DiskRecords, disk: string, metadata: string, uuid: string | undefined): void {
  const record = records.read(disk);
  if (!record?.owner) return;
  if (uuid !== undefined ? record.owner.uuid !== uuid : record.owner.metadata !== metadata) return;
  records.write({ ...record, owner: null, updatedAt: Date.now() });
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

/**
 * The disk a cache was made for as the user named it (its disk record's owner, when that is this
 * cache), or undefined: no records, no record, or the record names another cache now. Only reads.
 */
function madeFor(records: DiskRecords | undefined, info: CacheInfo): string | undefined {
  try {
    const owner = records?.read(info.backingId)?.owner;
    return owner && owner.uuid === info.uuid ? owner.device : undefined;
  } catch {
    return undefined;
  }
}

/** Bytes of dirty data (zeroed ranges included) a cache's metadata records. */
function dirtyBytesOf(meta: Metadata, blockSize: number): number {
  let blocks = 0;
  for (const e of meta.dirtyExtents()) blocks += e.count;
  return blocks * blockSize;
}

function checkIdentity(
  info: CacheInfo,
  backing: OpenStoreOptions['backing'],
  blockSize: number | undefined,
  metaPath: string,
  madeForDisk: () => string | undefined = () => undefined,
  dirtyBytes: () => number = () => 0,
  cachePath = metaPath,
): void {
  if (info.backingId !== backing.id) {
    // The user knows disks by path, not by id (newuser8 item 7): the path the cache was made for
    // when the disk records know it; what to do either way.
    const other = madeForDisk();
    throw new ForeignCacheError(
      `${metaPath} is the cache of another disk (${other ?? `id ${info.backingId}`}), not of ${backing.description}: give -c the cache of ${backing.description}, or a path where no cache is yet for a new one${other ? `; this cache goes with ${other}` : ''}`,
    );
  }
  if (info.backingSize !== backing.size) {
    // The cache maps block n to offset n of the disk it was made for: a disk that grew or shrank
    // (lvextend, a grown image, a moved partition end) needs a new cache. What to do depends on
    // whether the old one still holds data the disk has not received (newuser10).
    const how = backing.size > info.backingSize ? 'grew' : 'shrank';
    const dirty = dirtyBytes();
    const wayOut =
      dirty === 0
        ? `it holds no dirty data: 'ulobdev discard -c ${cachePath} ${backing.description}', then attach again for a new cache of the whole disk`
        : `it still holds ${formatBytes(dirty)} of dirty data for the old size: give the disk its old size back (lvreduce, truncate, the partition's old end), attach, 'ulobdev flush --wait', detach, then resize, discard and attach again; or 'ulobdev discard --force' to lose it`;
    throw new SizeMismatchError(`${backing.description} is ${backing.size} bytes but its cache was made for ${info.backingSize} bytes (the disk ${how}); ${wayOut}`);
  }
  if (blockSize !== undefined && blockSize !== info.blockSize) {
    throw new SizeMismatchError(`${metaPath}: the cache uses ${info.blockSize}-byte blocks, not ${blockSize}; omit --block-size, or for a cache of ${blockSize}-byte blocks empty this one first ('ulobdev discard -c ${cachePath} ${backing.description}') and attach again`);
  }
}

/**
 * An eviction unit: a power of two from `min` (64 KiB on the command line; the library takes
 * down to 4 KiB, for tests with tiny disks) to 1 MiB. A unit smaller than the block is one block.
 */
export function assertEvictionUnit(unit: unknown, min = MIN_EVICTION_UNIT): asserts unit is number {
  if (typeof unit !== 'number' || !Number.isSafeInteger(unit) || unit < min || unit > MAX_EVICTION_UNIT || (unit & (unit - 1)) !== 0) {
    throw new InvalidArgumentError(`the eviction unit must be a power of two from ${formatBytes(min)} to 1 MiB, got ${String(unit)}`);
  }
}

/** A budget holds at least two eviction units: one being filled while another is evicted. */
function checkBudget(budget: number, unitBytes: number, cachePath: string): void {
  if (budget < 2 * unitBytes) {
    throw new InvalidArgumentError(
      `a cache budget of ${formatBytes(budget)} for ${cachePath} is less than two eviction units (${formatBytes(2 * unitBytes)}); give at least that`,
    );
  }
}

/** Free bytes of the filesystem holding `dir`; IOFailedError when they cannot be read. */
async function freeBytesOf(storage: Storage, dir: string): Promise<number> {
  try {
    return await storage.freeBytes(dir);
  } catch (err) {
    throw ioError('read the free space of', dir, err);
  }
}

/** Bytes a new cache's bitmap takes from the cache file's free space: all of it when it lives beside it. */
function bitmapBesideCache(paths: CachePaths, geometry: Geometry): number {
  return dirname(paths.bitmap) === dirname(paths.cache) ? geometry.bitmapFileSize : 0;
}

/**
 * The flash filesystem must have room for the budget: its free space plus what the cache file
 * holds already (`heldBytes`), less what else the attach will place there (`otherBytes`: a new
 * cache's bitmap beside it). A budget above the disk's size needs only the disk's size. Throws
 * InvalidArgumentError naming the most that fits.
 */
async function checkFreeSpace(storage: Storage, paths: CachePaths, budget: number, geometry: Geometry, heldBytes: number, otherBytes = 0): Promise<void> {
  const need = Math.min(budget, geometry.cacheFileSize);
  const dir = dirname(paths.cache);
  const free = await freeBytesOf(storage, dir);
  if (free + heldBytes - otherBytes < need) {
    const most = Math.max(0, Math.floor((free + heldBytes - otherBytes) / (1 << 20)) * (1 << 20));
    throw new InvalidArgumentError(
      `a cache budget of ${formatBytes(budget)} does not fit: ${dir} has ${formatBytes(free)} free` +
        (heldBytes > 0 ? ` and the cache holds ${formatBytes(heldBytes)}` : '') +
        (otherBytes > 0 ? `, and the bitmap takes ${formatBytes(otherBytes)} of it` : '') +
        `; give at most ${formatBytes(most)} or free some space`,
    );
  }
}

/**
 * A new full mirror preallocates a cache file the size of the disk: refused, before anything is
 * written, when the flash filesystem has less room than that (and the bitmap). InvalidArgumentError
 * saying how much it needs and has, and the way out (`budgetOption` for a smaller cache, -c).
 */
async function checkMirrorSpace(storage: Storage, paths: CachePaths, geometry: Geometry, disk: string, budgetOption: string | undefined): Promise<void> {
  const need = geometry.cacheFileSize + bitmapBesideCache(paths, geometry);
  const dir = dirname(paths.cache);
  const free = await freeBytesOf(storage, dir);
  if (free >= need) return;
  // The most checkFreeSpace takes for a budget here.
  const most = Math.floor(free / (1 << 20)) * (1 << 20);
  const smaller = budgetOption && most >= 1 << 20 ? `give ${budgetOption} (at most ${formatBytes(most)}) for a cache smaller than the disk, or ` : '';
  throw new InvalidArgumentError(
    `a full mirror of ${disk} needs ${formatBytes(need)} for ${paths.cache}, but ${dir} has ${formatBytes(free)} free; ${smaller}put the cache on a larger filesystem with -c`,
  );
}

/**
 * Creates the cache and bitmap files: the bitmap preallocated; the cache file preallocated (a full
 * mirror: no write ever meets ENOSPC) or, with a budget, sparse (its space comes as blocks fill).
 */
async function createFiles(storage: Storage, paths: CachePaths, geometry: Geometry, meta: Metadata, sparse: boolean) {
  // A previous creation may have crashed midway: its files are ours to replace.
  await storage.remove(paths.cache);
  await storage.remove(paths.bitmap);
  let cache: BlockFile | undefined;
  let bitmapFile: BlockFile | undefined;
  try {
    cache = await storage.open(paths.cache, { create: true });
    if (sparse) {
      await cache.truncate(geometry.cacheFileSize);
      // A budget works by punching holes: find out now if this filesystem cannot.
      await cache.punchHole(0, Math.min(FILE_ALIGN, geometry.cacheFileSize));
    } else {
      await cache.allocate(geometry.cacheFileSize);
    }
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
    if (code === 'EOPNOTSUPP' || code === 'ENOTSUP') {
      throw new InvalidArgumentError(
        `the filesystem of ${paths.cache} cannot punch holes, which a cache budget needs (ext4, XFS, btrfs and tmpfs can); put the cache there, or drop --cache-size`,
      );
    }
    throw code === 'ENOSPC'
      ? ioError('allocate the cache (not enough space for a cache the size of the disk; --cache-size sets a smaller budget)', paths.cache, err)
      : ioError('create the cache', (err as { path?: string }).path ?? paths.cache, err);
  }
}

async function openFiles(storage: Storage, paths: CachePaths, geometry: Geometry, disk: string, recordedBitmap: string | null) {
  // What a user can do about a cache file that is gone or cut short: nothing here repairs it.
  // discard removes only this cache's own bitmap (the recorded one), never a -b of another's.
  const startOver = `if the cache is lost, 'ulobdev discard --force -c ${paths.cache} ${disk}' starts over with an empty one, losing any blocks the disk has not received`;
  let cache: BlockFile | undefined;
  let opening = paths.cache;
  try {
    cache = await storage.open(paths.cache);
    const cacheSize = await cache.size();
    if (cacheSize !== geometry.cacheFileSize) {
      throw new SizeMismatchError(`${paths.cache} is ${cacheSize} bytes, not the ${geometry.cacheFileSize} of this cache (truncated or replaced?); ${startOver}`);
    }
    opening = paths.bitmap;
    // A -b other than the bitmap this cache was last attached with, while that one is still there,
    // is most likely another cache's (of the same size, or the size check below would say so): its
    // bits would say which blocks this cache holds, and reads would return wrong data. A bitmap
    // moved on purpose leaves nothing at the old path and is taken.
    if (recordedBitmap !== null && recordedBitmap !== resolve(paths.bitmap) && existsSync(recordedBitmap)) {
      throw new SizeMismatchError(
        `this cache was last attached with -b ${recordedBitmap}, which is still there: give that one (is ${paths.bitmap} the bitmap of another cache?); to use ${paths.bitmap} instead, move it over ${recordedBitmap}'s path or remove the old one first; nothing was changed`,
      );
    }
    const bitmapFile = await storage.open(paths.bitmap);
    const bitmapSize = await bitmapFile.size();
    if (bitmapSize !== geometry.bitmapFileSize) {
      await bitmapFile.close();
      // The likely cause is a -b naming another cache's bitmap (newuser8 F2): say so before any
      // discard, and name the bitmap this cache was last attached with.
      const other =
        recordedBitmap !== null && recordedBitmap !== resolve(paths.bitmap)
          ? `this cache was last attached with -b ${recordedBitmap}, which is not there now (moved?); is ${paths.bitmap} the bitmap of another cache?`
          : `is -b the bitmap of another cache? give this cache's own`;
      throw new SizeMismatchError(
        `${paths.bitmap} is ${bitmapSize} bytes, not the ${geometry.bitmapFileSize} of this cache's bitmap; ${other}; only ${startOver}`,
      );
    }
    return { cache, bitmapFile };
  } catch (err) {
    await cache?.close().catch(() => undefined);
    if (err instanceof SizeMismatchError) throw err;
    if ((err as { code?: string }).code === 'ENOENT') {
      throw new SizeMismatchError(`${opening} is missing, but its metadata ${paths.metadata} is there (moved, or the flash not mounted?); ${startOver}`);
    }
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


/**
 * Refuses cache paths (cache file, bitmap, metadata) that are not files of their own: a block
 * device, a directory, or the disk `backing` itself (same inode, or for a block device the same
 * device number; also a cache file on a filesystem that lives on that block device). Attach runs
 * it before anything is opened, discard before anything is removed: the one slip that turns a
 * cache command into the loss of the disk (`-c disk.img ... disk.img`).
 * @throws InvalidArgumentError naming the path and what it is.
 */
export async function assertCachePathsApart(paths: CachePaths, backing?: string): Promise<void> {
  const disk = backing === undefined ? null : await fsp.stat(backing).catch(() => null);
  // What the disk is built on (itself, its whole disk if a partition, dm/md members): read once.
  const diskStack = disk?.isBlockDevice() ? await blockStack(majorMinor(disk.rdev)) : null;
  for (const [what, p] of [['cache', paths.cache], ['bitmap', paths.bitmap], ['metadata', paths.metadata]] as const) {
    const st = await fsp.stat(p).catch(() => null);
    if (disk && st && (disk.isBlockDevice() ? st.isBlockDevice() && st.rdev === disk.rdev : st.dev === disk.dev && st.ino === disk.ino)) {
      throw new InvalidArgumentError(`the ${what} ${p} is the disk itself (BACKEND ${backing}); give -c a file on flash, not the disk`);
    }
    if (st && !st.isFile()) {
      const kind = st.isBlockDevice() ? 'a block device' : st.isDirectory() ? 'a directory' : 'not a regular file';
      throw new InvalidArgumentError(`the ${what} ${p} is ${kind}, not a ulobdev cache file; give -c a file on flash (a path that does not exist yet makes a new cache)`);
    }
    // A cache file on a filesystem of the disk would write the disk on every cache write.
    const home = st ?? (await fsp.stat(dirname(p)).catch(() => null));
    if (disk?.isBlockDevice() && home && home.dev === disk.rdev) {
      throw new InvalidArgumentError(`the ${what} ${p} is on a filesystem of the disk ${backing} itself; give -c a file on flash, not on the disk`);
    }
    // Or on a filesystem of one of its partitions (BACKEND /dev/sdb, -c under a mount of /dev/sdb1).
    const partition = disk?.isBlockDevice() && home ? await partitionOf(home.dev, disk.rdev) : null;
    if (partition) {
      throw new InvalidArgumentError(`the ${what} ${p} is on a filesystem of /dev/${partition}, a partition of the disk ${backing} itself; give -c a file on flash, not on the disk`);
    }
    // Or on anything stacked on the same physical disk: LVM or dm-crypt over it or one of its
    // partitions, md RAID with a member on it, a sibling partition when BACKEND is a partition.
    if (diskStack && home) {
      const under = await blockStack(majorMinor(home.dev));
      const shared = [...diskStack.entries()].find(([mm]) => under.has(mm));
      if (shared) {
        const fs = under.values().next().value;
        throw new InvalidArgumentError(`the ${what} ${p} is on a filesystem of /dev/${fs}, which is built on /dev/${shared[1]} as the disk ${backing} is: every cache write would spin the disk up; give -c a file on flash, not on the disk`);
      }
    }
  }
}

/**
 * The name (sdb1, loop5p1) of the block device `dev` (a dev_t, as stat's st_dev) when it is a
 * partition of the whole disk `disk` (a dev_t, st_rdev), else null. From sysfs: a partition's
 * /sys/dev/block/MAJ:MIN has a `partition` file and sits in its disk's directory.
 */
async function partitionOf(dev: number, disk: number): Promise<string | null> {
  const sys = `/sys/dev/block/${majorMinor(dev)}`;
  if (!(await fsp.stat(join(sys, 'partition')).catch(() => null))) return null;
  const real = await fsp.realpath(sys).catch(() => null);
  if (!real) return null;
  const parentDev = (await fsp.readFile(join(dirname(real), 'dev'), 'utf8').catch(() => '')).trim();
  return parentDev === majorMinor(disk) ? basename(real) : null;
}
