// One attached device: backing source → cache store → engine → NBD server → frontend, plus the
// control socket. Started in that order, torn down in the reverse one.
import { promises as fsp } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import type { Logger } from 'pino';
import { CacheEngine } from '../cache/engine.js';
import { CacheStore, type CachePaths, type IntentStats } from '../cache/store.js';
import { reservePath, type FlashReserveStatus } from '../cache/reserve.js';
import { assertBlockSize, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE } from '../cache/layout.js';
import { DeviceBusyError, InvalidArgumentError, IOFailedError, NotAttachedError, NotRootError, ReadOnlyError } from '../errors.js';
import { exists, sleep } from '../sys.js';
import { run } from '../bdev/programs.js';
import { RUN_DIR, STATE_DIR } from '../paths.js';
import { DiskRecords } from '../cache/disk-record.js';
import { diskFingerprint, type FingerprintDisk } from '../cache/fingerprint.js';
import { formatBytes } from '../units.js';
import { isWritable, observeReads, type SectorSize, type Source } from '../source/source.js';
import { DiskHealth, type DiskHealthStatus } from '../source/health.js';
import { ANY_LOOP, defaultName, frontendKind, type Frontend, type FrontendKind } from '../bdev/frontend.js';
import { assertLoopFree, attachLoop } from '../bdev/loop-fuse.js';
import { assertNbdFree, attachNbdDevice } from '../bdev/kernel-nbd.js';
import { assertUloopAvailable, uloopAwaitsDaemon, assertUloopModule, attachUloop, type UloopStatus } from '../bdev/uloop.js';
import { assertUblkAvailable, assertUblkDriver, attachUblk, ublkQueues, type UblkStatus } from '../bdev/ublk.js';
import { assertLocalAddress, NbdServer, parseNbdUrl } from '../bdev/nbd-server/index.js';
import type { FlushResult } from '../writeback/flusher.js';
import { Hydrator, type HydrationProgress } from '../writeback/hydrate.js';
import { DiskPower, onAcPower, standbyTimerCount, standbyTimerSeconds } from '../writeback/power.js';
import { FlushScheduler, type SchedulerStatus } from '../writeback/scheduler.js';
import { assertNoDaemon, ControlServer, type ControlRequest } from './control.js';
import { claimName, describeRecovery, nameTaken, readRecord, recoverLeftovers, releaseName, updateRecordDevice } from './leftovers.js';
import { fstabWarnings, stableLinkFor } from './fstab.js';
import { crashPoint, markStart, startTimes } from '../sys.js';

export const EXPORT_NAME = 'ulobdev';
/** How long a status request waits for the cache file's allocated size before answering with the last one. */
const REFRESH_WAIT_MS = 500;

export interface AttachOptions {
  device: string;
  /** Opens the source behind the cache (the backing disk, an HTTP image, a user callback). */
  openSource: (options: { writable: boolean }) => Promise<Source>;
  cache?: string;
  bitmap?: string;
  metadata?: string;
  writeback: boolean;
  blockSize?: number;
  /**
   * --cache-size: the flash the cache file may take, in bytes or as a percentage of the disk.
   * Without it a new cache is a full, preallocated mirror and an existing one keeps its budget.
   */
  cacheSize?: CacheSize;
  /**
   * The option of this command that gives a cache smaller than the disk ('--cache-size' for
   * ulobdev), named when a full mirror does not fit on the flash filesystem.
   */
  budgetOption?: string;
  /** --eviction-unit for a new cache (bytes, 64 KiB to 1 MiB). */
  evictionUnit?: number;
  name?: string;
  stateDir?: string;
  /**
   * Keep the disk's record in STATE_DIR/disks (src/cache/disk-record.ts): refuse a second cache of
   * a disk whose cache holds dirty data, and a cache the disk was written past. ulobdev's disks:
   * on; ulohttp's images and createDevice()'s sources, which nothing ulobdev runs writes: off.
   */
  diskRecords?: boolean;
  runDir?: string;
  logger: Logger;
  /** Write-back policy (src/writeback): all optional; without them flushes are manual only. */
  writebackPolicy?: WritebackPolicy;
  /**
   * Serve an NBD URL on an address other machines can reach (nbd://0.0.0.0:PORT). Off: such an
   * address is refused, since NBD has neither authentication nor encryption here.
   */
  allowRemote?: boolean;
  /**
   * Told (besides the log) what the user should know of the attach: what it let go of a dead daemon
   * of the same name, fstab lines that may mount the raw disk.
   */
  onNotice?: (line: string) => void;
  /** The fstab to check for lines that name the filesystem by tag (default /etc/fstab). */
  fstab?: string;
}

/** A cache budget as typed: bytes, or a percentage of the disk. */
export type CacheSize = { bytes: number } | { percent: number };

export interface WritebackPolicy {
  /** Validated cron expression. */
  flushCron?: string;
  dirtyMaxBytes?: number;
  /** --dirty-max as a percentage of a disk whose size was not known at parse time. */
  dirtyMaxPercent?: number;
  maxDirtyAgeMs?: number;
  spindown?: boolean;
  /** Seconds for the drive's own standby timer (hdparm -S); 0 turns it off. */
  standbyTimeoutSeconds?: number;
  onAc?: 'flush' | 'schedule';
  /** Copy the whole disk into the cache; the number is bytes per second (0: unlimited). */
  hydrateRate?: number;
  /** Flush before detach and shutdown (default: on when any automatic trigger is set). */
  flushOnDetach?: boolean;
  /** The block device to send power commands to (the backing disk); none for files and URLs. */
  powerDevice?: string;
  /** Periods for tests. */
  tickMs?: number;
  sampleMs?: number;
}

export interface DeviceStatus {
  name: string;
  device: string;
  frontend: FrontendKind;
  backing: string;
  mode: string;
  size: number;
  /** The device's logical and physical sector sizes (the disk's; 512 for files and URLs). */
  sectorSize: SectorSize;
  blockSize: number;
  cachedBytes: number;
  cacheFillPercent: number;
  dirtyBytes: number;
  flushEpoch: number;
  uptimeSeconds: number;
  pid: number;
  paths: CachePaths;
  /** The source's own counters, if it keeps any. */
  source?: Record<string, number | string | boolean>;
  /** The backing disk's state (ok, failing, gone) and its last I/O error. */
  disk: DiskHealthStatus;
  /** Dirty bytes not yet on the disk (dirty minus what a running flush has already written). */
  bytesAtRisk: number;
  oldestDirtyAgeSeconds: number | null;
  /** The cache budget (--cache-size) in bytes, or null: a full, preallocated mirror of the disk. */
  budgetBytes: number | null;
  /** Bytes the cache file holds or is about to (present, reserved, being punched). */
  usedBytes: number;
  /** What the flash filesystem charges for the cache file now (st_blocks). */
  allocatedBytes: number;
  /** Flash the bitmap and the metadata (with its WAL) take, as of the last refreshStatus (st_blocks). */
  overheadBytes: number;
  /** Dirty bytes that read as zeros (TRIM, WRITE_ZEROES) and take no flash. */
  zeroBytes: number;
  evictionUnit: number;
  /** Since attach: bytes evicted, reads served from flash (hits) or that read the disk (misses). */
  evictedBytes: number;
  readHits: number;
  readMisses: number;
  /** readHits / (readHits + readMisses), or null before the first read. */
  hitRatio: number | null;
  /** Why writes wait for room, or failed for want of it; null while there is room. */
  spaceError: string | null;
  /** Dirty-intent rounds since attach: how many first writes share one transaction and WAL fsync. */
  intents: IntentStats;
  /** The flash reserve (room released so a flush can commit on a full flash filesystem), or null: none. */
  flashReserve: FlashReserveStatus | null;
  /** Requests waiting for room now (budget or a `room` flush), `room` flushes and requests failed for want of room since attach. */
  roomWaiters: number;
  roomFlushes: number;
  failedRequests: number;
  /** Write-back state: schedule, last/next flush, errors, power. Absent in read-only mode. */
  writeback?: SchedulerStatus & { schedule: string | null; powerControl: string | null; powerControlOff: string | null };
  /** Every policy setting in force (null: not set), so status shows what the daemon was told. */
  policy: PolicyStatus;
  hydration?: HydrationProgress;
  /** /dev/uloopN: the kernel's exact counts and state (QUERY); cachedBytes and dirtyBytes come from it. */
  kernel?: UloopStatus;
  /** /dev/ublkbN: the ublk server's counts (requests it served itself and upcalls). */
  ublk?: UblkStatus;
}

/** The write-back and hydration settings of a daemon, as status shows them; null means not set. */
export interface PolicyStatus {
  flushCron: string | null;
  dirtyMaxBytes: number | null;
  maxDirtyAgeSeconds: number | null;
  spindown: boolean;
  standbyTimeoutSeconds: number | null;
  onAc: 'flush' | 'schedule' | null;
  /** Bytes per second; 0 is unlimited; null: no hydration. */
  hydrateRate: number | null;
  flushOnDetach: boolean;
}

export class Daemon {
  readonly name: string;
  readonly device: string;
  readonly engine: CacheEngine;
  readonly #source: Source;
  readonly #server: NbdServer;
  readonly #frontend: Frontend;
  readonly #control: ControlServer;
  readonly #logger: Logger;
  readonly #started = Date.now();
  readonly #runDir: string;
  readonly #scheduler: FlushScheduler | null;
  #hydrator: Hydrator | null;
  readonly #power: DiskPower | null;
  readonly #policy: WritebackPolicy;
  readonly #health: DiskHealth;
  #detaching: Promise<DetachResult> | null = null;
  #allocatedBytes = 0;
  #overheadBytes = 0;
  readonly #done: Promise<void>;
  #resolveDone!: () => void;

  private constructor(parts: {
    name: string;
    device: string;
    engine: CacheEngine;
    source: Source;
    server: NbdServer;
    frontend: Frontend;
    control: ControlServer;
    logger: Logger;
    runDir: string;
    scheduler: FlushScheduler | null;
    hydrator: Hydrator | null;
    power: DiskPower | null;
    policy: WritebackPolicy;
    health: DiskHealth;
  }) {
    this.name = parts.name;
    this.device = parts.device;
    this.engine = parts.engine;
    this.#source = parts.source;
    this.#server = parts.server;
    this.#frontend = parts.frontend;
    this.#control = parts.control;
    this.#logger = parts.logger;
    this.#runDir = parts.runDir;
    this.#scheduler = parts.scheduler;
    this.#hydrator = parts.hydrator;
    this.#power = parts.power;
    this.#policy = parts.policy;
    this.#health = parts.health;
    this.#done = new Promise((r) => (this.#resolveDone = r));
  }

  /** Resolves once the device is detached and everything is closed. */
  get done(): Promise<void> {
    return this.#done;
  }

  static async start(options: AttachOptions): Promise<Daemon> {
    markStart('checked');
    const kind = frontendKind(options.device);
    if (kind === 'uloop') assertUloopModule(options.device);
    if (kind === 'ublk') {
      assertUblkDriver(options.device);
      ublkQueues();
    }
    if (kind !== 'serve' && process.getuid?.() !== 0) throw new NotRootError(`binding ${options.device} needs root; run ulobdev as root (or serve an NBD URL instead)`);
    const name = options.name ?? defaultName(options.device);
    if (options.name !== undefined) checkDaemonName(options.name);
    const runBase = options.runDir ?? RUN_DIR;
    const runDir = join(runBase, name);
    // One `device` key per line: the frontends log with this logger and do not repeat it.
    const logger = options.logger.child(name === defaultName(options.device) ? { device: options.device } : { device: options.device, name });
    if (kind === 'serve') {
      const address = parseNbdUrl(options.device);
      assertLocalAddress(address, { allowRemote: options.allowRemote, what: 'the cached disk', writable: options.writeback });
      if (options.allowRemote && !('path' in address)) {
        logger.warn(`${options.device}: serving the cached disk to the network with no authentication and no encryption (--allow-remote)`);
      }
    }
    const explicitName = options.name !== undefined;
    await assertNoDaemon(join(runBase, `${name}.sock`)).catch(async (err: unknown) => {
      throw err instanceof DeviceBusyError ? nameTaken(name, await readRecord(runBase, name), options.device, explicitName) : err;
    });
    await assertCacheDirsExist(options);
    if (kind === 'ublk' && options.writebackPolicy?.hydrateRate !== undefined) throw hydrateOnUblk(options.device);
    // The name is this process's from here on (RUN_DIR/NAME.json); what a dead daemon of the same
    // name left (a loop device bound to its FUSE file, nbdfuse, the mount) is let go first.
    const recovery =
      (await claimName(runBase, { name, device: options.device, frontend: kind }, explicitName)) ??
      (await recoverLeftovers(runBase, name, { pid: 0, device: options.device, frontend: kind }).catch(async (err: unknown) => {
        await releaseName(runBase, name);
        throw err;
      }));
    if (recovery.steps.length > 0) {
      const line = describeRecovery(recovery);
      logger.warn(line);
      options.onNotice?.(line);
    }
    crashPoint('attach:claimed');
    const undo: Array<() => Promise<unknown>> = [];
    let paths: CachePaths | undefined;
    try {
      // Everything that can refuse DEVICE is checked before the cache is opened or created.
      if (kind === 'loop' && options.device !== ANY_LOOP) await assertLoopFree(options.device);
      if (kind === 'nbd') await assertNbdFree(options.device);
      const source = await options.openSource({ writable: options.writeback });
      undo.push(() => source.close());
      const policy = options.writebackPolicy ?? {};
      let budget = options.cacheSize && budgetBytes(options.cacheSize, source.size);
      // More than the disk is the whole disk (lvmcache takes a cache pool larger than its origin
      // too): the budget is clamped, and said once (newuser9: "budget 1 TiB" for a 211 MiB disk).
      if (budget !== undefined && budget > source.size) {
        const line = `--cache-size ${formatBytes(budget)} is more than all of ${source.description} (${formatBytes(source.size)}): the cache holds at most the whole disk, so its budget is ${formatBytes(source.size)}`;
        logger.warn(line);
        options.onNotice?.(line);
        budget = source.size;
      }
      if (budget !== undefined && policy.hydrateRate !== undefined && budget < source.size) throw hydrateOverBudget(budget, source.size);
      // Cache blocks are whole sectors of the disk: a new cache on a disk with sectors larger than
      // 4 KiB gets blocks of one sector; an explicit smaller --block-size is refused here, before
      // anything is created, and an existing cache's block size after it is opened (below).
      const sectorSize = source.sectorSize ?? { logical: 512, physical: 512 };
      if (kind === 'uloop') assertUloopAvailable(options.device, { size: source.size, writeback: options.writeback, logical: sectorSize.logical });
      // A --block-size that is no block size at all (3000, 2M) is said as such first.
      if (options.blockSize !== undefined) assertBlockSize(options.blockSize);
      assertSectorFits(sectorSize, options.blockSize ?? DEFAULT_BLOCK_SIZE, source.description, options.blockSize === undefined);
      const policyIn = options.writebackPolicy ?? {};
      if (policyIn.dirtyMaxBytes !== undefined && policyIn.dirtyMaxBytes > source.size) {
        throw new InvalidArgumentError(
          `--dirty-max ${formatBytes(policyIn.dirtyMaxBytes)} is more than all of ${source.description} (${formatBytes(source.size)}): it would never start a flush; give a smaller size or a percentage such as 10%`,
        );
      }
      paths = cachePaths(options, source.id);
      if (kind === 'ublk') await assertUblkAvailable(options.device, paths.cache, runBase);
      // Only the default state directory is made here; a directory the user named must exist.
      await fsp.mkdir(dirname(paths.cache), { recursive: true, mode: 0o700 });
      await fsp.mkdir(dirname(paths.bitmap), { recursive: true, mode: 0o700 });
      const store = await CacheStore.open({
        paths,
        backing: source,
        mode: options.writeback ? 'writeback' : 'readonly',
        blockSize: options.blockSize,
        budget,
        evictionUnit: options.evictionUnit,
        defaultBlockSize: Math.max(DEFAULT_BLOCK_SIZE, sectorSize.logical),
        // A /dev/uloopN left by a dead daemon still serves the cache file: nothing is punched now.
        servedByKernel: kind === 'uloop' && uloopAwaitsDaemon(options.device),
        budgetOption: options.budgetOption,
        records: options.diskRecords ? new DiskRecords(options.stateDir ?? STATE_DIR) : undefined,
        // A disk written without ulobdev since this cache last left it (the disk, not its wrappers:
        // these few reads are not misses and start no flush).
        fingerprint: options.diskRecords
          ? () => {
              // Read past every page cache (its own O_DIRECT descriptor of the disk's path).
              const starts = (source as FingerprintDisk).partitionStarts;
              return diskFingerprint({ size: source.size, readAt: (b, p) => source.readAt(b, p), partitionStarts: starts && (() => starts.call(source)), path: source.description });
            }
          : undefined,
      });
      undo.push(() => store.close());
      markStart('store');
      // The budget the cache already had counts as much as one given now.
      if (store.budget !== null && policy.hydrateRate !== undefined && store.budget < source.size) throw hydrateOverBudget(store.budget, source.size);
      if (store.recoveredFromCrash) logger.warn('the cache was not closed cleanly last time; recovered its dirty set from the metadata');
      const shrunk = describeShrink(store);
      if (shrunk) {
        // Said once, here: status's "evicted" counts what eviction lets go while the device serves.
        logger.info(shrunk);
        options.onNotice?.(shrunk);
      }
      if (store.fingerprintError) {
        logger.warn(
          { err: store.fingerprintError },
          `cannot read ${source.description}'s fingerprint (${(store.fingerprintError as Error).message ?? String(store.fingerprintError)}): this attach cannot tell whether the disk was written without ulobdev since ${paths.cache} last left it; going on`,
        );
      }
      if (store.diskChanged) {
        const line = `${source.description} was written without ulobdev since ${paths.cache} last left it (mounted directly?): the cache held no dirty data, so its clean blocks were dropped and it starts cold`;
        logger.warn(line);
        options.onNotice?.(line);
      }
      assertSectorFits(sectorSize, store.geometry.blockSize, source.description, false);
      // Reads of the source (misses, hydration) mean the disk spins: a chance to flush for free.
      let onDiskRead = () => undefined as void;
      // Every I/O that reaches the disk also tells its state (ok, failing, gone) for status.
      const health = new DiskHealth({ present: source.present ? () => source.present!() : undefined });
      const engine = new CacheEngine(store, observeReads(health.watch(source), () => onDiskRead()));
      undo.push(() => engine.close());

      let power: DiskPower | null = null;
      if (policy.powerDevice) {
        power = await DiskPower.open(policy.powerDevice, logger);
        undo.push(() => power!.close());
        // Asked for and impossible (newuser12 F1): said where the user looks, not only in the log.
        if (!power.supported && (policy.spindown || policy.standbyTimeoutSeconds !== undefined)) {
          options.onNotice?.(`disk power control is off for ${policy.powerDevice}: ${power.offReason}; --spindown and --standby-timeout do nothing here`);
        }
        if (power.supported && policy.standbyTimeoutSeconds !== undefined) {
          await power.setStandbyTimer(policy.standbyTimeoutSeconds).then(
            () => logger.info(`standby timer of ${power!.path} set to ${standbyTimerSeconds(standbyTimerCount(policy.standbyTimeoutSeconds!))} s`),
            (err: Error) => logger.warn(`cannot set the standby timer of ${power!.path}: ${err.message}`),
          );
        }
      }
      let scheduler: FlushScheduler | null = null;
      if (store.mode === 'writeback' && isWritable(source)) {
        scheduler = new FlushScheduler(engine, {
          cron: policy.flushCron,
          dirtyMaxBytes: policy.dirtyMaxBytes ?? (policy.dirtyMaxPercent !== undefined ? Math.floor((source.size * policy.dirtyMaxPercent) / 100) : undefined),
          maxDirtyAgeMs: policy.maxDirtyAgeMs,
          spindown: policy.spindown,
          onAc: policy.onAc,
          acPower: () => onAcPower(),
          power: power ?? undefined,
          history: store.history,
          logger,
          tickMs: policy.tickMs,
          sampleMs: policy.sampleMs,
          opportunistic: hasAutomaticWriteback(policy),
        });
        const sched = scheduler;
        onDiskRead = () => sched.noteDiskActive();
        // Writes waiting for room in the budget: a flush makes clean blocks, which can go.
        engine.onSpacePressure = (reason) => sched.pressure(reason);
        undo.push(async () => sched.stop());
      }
      let hydrator: Hydrator | null = null;
      if (policy.hydrateRate !== undefined) {
        hydrator = new Hydrator(engine, {
          rate: policy.hydrateRate,
          onError: (err) => logger.warn(`hydration: ${err.message}; retrying`),
        });
        const h = hydrator;
        undo.push(() => h.stop());
      }

      await fsp.mkdir(runDir, { recursive: true, mode: 0o700 });
      // NBD block size constraints: clients align to the disk's logical sector at least, and to its
      // physical one (never below a page) for speed.
      const server = new NbdServer({
        backend: engine,
        exportName: EXPORT_NAME,
        description: `ulobdev cache of ${source.description}`,
        logger,
        allowRemote: options.allowRemote,
        minBlockSize: sectorSize.logical,
        preferredBlockSize: Math.max(4096, sectorSize.physical),
      });
      const address = kind === 'serve' ? parseNbdUrl(options.device) : { path: join(runDir, 'nbd.sock') };
      await server.listen(address);
      undo.push(() => server.close());

      const readOnly = !options.writeback;
      const socket = 'path' in address ? address.path : '';
      // For udev (contrib/udev/ulobdev-name): which /dev/nbdN or /dev/uloopN this daemon serves, so
      // the device gets its stable name /dev/ulobdev/NAME; a loop device's file path says it already.
      if (kind === 'nbd' || kind === 'uloop' || kind === 'ublk') {
        await fsp.writeFile(join(runDir, 'pid'), `${process.pid}\n`);
        await fsp.writeFile(join(runDir, 'device'), `${options.device}\n`);
      }
      let frontend: Frontend;
      if (kind === 'loop') frontend = await attachLoop({ device: options.device, socket, runDir, readOnly, logger, sectorSize: sectorSize.logical });
      else if (kind === 'nbd') frontend = await attachNbdDevice({ device: options.device, socket, exportName: EXPORT_NAME, readOnly, sectorSize: sectorSize.logical, logger });
      else if (kind === 'uloop') {
        // ABI 2 takes the disk's sector sizes at ADD: /dev/uloopN shows the disk's.
        const uloop = await attachUloop({ device: options.device, engine, readOnly, logger, sectorSize });
        if (hydrator) hydrator.fill = (offset, length) => uloop.hydrateFill(offset, length);
        frontend = uloop;
      } else if (kind === 'ublk') frontend = await attachUblk({ device: options.device, engine, readOnly, logger, sectorSize, recordDir: runBase });
      else frontend = { kind: 'serve', device: options.device, detach: async () => undefined };
      undo.push(() => frontend.detach());
      if (kind === 'nbd' || kind === 'uloop' || kind === 'ublk') await announceToUdev(frontend.device);
      // /dev/loop took the first free loop device: the record names the one it took.
      if (frontend.device !== options.device) await updateRecordDevice(runBase, name, frontend.device);
      crashPoint('attach:bound');

      let daemon: Daemon | undefined;
      const control = await ControlServer.listen(join(runBase, `${name}.sock`), (req) => daemon!.#handle(req));
      daemon = new Daemon({ name, device: frontend.device, engine, source, server, frontend, control, logger, runDir, scheduler, hydrator, power, policy, health });
      scheduler?.start();
      if (hydrator) {
        const h = hydrator;
        void h.start().then(
          () => h.progress().done && logger.info('hydrated: the whole disk is in the cache; reads no longer reach it'),
          (err: Error) => logger.error(`hydration stopped: ${err.message}`),
        );
      }
      markStart('attached');
      logger.info({ backing: source.description, cache: paths.cache, mode: store.mode, schedule: policy.flushCron ?? null, startMs: startTimes() }, 'attached');
      if (kind !== 'serve') {
        const link = await stableLinkFor(name, runBase === RUN_DIR);
        for (const line of await fstabWarnings(options.device, `/sys/block/${basename(options.device)}`, source.description, options.fstab, link)) {
          logger.warn(line);
          options.onNotice?.(line);
        }
      }
      return daemon;
    } catch (err) {
      for (const step of undo.reverse()) await step().catch(() => undefined);
      await fsp.rm(runDir, { recursive: true, force: true }).catch(() => undefined);
      await releaseName(runBase, name).catch(() => undefined);
      throw paths ? explainNoSpace(err, paths) : err;
    }
  }

  /**
   * The device's state (docs/reference.md, "Status"). `allocatedBytes` is as of the last
   * refreshStatus() (the control socket's status message refreshes it first).
   */
  status(): DeviceStatus {
    const s = this.engine.stats();
    // A kernel frontend serves hits and keeps dirty bits the store learns of only at barriers:
    // its own counts are the exact ones.
    const kernel = 'kernelStatus' in this.#frontend ? (this.#frontend as { kernelStatus(): UloopStatus | null }).kernelStatus() ?? undefined : undefined;
    const ublk = 'ublkStatus' in this.#frontend ? (this.#frontend as { ublkStatus(): UblkStatus | null }).ublkStatus() ?? undefined : undefined;
    if (ublk) {
      s.cachedBlocks = ublk.presentBlocks;
      s.dirtyBlocks = ublk.dirtyBlocks;
      s.readHits = ublk.readHits;
      s.readMisses = ublk.readMisses;
    }
    if (kernel) {
      s.cachedBlocks = kernel.presentBlocks;
      s.dirtyBlocks = kernel.dirtyBlocks;
      s.zeroBlocks = kernel.zeroBlocks;
      s.readHits = kernel.readHits;
      s.readMisses = kernel.readMisses;
    }
    const cachedBytes = Math.min(s.cachedBlocks * s.blockSize, s.size);
    const reads = s.readHits + s.readMisses;
    return {
      name: this.name,
      device: this.device,
      frontend: this.#frontend.kind,
      backing: this.#source.description,
      mode: s.mode,
      size: s.size,
      sectorSize: this.#source.sectorSize ?? { logical: 512, physical: 512 },
      blockSize: s.blockSize,
      cachedBytes,
      cacheFillPercent: Math.round((s.cachedBlocks / s.blocks) * 1000) / 10,
      dirtyBytes: Math.min(s.dirtyBlocks * s.blockSize, s.size),
      flushEpoch: s.flushEpoch,
      uptimeSeconds: Math.round((Date.now() - this.#started) / 1000),
      pid: process.pid,
      paths: this.engine.store.paths,
      source: this.#source.stats?.(),
      disk: this.#health.status(),
      ...this.#writebackStatus(Math.min(s.dirtyBlocks * s.blockSize, s.size)),
      budgetBytes: s.budgetBytes,
      usedBytes: s.usedBytes,
      allocatedBytes: this.#allocatedBytes,
      overheadBytes: this.#overheadBytes,
      zeroBytes: Math.min(s.zeroBlocks * s.blockSize, s.size),
      evictionUnit: s.evictionUnitBytes,
      evictedBytes: s.evictedBlocks * s.blockSize,
      readHits: s.readHits,
      readMisses: s.readMisses,
      hitRatio: reads === 0 ? null : Math.round((s.readHits / reads) * 1000) / 1000,
      spaceError: s.spaceError,
      intents: s.intents,
      flashReserve: s.flashReserve,
      roomWaiters: s.roomWaiters,
      roomFlushes: s.roomFlushes,
      failedRequests: s.failedRequests,
      // Counted from the blocks `cached` counts (answered fills, a kernel frontend's exact counts),
      // so the two never disagree (newuser12: cached 21.5% beside hydration 19.1%).
      hydration: this.#hydrator?.progress(s.cachedBlocks + s.zeroBlocks),
      policy: this.#policyStatus(),
      kernel,
      ublk,
    };
  }

  #policyStatus(): PolicyStatus {
    const p = this.#policy;
    return {
      flushCron: p.flushCron ?? null,
      dirtyMaxBytes: p.dirtyMaxBytes ?? (p.dirtyMaxPercent !== undefined ? Math.floor((this.engine.size * p.dirtyMaxPercent) / 100) : null),
      maxDirtyAgeSeconds: p.maxDirtyAgeMs === undefined ? null : p.maxDirtyAgeMs / 1000,
      spindown: p.spindown ?? false,
      standbyTimeoutSeconds: p.standbyTimeoutSeconds ?? null,
      onAc: p.onAc ?? null,
      hydrateRate: p.hydrateRate ?? null,
      flushOnDetach: this.#scheduler !== null && (p.flushOnDetach ?? hasAutomaticWriteback(p)),
    };
  }

  /**
   * Reads what the flash filesystem charges for the cache file, for status(). Waits at most
   * REFRESH_WAIT_MS (the last value stays): the stat runs on the libuv threadpool, which a hung
   * backing disk can keep busy (the flusher's copies waiting in its writes), and status must answer
   * exactly then (invariant 8).
   */
  async refreshStatus(): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<void>((resolve) => (timer = setTimeout(resolve, REFRESH_WAIT_MS)));
    const paths = this.engine.store.paths;
    // The bitmap and the metadata take flash too (newuser13: `used` hid a 12 TiB disk's 630 MiB).
    const overhead = Promise.all(
      [paths.bitmap, paths.metadata, `${paths.metadata}-wal`].map((f) => fsp.stat(f).then((st) => st.blocks * 512, () => 0)),
    ).then((sizes) => void (this.#overheadBytes = sizes.reduce((a, b) => a + b, 0)));
    const read = Promise.all([
      this.engine.store.allocatedBytes().then(
        (bytes) => void (this.#allocatedBytes = bytes),
        () => undefined,
      ),
      overhead,
    ]);
    await Promise.race([read, late]).finally(() => clearTimeout(timer));
  }

  #writebackStatus(dirtyBytes: number): Pick<DeviceStatus, 'bytesAtRisk' | 'oldestDirtyAgeSeconds' | 'writeback'> {
    const w = this.#scheduler?.status();
    if (!w) return { bytesAtRisk: dirtyBytes, oldestDirtyAgeSeconds: null };
    return {
      bytesAtRisk: Math.max(0, dirtyBytes - (w.progress?.doneBytes ?? 0)),
      oldestDirtyAgeSeconds: w.oldestDirtyAt === null ? null : Math.round((Date.now() - w.oldestDirtyAt) / 1000),
      writeback: {
        ...w,
        schedule: this.#policy.flushCron ?? null,
        powerControl: this.#power?.transport ?? null,
        powerControlOff: this.#power?.offReason ?? null,
      },
    };
  }

  /** Writes the dirty blocks back to the backing disk now, in one sorted pass (one at a time). */
  async flush(): Promise<FlushResult> {
    if (!this.#scheduler) throw this.#cannotFlush();
    return this.#scheduler.request('manual');
  }

  /**
   * Why this daemon has no write-back (read-only mode, or a source that cannot be written: an
   * HTTP image, a library source without writeAt), and what to do about its dirty data, if any.
   */
  #cannotFlush(): ReadOnlyError {
    const dirty = Math.min(this.engine.dirtyBlocks() * this.engine.geometry.blockSize, this.engine.size);
    if (!isWritable(this.#source)) {
      return new ReadOnlyError(`${this.device} caches ${this.#source.description}, which cannot be written: there is nothing to flush`);
    }
    if (dirty === 0) {
      return new ReadOnlyError(`${this.device} is attached read-only and nothing is dirty: there is nothing to flush (attach it with --writeback to cache writes)`);
    }
    return new ReadOnlyError(
      `${this.device} is attached read-only, so it cannot flush its ${formatBytes(dirty)} of dirty data (written during an earlier --writeback attach; it stays in the cache, safe): ` +
        `detach it, attach it again with --writeback, then run ulobdev flush`,
    );
  }

  /**
   * Starts copying the whole disk into the cache, if it is not running or done already (at `rate`
   * bytes per second, 0: as fast as user I/O allows); returns the progress. `ulobdev hydrate`.
   */
  hydrate(rate = 0): HydrationProgress {
    if (this.#detaching) throw new NotAttachedError(`${this.device} is being detached`);
    // The engine's fills would race the ublk server's writes into missing blocks (the same reason
    // --hydrate is refused at attach).
    if (this.#frontend.kind === 'ublk') throw hydrateOnUblk(this.device);
    // As --hydrate at attach: a budget smaller than the disk would evict what the hydration just
    // copied, for ever (a new user saw 616 MiB evicted in 15 s and the progress going backwards).
    const budget = this.engine.store.budget;
    if (!this.#hydrator && budget !== null && budget < this.engine.size) throw hydrateCommandOverBudget(budget, this.engine.size);
    if (!this.#hydrator) {
      this.#hydrator = new Hydrator(this.engine, { rate, onError: (err) => this.#logger.warn(`hydration: ${err.message}; retrying`) });
      // On /dev/uloopN the kernel may hold newer whole blocks the store has not seen yet: fills go
      // through its CLAIM/FILLED path (as --hydrate's do), never straight into the cache file.
      const f = this.#frontend;
      if ('hydrateFill' in f) this.#hydrator.fill = (offset, length) => (f as { hydrateFill(o: number, l: number): Promise<void> }).hydrateFill(offset, length);
    }
    const h = this.#hydrator;
    if (!h.progress().running && !h.progress().done) {
      this.#logger.info({ rate }, 'hydrating: copying the whole disk into the cache');
      void h.start().then(
        () => h.progress().done && this.#logger.info('hydrated: the whole disk is in the cache; reads no longer reach it'),
        (err: Error) => this.#logger.error(`hydration stopped: ${err.message}`),
      );
    }
    return h.progress();
  }

  /** History for `ulobdev report`: flushes, dirty samples and events since `since`. */
  history(since: number): Record<string, unknown> {
    const h = this.engine.store.history;
    const nextFlushAt = this.#scheduler?.status().nextFlushAt ?? null;
    return { since, now: Date.now(), size: this.engine.size, flushes: h.flushes(since), samples: h.dirtySamples(since), events: h.events(since), nextFlushAt };
  }

  /**
   * Stops the frontend (refused while the device is mounted: DeviceBusyError, nothing changed),
   * drains in-flight I/O, flushes if the policy says so, persists the metadata and closes
   * everything. Concurrent calls share one detach. Resolves with what the flush wrote.
   *
   * `force` (stop() only): the flush runs first, while the device still serves, then the frontend
   * lets go even though the device is in use; it logs no "detached:" line, the stop's own line
   * says what was written back. `deadline` (ms since the epoch) stops the flush at
   * that time; what it did not clear stays dirty in the cache.
   */
  detach(options: { force?: boolean; deadline?: number } = {}): Promise<DetachResult> {
    this.#detaching ??= this.#detach(options).catch((err: unknown) => {
      this.#detaching = null;
      throw err;
    });
    return this.#detaching;
  }

  /**
   * SIGTERM (systemd's stop, shutdown): detach within `timeoutMs`. While the device is mounted or
   * held, waits for that to end, up to half the time (30 s at most): at shutdown systemd unmounts
   * it meanwhile. Still in use then: flushes as the policy says until the deadline, lets go of
   * the device anyway (the filesystem on it fails further I/O until it is unmounted) and logs one
   * line saying so and how to order the mount. A release that fails for another reason still
   * flushes first (#stopAfterFailedRelease). Either way the daemon then exits.
   */
  async stop(timeoutMs: number): Promise<DetachResult> {
    const started = Date.now();
    const deadline = started + timeoutMs;
    const waitUntil = started + Math.min(30_000, timeoutMs / 2);
    let busy: string | null = null;
    for (;;) {
      try {
        return await this.detach({ deadline });
      } catch (err) {
        if (!isBusy(err)) return this.#stopAfterFailedRelease(err, deadline);
        // The first use ("/dev/loop3 is mounted on /mnt"), or for an EBUSY without a list its message.
        const use = (err instanceof DeviceBusyError ? err.use : undefined) ?? (err as Error).message.split(';')[0]!;
        if (busy === null) this.#logger.info(`stopping: ${use}; waiting up to ${Math.round((waitUntil - started) / 1000)} s for that to end`);
        busy = use;
        if (Date.now() >= waitUntil) break;
        await sleep(250);
      }
    }
    const result = await this.detach({ force: true, deadline });
    this.#logger.error(
      flushFields(result),
      `stopped while ${busy}: ${describeFlush(result)}; the filesystem on ${this.device} now fails I/O until it is unmounted. ` +
        `Order its mount after this daemon (fstab: x-systemd.requires=ulobdev@${this.name}.service) so it is unmounted first`,
    );
    return result;
  }

  /**
   * The stop's release of the device failed for a reason other than its use (losetup -d or the
   * NBD disconnect erred, a helper died): the daemon exits all the same, so it must not leave
   * without the flush the policy asks for. It flushes while the device may still serve (the
   * flush is a point-in-time image of its start, invariant 7; later writes stay dirty), then
   * lets go of the device by force, and logs one error line naming the failure. A failure of
   * the close itself after that (the cache's metadata) is thrown: the daemon exits non-zero and
   * the next start recovers.
   */
  async #stopAfterFailedRelease(err: unknown, deadline: number): Promise<DetachResult> {
    const reason = (err as Error)?.message ?? String(err);
    this.#logger.warn(`stopping: releasing ${this.device} failed (${reason}); flushing, then letting go of it anyway`);
    const result = await this.detach({ force: true, deadline });
    this.#logger.error(flushFields(result), `stopped after releasing ${this.device} failed (${reason}): ${describeFlush(result)}; check that ${this.device} is gone (losetup -a, nbd-client -c) before reusing it`);
    return result;
  }

  async #detach(options: { force?: boolean; deadline?: number }): Promise<DetachResult> {
    if (!options.force) {
      await this.#frontend.detach();
      await this.#server.close();
    }
    await this.#hydrator?.stop();
    let flushed: FlushResult | null = null;
    let flushError: string | null = null;
    let waitedBytes = 0;
    const scheduler = this.#scheduler;
    if (scheduler) {
      scheduler.stop();
      // A flush already running (`ulobdev flush`, a schedule, an opportunistic one) ends first:
      // what it wrote is part of what this detach says (newuser11 finding 6: "no flush" after
      // waiting for 149 MiB).
      for (const r of await scheduler.idle()) waitedBytes += r.bytes;
      const p = this.#policy;
      if ((p.flushOnDetach ?? hasAutomaticWriteback(p)) && this.engine.dirtyBlocks() > 0) {
        // Detach and shutdown flush: the disk leaves with everything. A failure (or the stop
        // deadline) keeps the data dirty in the cache (safe), so detaching goes on.
        const controller = new AbortController();
        const timer = options.deadline === undefined ? null : setTimeout(() => controller.abort(), Math.max(0, options.deadline - Date.now()));
        try {
          flushed = await scheduler.request('detach', { signal: controller.signal });
        } catch (err) {
          flushError = (err as Error).message;
          this.#logger.error(`flush before detach failed, the dirty blocks stay in the cache: ${flushError}`);
        } finally {
          if (timer) clearTimeout(timer);
        }
      }
      scheduler.sampleNow();
    }
    if (options.force) {
      await this.#frontend.detach({ force: true }).catch((err: Error) => this.#logger.warn(`letting go of ${this.device}: ${err.message}`));
      await this.#server.close();
    }
    const dirtyBytes = Math.min(this.engine.dirtyBlocks() * this.engine.geometry.blockSize, this.engine.size);
    const readOnly = this.engine.store.mode === 'readonly';
    await this.engine.close();
    await this.#power?.close();
    await this.#source.close();
    await this.#control.close();
    await fsp.rm(this.#runDir, { recursive: true, force: true });
    await releaseName(dirname(this.#runDir), this.name);
    const result: DetachResult = { device: this.device, flushed, flushError, dirtyBytes, waitedBytes, readOnly };
    // A forced detach is stop()'s: its own line says what was written back (one line per fact).
    if (!options.force) this.#logger.info(flushFields(result), `detached: ${describeFlush(result)}`);
    this.#resolveDone();
    return result;
  }

  async #handle(request: ControlRequest): Promise<Record<string, unknown>> {
    switch (request.cmd) {
      case 'status':
        await this.refreshStatus();
        return { status: this.status() };
      case 'detach':
        return { detach: await this.detach() };
      case 'flush': {
        if (request.wait === false) {
          // Started, not awaited: `ulobdev flush` without --wait returns at once.
          if (!this.#scheduler) throw this.#cannotFlush();
          const dirty = this.engine.dirtyBlocks();
          if (dirty > 0 || this.#scheduler.flushing) this.flush().catch(() => undefined);
          return { started: dirty > 0, dirtyBytes: Math.min(dirty * this.engine.geometry.blockSize, this.engine.size) };
        }
        return { flush: await this.flush() };
      }
      case 'hydrate':
        return { hydration: this.hydrate(typeof request.rate === 'number' ? request.rate : 0) };
      case 'report':
        return { report: this.history(typeof request.since === 'number' ? request.since : Date.now() - 86_400_000) };
      default:
        throw new InvalidArgumentError(`unknown control command ${JSON.stringify(request.cmd)}`);
    }
  }
}

/** What a detach did: the flush it ran (null: none), and what stays dirty in the cache. */
export interface DetachResult {
  device: string;
  flushed: FlushResult | null;
  /** The flush's error, when it failed or was stopped by the deadline. */
  flushError: string | null;
  /** Dirty bytes left in the cache (the disk lacks them until the next flush). */
  dirtyBytes: number;
  /** A read-only cache (ulohttp, a library source opened read-only): it never writes back. */
  readOnly?: boolean;
  /**
   * Bytes written back by flushes that were running when the detach began and that it waited for
   * (absent from a daemon before it: 0).
   */
  waitedBytes?: number;
}

/**
 * One phrase for logs and the CLI: "wrote 12 MiB back; nothing stays dirty", or "waited for a
 * running flush that wrote 149 MiB back; …" when the detach's only flush was one already under way.
 */
export function describeFlush(r: Pick<DetachResult, 'flushed' | 'flushError' | 'dirtyBytes' | 'waitedBytes' | 'readOnly'>): string {
  const waited = r.waitedBytes ?? 0;
  const before = waited > 0 ? `waited for a running flush that wrote ${formatBytes(waited)} back` : '';
  const then = before ? `${before}, then ` : '';
  const wrote = r.flushed ? `${then}wrote ${formatBytes(r.flushed.bytes)} back` : r.flushError ? `${then}the flush failed (${r.flushError})` : before;
  // Nothing written by or for this detach and nothing dirty: not "no flush", which read as "the
  // data was not written back" (newuser11 finding 6).
  // A read-only cache has no disk to be up to date (an HTTP image, a library source: newuser12).
  if (!wrote && r.dirtyBytes === 0) return r.readOnly ? 'nothing to write back (a read-only cache)' : 'nothing to write back: the disk has everything';
  const left = r.dirtyBytes > 0 ? `${formatBytes(r.dirtyBytes)} stay dirty in the cache for the next flush` : 'nothing stays dirty';
  return `${wrote || 'no flush'}; ${left}`;
}

/** The log fields of a detach's one summary line (bytes). */
function flushFields(r: DetachResult): { dirtyBytes: number; flushedBytes: number } {
  return { dirtyBytes: r.dirtyBytes, flushedBytes: r.flushed?.bytes ?? 0 };
}

/**
 * The line an open that shrank the cache to its budget says, or null when it let nothing go. It
 * counts what a crash left uncounted and the open punched too (newuser12: after `kill -9` and a
 * smaller --cache-size it said 20.5 MiB while the cache file went from 48 MiB to 16 MiB).
 */
export function describeShrink(store: Pick<CacheStore, 'shrunkBlocks' | 'droppedBlocks' | 'budgetLowered' | 'budget' | 'geometry'>): string | null {
  const { shrunkBlocks: shrunk, droppedBlocks: dropped, budget } = store;
  // What a crash left is punched at every such open; said only when the budget was lowered too
  // (review14: the leftovers alone may bring the cache under the new budget).
  if (budget === null || shrunk + dropped === 0 || (shrunk === 0 && !store.budgetLowered)) return null;
  const bytes = (blocks: number) => formatBytes(blocks * store.geometry.blockSize);
  const fit = `to fit the cache in its budget of ${formatBytes(budget)}`;
  if (dropped === 0) return `let go of ${bytes(shrunk)} of clean cached blocks ${fit} (reads of them go to the disk again; no data is lost)`;
  // Not all clean: a write into a missing block the dead daemon had staged is among them (acked
  // without a FLUSH, which a crash may lose: invariant 3), so no "no data is lost" for this part.
  const parts = [...(shrunk > 0 ? [`${bytes(shrunk)} of clean blocks (reads of them go to the disk again)`] : []), `${bytes(dropped)} the last daemon had not committed when it died`];
  return `let go of ${bytes(shrunk + dropped)} of cached blocks ${fit}: ${parts.join(' and ')}`;
}

function isBusy(err: unknown): boolean {
  return err instanceof DeviceBusyError || (err as { code?: string })?.code === 'EBUSY';
}

/** Asks udev to look at the device again (a change event), so 60-ulobdev.rules names it. */
async function announceToUdev(device: string): Promise<void> {
  if (!(await exists('/run/udev/control'))) return;
  await run('udevadm', ['trigger', '--action=change', `/sys/class/block/${basename(device)}`]).catch(() => undefined);
}

/** -c/-b default to files under /var/lib/ulobdev named after the backing identity. */
export function cachePaths(options: Pick<AttachOptions, 'cache' | 'bitmap' | 'metadata' | 'stateDir'>, backingId: string): CachePaths {
  const stem = join(options.stateDir ?? STATE_DIR, backingId.replace(/[^A-Za-z0-9._-]+/g, '_'));
  const cache = resolve(options.cache ?? `${stem}.cache`);
  return {
    cache,
    bitmap: resolve(options.bitmap ?? (options.cache ? `${cache}.bitmap` : `${stem}.bitmap`)),
    metadata: resolve(options.metadata ?? `${cache}.meta`),
  };
}

/**
 * A name given with --name: one path component that is neither hidden nor an option. It names the
 * control socket (RUN_DIR/NAME.sock), the log (NAME.log) and the run directory (RUN_DIR/NAME/,
 * removed recursively at detach), so `..`, `.` or a slash would put them elsewhere. Returns the
 * name; InvalidArgumentError otherwise.
 */
export function checkDaemonName(name: string): string {
  if (!/^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/.test(name)) {
    throw new InvalidArgumentError(
      `--name ${JSON.stringify(name)}: a name is one word of letters, digits, '.', '_' and '-' that starts with a letter, digit or '_' (at most 64), e.g. --name data`,
    );
  }
  return name;
}

/**
 * Refuses a cache, bitmap or metadata path whose directory does not exist: a typo, or flash that
 * is not mounted yet, must not become a disk-sized file on the root filesystem. The state
 * directory (/var/lib/ulobdev) is ulobdev's own and is created, also when a path names it (the
 * unit's CACHE=/var/lib/ulobdev/NAME.cache on a fresh install).
 */
async function assertCacheDirsExist(options: Pick<AttachOptions, 'cache' | 'bitmap' | 'metadata'>): Promise<void> {
  const given: Array<[string, string | undefined]> = [
    ['-c', options.cache],
    ['-b', options.bitmap],
    ['--metadata', options.metadata],
  ];
  for (const [flag, path] of given) {
    if (path === undefined) continue;
    const dir = dirname(resolve(path));
    if (dir === STATE_DIR) await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
    const st = await fsp.stat(dir).catch(() => null);
    if (!st) throw new InvalidArgumentError(`${flag} ${path}: the directory ${dir} does not exist (a typo, or the flash is not mounted yet?); create it or pick another`);
    if (!st.isDirectory()) throw new InvalidArgumentError(`${flag} ${path}: ${dir} is not a directory`);
  }
}

/**
 * A full filesystem under the cache, as the user should read it: which file could not grow, and
 * the way out. SQLite says only "database or disk is full" and a write only ENOSPC.
 */
export function explainNoSpace(err: unknown, paths: CachePaths): unknown {
  const codes: string[] = [];
  for (let e: unknown = err; e && typeof e === 'object'; e = (e as { cause?: unknown }).cause) {
    const c = (e as { code?: unknown }).code;
    if (typeof c === 'string') codes.push(c);
    if (codes.length > 8) break;
  }
  if (!codes.some((c) => c === 'ENOSPC' || c === 'SQLITE_FULL' || c === 'EDQUOT')) return err;
  // The file named by the error or one of its causes (IOFailedError, MetadataFullError and node's
  // fs errors carry `path`). The metadata's companions (its WAL, -shm, the flash reserve) live on
  // the metadata's filesystem: they count as the metadata (review14: --metadata elsewhere).
  const named = errorPaths(err).map((p) => resolve(p));
  const metadata = resolve(paths.metadata);
  const companions = [metadata, `${metadata}-wal`, `${metadata}-shm`, resolve(reservePath(paths.metadata))];
  const file = named.some((p) => companions.includes(p))
    ? paths.metadata
    : ([paths.bitmap, paths.cache].find((p) => named.includes(resolve(p))) ?? (codes.includes('SQLITE_FULL') ? paths.metadata : paths.cache));
  return new IOFailedError(
    `no space left for ${file}: the filesystem holding it is full; free space there, or put the cache on a larger filesystem with -c (and -b, --metadata); nothing was changed`,
    { cause: err, path: file },
  );
}

/** The `path` fields of an error and its causes, outermost first. */
function errorPaths(err: unknown): string[] {
  const out: string[] = [];
  for (let e: unknown = err, n = 0; e && typeof e === 'object' && n < 8; e = (e as { cause?: unknown }).cause, n++) {
    const p = (e as { path?: unknown }).path;
    if (typeof p === 'string') out.push(p);
  }
  return out;
}

/** --cache-size in bytes for a disk of `diskSize` bytes. */
export function budgetBytes(size: CacheSize, diskSize: number): number {
  return 'bytes' in size ? size.bytes : Math.max(1, Math.floor((diskSize * size.percent) / 100));
}

function hydrateOnUblk(device: string): InvalidArgumentError {
  return new InvalidArgumentError(`--hydrate is not wired to ${device} yet (the ublk server writes missing blocks the hydrator would fill); hydrate through /dev/loopN or /dev/uloopN, or leave it out`);
}

/** `ulobdev hydrate` on a cache whose budget is smaller than the disk (hydrateOverBudget's run-time twin). */
function hydrateCommandOverBudget(budget: number, size: number): InvalidArgumentError {
  return new InvalidArgumentError(
    `hydrate copies the whole disk (${formatBytes(size)}) into the cache, but its budget is ${formatBytes(budget)}: it would evict what it copies; detach and attach again with --cache-size 100% to hydrate`,
  );
}

function hydrateOverBudget(budget: number, size: number): InvalidArgumentError {
  return new InvalidArgumentError(
    `--hydrate copies the whole disk (${formatBytes(size)}) into the cache, but its budget is ${formatBytes(budget)}; drop --hydrate, or give --cache-size 100%`,
  );
}

/**
 * Refuses a cache whose blocks are not whole logical sectors of the disk (a disk with 8 KiB
 * sectors under 4 KiB blocks): direct I/O to it would fail on every block.
 */
function assertSectorFits(sectorSize: SectorSize, blockSize: number, description: string, defaulted: boolean): void {
  const { logical, physical } = sectorSize;
  const valid = (n: number) => Number.isSafeInteger(n) && n >= 512 && n <= MAX_BLOCK_SIZE && (n & (n - 1)) === 0;
  if (!valid(logical) || !valid(physical) || physical < logical) {
    throw new InvalidArgumentError(
      `${description} reports sectors of ${logical} (logical) and ${physical} (physical) bytes; expected powers of two from 512 to 1 MiB, physical at least logical`,
    );
  }
  if (!defaulted && blockSize % logical !== 0) {
    throw new InvalidArgumentError(
      `${description} has ${logical}-byte sectors but the cache has ${blockSize}-byte blocks; a cache block must be whole sectors (a new cache: --block-size ${logical / 1024}K or more)`,
    );
  }
}

/** Any trigger that writes back without `ulobdev flush`: then detach and a spinning disk flush too. */
function hasAutomaticWriteback(p: WritebackPolicy): boolean {
  return (
    p.flushCron !== undefined ||
    p.dirtyMaxBytes !== undefined ||
    p.dirtyMaxPercent !== undefined ||
    p.maxDirtyAgeMs !== undefined ||
    p.onAc !== undefined
  );
}
