#!/usr/bin/env node
// ulobdev: put a disk behind a flash cache and expose it as DEVICE.
//   ulobdev [-c CACHE] [-b BITMAP] [--writeback] [--block-size N] [--cache-size SIZE|PCT]
//           [--eviction-unit SIZE] [--daemon] [--name NAME]
//           [--flush CRON] [--dirty-max SIZE|PCT] [--max-dirty-age DURATION] [--spindown]
//           [--standby-timeout DURATION] [--on-ac flush|schedule] [--hydrate] [--hydrate-rate RATE]
//           [--allow-remote] DEVICE BACKEND
//   ulobdev status [DEVICE|NAME] [--json]
//   ulobdev detach DEVICE|NAME
//   ulobdev flush DEVICE|NAME [--wait]
//   ulobdev hydrate DEVICE|NAME [--wait] [--rate RATE]
//   ulobdev report DEVICE|NAME --svg FILE [--hours N]
//   ulobdev discard [-c CACHE] [-b BITMAP] [--force] BACKEND
import { VERSION } from './version.js';
import { assertBlockSize } from '../cache/layout.js';
import { existsSync, promises as fsp, readFileSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { Command, CommanderError, InvalidArgumentError as CommanderInvalidArgument, Option } from 'commander';
import { assertCachePathsApart, CacheStore } from '../cache/store.js';
import { Metadata } from '../cache/metadata.js';
import { CacheBusyError, DaemonError, DeviceBusyError, errorToWire, InvalidArgumentError, IOFailedError, NotAttachedError, PermissionDeniedError } from '../errors.js';
import { setIoFlusher } from '../native/process.js';
import { attachFailed, childArgs, daemonize, hasWaitingParent, LOG_LEVELS, logTarget, makeLogger, noteParent, notifyParent, oneLine, reopenLogOnHangup, sayWarnings, warn } from './background.js';
import { exitCodeFor } from './exit-codes.js';
import { openBacking } from '../source/backing.js';
import { controlRequest } from '../daemon/control.js';
import { deadRecords, describeRecovery, recoverDeadDaemon } from '../daemon/leftovers.js';
import type { FlushResult } from '../writeback/flusher.js';
import { cachePaths, checkDaemonName, Daemon, describeFlush, type DetachResult, type DeviceStatus, type WritebackPolicy } from '../daemon/daemon.js';
import { isDaemonName, listDaemons, resolveDaemon, surveyDaemons, type DaemonEntry } from '../daemon/resolve.js';
import { defaultName, DEVICE_FORMS, frontendKind } from '../bdev/frontend.js';
import { CONFIG_DIR, RUN_DIR, STATE_DIR } from '../paths.js';
import { DiskRecords } from '../cache/disk-record.js';
import { formatBytes, parseSize } from '../units.js';
import { blockStack, majorMinor, markStart } from '../sys.js';
import { cronWarning, dirtyLimitBytes, parseCacheSize, parseCron, parseDirtyLimit, parseDuration, parseEvictionUnit, parseRate } from '../writeback/policy.js';
import { renderReportSvg, type ReportData } from '../writeback/report.js';
import type { HydrationProgress } from '../writeback/hydrate.js';
import { progressBar } from './progress.js';


interface AttachFlags {
  cache?: string;
  bitmap?: string;
  metadata?: string;
  writeback?: boolean;
  blockSize?: number;
  cacheSize?: string;
  evictionUnit?: string;
  daemon?: boolean;
  name?: string;
  logLevel: string;
  stateDir?: string;
  runDir?: string;
  flush?: string;
  dirtyMax?: string;
  maxDirtyAge?: string;
  spindown?: boolean;
  standbyTimeout?: string;
  onAc?: string;
  hydrate?: boolean;
  hydrateRate?: string;
  allowRemote?: boolean;
  flushOnDetach?: boolean;
  tickMs?: string;
  sampleMs?: string;
  stopTimeout: string;
  fstab?: string;
}

/**
 * Parses every write-back option before anything is opened or forked: a bad value is one line on
 * stderr, exit 1, nothing changed.
 */
async function writebackPolicy(backing: string, flags: AttachFlags): Promise<WritebackPolicy> {
  const policy: WritebackPolicy = {};
  // An empty --flush (FLUSH= in the unit's config) means no schedule: manual flushes only.
  const flush = flags.flush?.trim() ? flags.flush : undefined;
  if (flush !== undefined) {
    policy.flushCron = parseCron(flush);
    const tooOften = cronWarning(policy.flushCron);
    if (tooOften) warn('ulobdev', tooOften);
  }
  const automatic = flush !== undefined || flags.dirtyMax !== undefined || flags.maxDirtyAge !== undefined || flags.onAc !== undefined;
  if (automatic && !flags.writeback) throw new InvalidArgumentError('--flush, --dirty-max, --max-dirty-age and --on-ac need --writeback');
  if (flags.dirtyMax !== undefined) {
    const limit = parseDirtyLimit(flags.dirtyMax);
    const st = await fsp.stat(backing).catch(() => null);
    // A percentage is of the disk; its size is known once it is opened, so use the file's size or
    // resolve it at start (block devices report 0 here).
    policy.dirtyMaxBytes = 'bytes' in limit ? limit.bytes : st && st.size > 0 ? dirtyLimitBytes(limit, st.size) : undefined;
    if (policy.dirtyMaxBytes === undefined && 'percent' in limit) policy.dirtyMaxPercent = limit.percent;
  }
  if (flags.maxDirtyAge !== undefined) policy.maxDirtyAgeMs = parseDuration(flags.maxDirtyAge, '--max-dirty-age');
  if (flags.standbyTimeout !== undefined) {
    policy.standbyTimeoutSeconds = /^(off|0)$/i.test(flags.standbyTimeout.trim()) ? 0 : parseDuration(flags.standbyTimeout, '--standby-timeout') / 1000;
  }
  if (flags.onAc !== undefined) {
    if (flags.onAc !== 'flush' && flags.onAc !== 'schedule') throw new InvalidArgumentError(`--on-ac takes flush or schedule, not ${JSON.stringify(flags.onAc)}`);
    policy.onAc = flags.onAc;
  }
  // --hydrate-rate implies --hydrate (commander's implies); without a rate it goes as fast as the disk.
  if (flags.hydrate) policy.hydrateRate = flags.hydrateRate === undefined ? 0 : parseRate(flags.hydrateRate);
  policy.spindown = flags.spindown ?? false;
  if (flags.flushOnDetach === false) policy.flushOnDetach = false;
  const st = await fsp.stat(backing).catch(() => null);
  // Power commands go to block devices; for a file they are asked for only if the user wants them
  // (then the daemon says once that they do nothing).
  if (st?.isBlockDevice() || policy.spindown || policy.standbyTimeoutSeconds !== undefined) policy.powerDevice = backing;
  if (flags.tickMs !== undefined) policy.tickMs = Number(flags.tickMs);
  if (flags.sampleMs !== undefined) policy.sampleMs = Number(flags.sampleMs);
  return policy;
}

function blockSizeArg(value: string): number {
  let size: number;
  try {
    size = parseSize(value);
  } catch (err) {
    throw new CommanderInvalidArgument((err as Error).message);
  }
  // Checked here, not when the cache is made, so that the line names the option and the value as
  // typed (newuser14: "got 2097152" for 2M).
  try {
    assertBlockSize(size);
  } catch {
    throw new CommanderInvalidArgument('a block size is a power of two from 4K to 1M (4K, 64K, 1M)');
  }
  return size;
}

/**
 * DEVICE then BACKEND, exactly two. The usual slip is the disk first (`ulobdev /dev/sdb
 * /dev/loop6`) or a value for an option that takes none (`--hydrate 50M`): say which.
 */
function checkPositionals(device: string, backing: string, flags: AttachFlags, command: Command): void {
  const extra = command.args.slice(2);
  if (extra.length > 0) {
    // An unquoted schedule (--flush */30 * * * *): the shell split it and globbed the stars into file names.
    const unquotedCron = typeof flags.flush === 'string' && /^[\d*/,-]+$/.test(flags.flush);
    const hint =
      flags.hydrate && /^\d/.test(device)
        ? `; --hydrate takes no value: the rate is --hydrate-rate ${device}`
        : unquotedCron
          ? `; --flush ${flags.flush} looks like the first field of a cron expression the shell split: quote it, --flush '*/30 * * * *'`
          : '';
    // A glob may have made thousands of them: the first few say enough.
    const got = [device, backing, ...extra];
    const shown = got.length > 6 ? `${got.slice(0, 5).join(' ')} and ${got.length - 5} more` : got.join(' ');
    throw new InvalidArgumentError(`too many arguments: expected DEVICE BACKEND, got ${shown}${hint}`);
  }
  let deviceError: unknown;
  try {
    frontendKind(device);
    // Both name block devices (`ulobdev /dev/loop2 /dev/loop`, the disk first): swapped when
    // BACKEND can only be a device of ours and DEVICE could be a disk.
    if (!onlyADevice(backing) || onlyADevice(device)) return;
  } catch (err) {
    deviceError = err;
  }
  let backingIsDevice = false;
  try {
    frontendKind(backing);
    backingIsDevice = true;
  } catch {
    // not a device name either
  }
  // Swapped only when BACKEND can be nothing but a device of ours, or DEVICE could be a disk:
  // `ulobdev /tmp /dev/loop0` (a directory, /dev/loop0 a bound disk) is a bad DEVICE, not a swap.
  if (backingIsDevice && (onlyADevice(backing) || couldBeDisk(device))) {
    throw new InvalidArgumentError(
      `DEVICE and BACKEND look swapped: the device to create comes first, then the disk to cache: ${swappedCommand(command, device, backing)}`,
    );
  }
  throw deviceError;
}

/** Whether `path` is there as something a disk can be: a block device or a regular file. */
function couldBeDisk(path: string): boolean {
  try {
    const st = statSync(path);
    return st.isBlockDevice() || st.isFile();
  } catch {
    return false;
  }
}

/**
 * Whether `name` can only be a DEVICE to create, never a disk to cache: /dev/loop (the next free
 * one), /dev/uloopN, /dev/ublkbN, an nbd URL, or a /dev/loopN or /dev/nbdN that holds nothing
 * (not there, or 0 bytes in sysfs: a loop device bound to no file, an NBD device not connected).
 * A bound loop device or a connected NBD device can be a disk. Reads sysfs only.
 */
function onlyADevice(name: string): boolean {
  let kind: string;
  try {
    kind = frontendKind(name);
  } catch {
    return false;
  }
  const numbered = /^\/dev\/(loop|nbd)\d+$/.test(name);
  if (!numbered) return true;
  try {
    return Number(readFileSync(`/sys/class/block/${name.slice('/dev/'.length)}/size`, 'utf8').trim()) === 0;
  } catch {
    return kind !== 'loop' || !existsSync(name); // no sysfs entry: nothing there to cache
  }
}

/**
 * The user's command line with DEVICE and BACKEND swapped back, every option kept (quoted for a
 * shell), so it can be pasted as it is: `ulobdev -c CACHE --writeback /dev/loop4 disk.img`.
 */
function swappedCommand(command: Command, device: string, backing: string): string {
  // rawArgs (argv as parsed, node and script first) is public in commander but not in its types.
  const args = ((command.parent as { rawArgs?: string[] } | null)?.rawArgs ?? []).slice(2);
  const b = args.lastIndexOf(backing);
  const d = b > 0 ? args.lastIndexOf(device, b - 1) : -1;
  if (d < 0) return `ulobdev ${backing} ${device}`;
  [args[d], args[b]] = [backing, device];
  const quote = (a: string) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`);
  return ['ulobdev', ...args.map(quote)].join(' ');
}

/**
 * Refuses a disk that another ulobdev daemon already caches (two daemons writing one disk would
 * corrupt it), naming that daemon's device and pid (`refusal` words the line: attach and discard
 * say different things). Block devices are also kept exclusive by O_EXCL, but its EBUSY names no
 * one: a whole disk while one of its partitions is cached, or a partition while its disk is, is
 * refused here naming the daemon (newuser14 F5a). Files are compared by device and inode. A
 * BACKEND that is itself a ulobdev device, or a partition of one, is refused too: a cache of a
 * cache, whose identity (the FUSE file's inode) another device gets later (newuser14 F5b), when
 * `attaching` (discard may still remove a cache made that way before). Throws DeviceBusyError for a
 * disk in use, InvalidArgumentError for a ulobdev device.
 */
async function assertNotServed(
  backing: string,
  runDir: string,
  refusal: (d: DaemonEntry) => string = (d) => `${backing} is already cached by the ulobdev daemon of ${describeDaemon(d)}; detach it first (ulobdev detach ${d.status.device})`,
  attaching = false,
): Promise<void> {
  const mine = await fsp.stat(backing).catch(() => null);
  if (!mine) return;
  // Without root the run directory cannot be read; the attach then stops at its own root check.
  const daemons = await listDaemons(runDir).catch((err: unknown) => {
    if (err instanceof PermissionDeniedError) return [] as DaemonEntry[];
    throw err;
  });
  // The devices BACKEND is built on, itself first (a partition's whole disk; dm/md slaves).
  const below = mine.isBlockDevice() ? await blockStack(majorMinor(mine.rdev)) : new Map<string, string>();
  for (const d of daemons) {
    const theirs = await fsp.stat(d.status.backing).catch(() => null);
    if (theirs) {
      const same = mine.isBlockDevice() ? theirs.isBlockDevice() && theirs.rdev === mine.rdev : theirs.dev === mine.dev && theirs.ino === mine.ino;
      if (same) throw new DeviceBusyError(refusal(d));
      if (mine.isBlockDevice() && theirs.isBlockDevice()) {
        const theirDev = majorMinor(theirs.rdev);
        const detachFirst = `one disk is cached once, whole or by partitions; detach it first (ulobdev detach ${d.status.device})`;
        if (below.has(theirDev)) throw new DeviceBusyError(`${backing} is on ${d.status.backing}, which the ulobdev daemon of ${describeDaemon(d)} caches: ${detachFirst}`);
        if ((await blockStack(theirDev)).has(majorMinor(mine.rdev))) {
          throw new DeviceBusyError(`${backing} holds ${d.status.backing}, which the ulobdev daemon of ${describeDaemon(d)} caches: ${detachFirst}`);
        }
      }
    }
    if (!attaching || !mine.isBlockDevice()) continue;
    const served = await fsp.stat(d.status.device).catch(() => null);
    if (served?.isBlockDevice() && below.has(majorMinor(served.rdev))) {
      const what = served.rdev === mine.rdev ? 'is' : `is a partition of`;
      throw new InvalidArgumentError(`${backing} ${what} the ulobdev device of ${describeDaemon(d)}, a cache of ${d.status.backing}: name the disk itself (${d.status.backing}), not a cached device`);
    }
  }
}

/** A busy cache (its metadata is locked) names the daemon that holds it, when it is one of ours. */
async function explainBusyCache(err: unknown, runDir: string): Promise<unknown> {
  if (!(err instanceof CacheBusyError)) return err;
  const daemons = await listDaemons(runDir).catch(() => [] as DaemonEntry[]);
  const busy = err.path;
  const holder = busy === undefined ? undefined : daemons.find((d) => resolve(d.status.paths.metadata) === busy || resolve(d.status.paths.cache) === busy);
  if (!holder) return err;
  return new CacheBusyError(`the cache ${holder.status.paths.cache} is in use by the ulobdev daemon of ${describeDaemon(holder)}; detach it first (ulobdev detach ${holder.status.device})`);
}

/** The name a device gets without --name, or undefined for a device ulobdev would not make. */
function defaultNameOf(device: string): string | undefined {
  try {
    return defaultName(device);
  } catch {
    return undefined;
  }
}

function describeDaemon(d: DaemonEntry): string {
  const named = d.name === defaultNameOf(d.status.device) ? '' : `, name ${d.name}`;
  return `${d.status.device} (pid ${d.status.pid}${named})`;
}

async function attach(device: string, backing: string, flags: AttachFlags, command: Command): Promise<void> {
  checkPositionals(device, backing, flags, command);
  // An empty path resolves to the working directory ("/ is a directory" under systemd): say what it is.
  // The same for an empty BACKEND (BACKEND= in the .conf: newuser13); an empty DEVICE is already
  // refused as not a DEVICE form.
  if (backing.trim() === '') throw new InvalidArgumentError('BACKEND is empty (BACKEND= in /etc/ulobdev/NAME.conf?): give the disk, such as /dev/disk/by-id/ata-DISK');
  for (const [option, value] of [['-c/--cache', flags.cache], ['-b/--bitmap', flags.bitmap], ['--metadata', flags.metadata]] as const) {
    if (value !== undefined && value.trim() === '') {
      throw new InvalidArgumentError(`${option} is empty (CACHE= in /etc/ulobdev/NAME.conf?): give the file's path, or leave the option out for the default`);
    }
  }
  const runDir = flags.runDir ?? RUN_DIR;
  const policy = await writebackPolicy(backing, flags);
  const stopTimeoutMs = parseDuration(flags.stopTimeout, '--stop-timeout');
  const cacheSize = flags.cacheSize === undefined ? undefined : parseCacheSize(flags.cacheSize);
  const evictionUnit = flags.evictionUnit === undefined ? undefined : parseEvictionUnit(flags.evictionUnit);
  // The very same attach run again (newuser11 finding 7): say it is attached, as mount says "already mounted".
  const cacheGiven = flags.cache === undefined ? undefined : resolve(flags.cache);
  await assertNotServed(resolve(backing), runDir, (d) =>
    cacheGiven !== undefined && resolve(d.status.paths.cache) === cacheGiven
      ? `${backing} is already attached with this cache, as ${describeDaemon(d)}: nothing to do ('ulobdev status ${d.status.device}' shows it; to attach it otherwise, 'ulobdev detach ${d.status.device}' first)`
      : `${backing} is already cached by the ulobdev daemon of ${describeDaemon(d)}; detach it first (ulobdev detach ${d.status.device})`,
    true,
  );
  // The disk given as -c (or -b, --metadata) is refused before anything opens it. Without any of
  // them the cache lives in the state directory, named after the disk's identity.
  if (flags.cache !== undefined || flags.bitmap !== undefined || flags.metadata !== undefined) {
    await assertCachePathsApart(cachePaths(flags, 'unused'), backing);
  }
  if (flags.daemon) return daemonize(device, { name: flags.name, runDir: flags.runDir, args: childArgs(command, [device, backing], ['daemon']) });
  // Cache, metadata and sockets hold the disk's data: owner only.
  process.umask(0o077);
  const target = logTarget();
  const onTerminal = target === 'terminal';
  const logger = makeLogger(flags.logLevel, target);
  reopenLogOnHangup(logger);
  let ioFlusherError: unknown;
  try {
    // Before any threadpool or child starts, so they inherit it (see native/process.cc).
    setIoFlusher();
  } catch (err) {
    ioFlusherError = err;
  }
  let daemon: Daemon;
  try {
    daemon = await Daemon.start({
      device,
      openSource: ({ writable }) => openBacking(backing, { writable }),
      cache: flags.cache,
      bitmap: flags.bitmap,
      metadata: flags.metadata,
      writeback: flags.writeback ?? false,
      blockSize: flags.blockSize,
      cacheSize,
      budgetOption: '--cache-size',
      evictionUnit,
      name: flags.name,
      stateDir: stateDirOf(flags),
      diskRecords: true,
      runDir: flags.runDir,
      logger,
      writebackPolicy: policy,
      allowRemote: flags.allowRemote,
      onNotice: (line) => noteParent(line),
      fstab: flags.fstab,
    });
  } catch (err) {
    throw attachFailed(await explainBusyCache(err, runDir));
  }
  sayWarnings();
  if (ioFlusherError && daemon.status().frontend !== 'serve') {
    const code = (ioFlusherError as { code?: string }).code;
    // PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE: root in a container, or a unit whose
    // CapabilityBoundingSet leaves it out, gets EPERM. Say which capability, so the fix is clear.
    const why = code === 'EPERM' ? 'EPERM: the daemon lacks CAP_SYS_RESOURCE (a container, or a unit that drops it)' : (code ?? String(ioFlusherError));
    logger.warn(`cannot mark the daemon as an I/O flusher (${why}): ${device} may stall under memory pressure`);
  }
  // SIGINT (Ctrl-C) detaches as `ulobdev detach` does: refused while the device is mounted.
  process.on('SIGINT', () => {
    logger.info({ signal: 'SIGINT' }, 'detaching');
    daemon.detach().catch((err: unknown) => logger.error(`cannot detach on SIGINT: ${oneLine(err)}; still serving`));
  });
  // SIGTERM (systemd's stop, shutdown) stops within --stop-timeout whatever happens (Daemon.stop).
  process.once('SIGTERM', () => {
    logger.info({ signal: 'SIGTERM' }, `stopping within ${formatDurationMs(stopTimeoutMs)}`);
    daemon.stop(stopTimeoutMs).catch((err: unknown) => {
      logger.error(`cannot stop cleanly: ${oneLine(err)}; exiting, the next start recovers the cache`);
      process.exit(exitCodeFor(err));
    });
  });
  // The device it serves (/dev/loop asked for the first free one: say which). A --daemon parent
  // prints it itself; the child's stdout is the log.
  if (!hasWaitingParent()) process.stdout.write(`${daemon.device}\n`);
  notifyParent(`READY ${daemon.device}`);
  if (onTerminal) {
    const use = daemon.status().frontend === 'serve' ? `connect to ${daemon.device}` : `mount ${daemon.device}`;
    process.stderr.write(`${use} from another shell; Ctrl-C detaches\n`);
  }
  await daemon.done;
}

/**
 * When no daemon answers for DEVICE: lets go of what a dead one left (src/daemon/leftovers.ts) and
 * returns the line saying so, or null (nothing was left, or the daemon lives and is slow).
 */
async function recoverIfDead(device: string, runDir: string, err: unknown): Promise<string | null> {
  if (!(err instanceof NotAttachedError) && !(err instanceof DaemonError)) return null;
  // A name goes into RUN_DIR paths: only a checked one (isDaemonName's, or a device's default).
  const name = isDaemonName(device) ? device : defaultNameOf(device);
  if (name === undefined) return null;
  const recovery = await recoverDeadDaemon(runDir, device, name);
  return recovery && describeRecovery(recovery);
}

async function status(device: string | undefined, flags: { json?: boolean; runDir?: string }): Promise<void> {
  const runDir = flags.runDir ?? RUN_DIR;
  let statuses: DeviceStatus[];
  // Devices shown as marked lines, not as a status (all devices only): a dead daemon whose
  // leftovers could not be let go, a daemon that listens but does not answer. Each error is one
  // line on stderr; the exit code is the last one's.
  const troubles: { mark: string; error: unknown }[] = [];
  if (device) {
    try {
      const { socket } = await resolveDaemon(device, runDir);
      statuses = [(await controlRequest(socket, { cmd: 'status' }, 10_000)).status as DeviceStatus];
    } catch (err) {
      const recovered = await recoverIfDead(device, runDir, err);
      const error = recovered ? new NotAttachedError(`${device} is not attached: ${recovered}; run the attach command again`) : err;
      // --json answers in JSON even when there is no status: the error as { error: { code, message } } (newuser9).
      if (flags.json) process.stdout.write(JSON.stringify({ error: errorToWire(error) }, null, 2) + '\n');
      throw error;
    }
  } else {
    // Daemons that died: their leftovers are let go first, and said so. One that cannot be let go
    // (a filesystem still mounted on it) is marked, and the others are listed all the same.
    for (const dead of await deadRecords(runDir)) {
      try {
        const recovery = await recoverDeadDaemon(runDir, dead.device, dead.name);
        if (recovery) process.stderr.write(`ulobdev: ${dead.device}: ${describeRecovery(recovery)}\n`);
      } catch (err) {
        const named = dead.name !== defaultNameOf(dead.device) ? ` "${dead.name}"` : '';
        troubles.push({ mark: `${dead.device}${named}: DEAD (its daemon, pid ${dead.pid}, died; see the error below)`, error: err });
      }
    }
    const survey = await surveyDaemons(runDir);
    statuses = survey.entries.map((d) => d.status);
    for (const f of survey.failures) troubles.push({ mark: `${f.name}: NOT ANSWERING (control socket ${f.socket}; see the error below)`, error: f.error });
  }
  if (flags.json) {
    process.stdout.write(JSON.stringify(device ? statuses[0] : statuses, null, 2) + '\n');
  } else if (statuses.length === 0 && troubles.length === 0) {
    process.stdout.write('no ulobdev devices attached\n');
  } else {
    for (const s of statuses) process.stdout.write(formatStatus(s));
    for (const t of troubles) process.stdout.write(`${t.mark}\n`);
  }
  const last = troubles.pop();
  for (const t of troubles) process.stderr.write(`ulobdev: ${oneLine(t.error)}\n`);
  if (last) throw last.error;
}

/**
 * What detach does with dirty data, worded so the default (no schedule or limit: detach does not
 * flush) does not read as if --no-flush-on-detach had been given.
 */
function detachPolicy(p: NonNullable<DeviceStatus['policy']>): string {
  if (p.flushOnDetach) return 'flush on detach';
  const automatic = p.flushCron !== null || p.dirtyMaxBytes !== null || p.maxDirtyAgeSeconds !== null || p.onAc !== null;
  return automatic ? 'no flush on detach' : 'detach does not flush (the default without a schedule or limit)';
}

function when(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return 'never';
  const d = new Date(ms);
  const rel = Math.round((ms - Date.now()) / 1000);
  const ago = rel <= 0 ? `${formatDuration(-rel)} ago` : `in ${formatDuration(rel)}`;
  return `${d.toLocaleString('sv-SE')} (${ago})`;
}

function formatDurationMs(ms: number): string {
  return formatDuration(Math.round(ms / 1000));
}

function formatDuration(seconds: number): string {
  if (seconds < 90) return `${seconds} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

/**
 * The dirty part of status's second line. Zeroed blocks (TRIM, discard, WRITE_ZEROES) are dirty
 * but hold no data in the cache: shown apart, so that the dirty data is part of what is cached.
 */
function formatDirty(s: Pick<DeviceStatus, 'dirtyBytes' | 'zeroBytes'>): string {
  if (s.zeroBytes <= 0) return `dirty ${formatBytes(s.dirtyBytes)}`;
  const data = Math.max(0, s.dirtyBytes - s.zeroBytes);
  return `dirty ${data > 0 ? `${formatBytes(data)} + ` : ''}${formatBytes(s.zeroBytes)} zeroed (discarded ranges: they read as zeros, take no flash, and the next flush writes zeros to the disk)`;
}

/** `ulobdev status` without --json: a device's status (Daemon.status()) as lines of text, each ending in a newline. */
export function formatStatus(s: DeviceStatus): string {
  const named = s.name && s.name !== defaultNameOf(s.device) ? ` "${s.name}"` : '';
  // An image on an HTTP server (ulohttp) is no disk: it never takes writes, has no platters.
  const http = typeof s.source?.url === 'string';
  const lines = [
    `${s.device}${named}: ${s.mode} cache of ${s.backing} (${s.frontend} frontend, daemon pid ${s.pid})`,
    `  size ${formatBytes(s.size)}, block ${formatBytes(s.blockSize)}, cached ${formatBytes(s.cachedBytes)} (${s.cacheFillPercent}%)${http && s.dirtyBytes === 0 ? '' : `, ${formatDirty(s)}`}`,
    `  flush epoch ${s.flushEpoch}, up ${s.uptimeSeconds} s, cache ${s.paths.cache}`,
    s.budgetBytes === null
      ? `  flash: a full mirror of the ${http ? 'image' : 'disk'}, ${formatBytes(s.allocatedBytes)} held; bitmap and metadata ${formatBytes(s.overheadBytes)} more`
      : `  flash: budget ${formatBytes(s.budgetBytes)}, used ${formatBytes(s.usedBytes)} (${formatBytes(s.allocatedBytes)} held), evicted ${formatBytes(s.evictedBytes)} since attach, unit ${formatBytes(s.evictionUnit)}; bitmap and metadata ${formatBytes(s.overheadBytes)} more`,
    `  reads: ${s.hitRatio === null ? 'none yet' : `hit ratio ${(s.hitRatio * 100).toFixed(1)}% (${s.readHits} hits, ${s.readMisses} misses)`}`,
  ];
  if (s.spaceError) lines.push(`  room: ${s.spaceError}`);
  const r = s.flashReserve;
  if (r && (r.heldBytes < r.bytes || r.releases > 0 || s.roomWaiters > 0 || s.failedRequests > 0)) {
    const held = r.heldBytes >= r.bytes ? `${formatBytes(r.bytes)} held` : r.heldBytes === 0 ? `${formatBytes(r.bytes)} RELEASED (in use by a flush, or no room to take it back)` : `${formatBytes(r.heldBytes)} of ${formatBytes(r.bytes)} held`;
    lines.push(
      `  flash reserve: ${held}; released ${r.releases}x, ${s.roomFlushes} flushes for room since attach; ${s.roomWaiters} requests waiting for room, ${s.failedRequests} failed for want of room`,
    );
  } else if (s.failedRequests > 0 || s.roomWaiters > 0) {
    lines.push(`  requests: ${s.roomWaiters} waiting for room, ${s.failedRequests} failed for want of room since attach`);
  }
  if (s.disk) {
    const d = s.disk;
    const last = d.lastError ? `; last error ${when(d.lastErrorAt)}: ${d.lastError}` : '';
    const state = d.state === 'ok' ? 'ok' : d.state === 'stuck' ? `NOT ANSWERING (an I/O has waited ${formatDuration(d.waitingSeconds ?? 0)})` : d.state.toUpperCase();
    lines.push(`  ${http ? 'HTTP server' : 'backing disk'} ${state}${last}`);
  }
  const w = s.writeback;
  if (w) {
    lines.push(
      `  at risk ${formatBytes(s.bytesAtRisk)}, oldest dirty ${s.oldestDirtyAgeSeconds === null ? '-' : formatDuration(s.oldestDirtyAgeSeconds)}, schedule ${w.schedule ?? 'manual only'}`,
      `  last flush ${when(w.lastFlushAt)}${w.lastFlushBytes !== null ? ` (${formatBytes(w.lastFlushBytes)})` : ''}${w.lastEmptyFlushAt ? `, a later one ${when(w.lastEmptyFlushAt)} found nothing dirty` : ''}, next ${w.nextFlushAt === null ? '-' : when(w.nextFlushAt)}`,
      `  disk ${w.powerState}${w.powerControl ? ` (via ${w.powerControl}${w.powerQueryWakes ? '; not polled: it spins up to answer CHECK POWER MODE' : ''})` : ''}, spin-ups today ${w.spinUpsToday}, by a miss since attach ${w.missSpinUps}`,
    );
    if (w.powerControlOff && (s.policy?.spindown || s.policy?.standbyTimeoutSeconds != null)) {
      lines.push(`  disk power control OFF: ${w.powerControlOff}; --spindown and --standby-timeout do nothing here`);
    }
    if (w.flushing && w.progress) lines.push(`  flushing (${w.reason}): ${formatBytes(w.progress.doneBytes)} of ${formatBytes(w.progress.totalBytes)}`);
    if (w.lastError) lines.push(`  last flush FAILED (${w.failures}x): ${w.lastError}; retry ${when(w.retryAt)}`);
    // newuser12: a flush cut by a crash showed nowhere but in `report`.
    if (w.cutFlush && !w.flushing) {
      lines.push(`  flush of epoch ${w.cutFlush.epoch} (${when(w.cutFlush.startedAt)}) did not complete (${w.cutFlush.error}): the disk is not a consistent image until a flush completes`);
    }
  }
  if (s.kernel) {
    const k = s.kernel;
    lines.push(
      `  kernel: ${k.attach}, ${k.waiting} requests waiting, ${k.pendingBlocks} blocks pending for the next FLUSH, hits ${k.readHits + k.writeHits}, upcalls ${k.readMisses + k.writeUpcalls} (${k.failedUpcalls} failed)`,
    );
    if (k.error) lines.push(`  cache file sync FAILED (${k.error}): writes and FLUSH fail until it syncs again`);
  }
  const p = s.policy;
  if (p) {
    const set = [
      p.flushCron !== null ? `flush '${p.flushCron}'` : null,
      p.dirtyMaxBytes !== null ? `dirty-max ${formatBytes(p.dirtyMaxBytes)}` : null,
      p.maxDirtyAgeSeconds !== null ? `max-dirty-age ${formatDuration(p.maxDirtyAgeSeconds)}` : null,
      p.onAc !== null ? `on-ac ${p.onAc}` : null,
      p.spindown ? 'spindown' : null,
      p.standbyTimeoutSeconds !== null ? `standby-timeout ${p.standbyTimeoutSeconds === 0 ? 'off' : formatDuration(p.standbyTimeoutSeconds)}` : null,
      p.hydrateRate !== null ? `hydrate ${p.hydrateRate === 0 ? 'unlimited' : `${formatBytes(p.hydrateRate)}/s`}` : null,
      s.writeback ? detachPolicy(p) : null,
    ].filter(Boolean);
    lines.push(`  policy: ${set.length > 0 ? set.join(', ') : 'none (manual flushes only)'}`);
  }
  if (s.hydration) lines.push(`  hydration ${s.hydration.percent}%${s.hydration.done ? ' (done)' : s.hydration.running ? ' (running)' : ''}${s.hydration.lastError ? `, error: ${s.hydration.lastError}` : ''}`);
  lines.push('');
  return lines.join('\n');
}

async function detach(device: string, flags: { runDir?: string }): Promise<void> {
  const runDir = flags.runDir ?? RUN_DIR;
  let r: { detach?: DetachResult };
  try {
    const { socket } = await resolveDaemon(device, runDir);
    // Long enough for the flush a detach runs first.
    r = (await controlRequest(socket, { cmd: 'detach' }, 24 * 3600_000)) as { detach?: DetachResult };
  } catch (err) {
    const recovered = await recoverIfDead(device, runDir, err);
    if (!recovered) throw err;
    process.stdout.write(`${device}: ${recovered}\n${device} detached\n`);
    return;
  }
  process.stdout.write(r.detach ? `${r.detach.device} detached: ${describeFlush(r.detach)}\n` : `${device} detached\n`);
}

async function flush(device: string, flags: { runDir?: string; json?: boolean; wait?: boolean }): Promise<void> {
  const { socket } = await resolveDaemon(device, flags.runDir ?? RUN_DIR);
  if (!flags.wait) {
    const r = (await controlRequest(socket, { cmd: 'flush', wait: false })) as { started: boolean; dirtyBytes: number };
    if (flags.json) process.stdout.write(JSON.stringify(r) + '\n');
    else process.stdout.write(r.started ? `${device}: flushing ${formatBytes(r.dirtyBytes)} in the background (ulobdev flush --wait to wait)\n` : `${device}: nothing dirty to flush\n`);
    return;
  }
  // Progress from status polls while the flush runs, on a TTY only.
  const bar = flags.json
    ? null
    : progressBar('flushing', async () => {
        const p = ((await controlRequest(socket, { cmd: 'status' }, 5000)).status as DeviceStatus).writeback?.progress;
        return p ? { done: p.doneBytes, total: p.totalBytes } : null;
      });
  let result: FlushResult;
  try {
    ({ flush: result } = (await controlRequest(socket, { cmd: 'flush', wait: true }, 24 * 3600_000)) as { flush: FlushResult });
  } finally {
    bar?.stop();
  }
  if (flags.json) process.stdout.write(JSON.stringify(result) + '\n');
  else if (result.blocks === 0) process.stdout.write(`${device}: nothing dirty to flush\n`);
  else process.stdout.write(`${device}: wrote ${formatBytes(result.bytes)} back (${result.cleaned} blocks clean, ${result.kept} rewritten meanwhile and still dirty)\n`);
}

/**
 * Starts hydration (copying the whole disk into the cache) if it is not running or done; with
 * --wait, waits until the disk is in the cache, with a progress bar on a terminal.
 */
async function hydrate(device: string, flags: { runDir?: string; wait?: boolean; rate?: string; json?: boolean }): Promise<void> {
  const { socket } = await resolveDaemon(device, flags.runDir ?? RUN_DIR);
  const rate = flags.rate === undefined ? 0 : parseRate(flags.rate, '--rate');
  let { hydration: h } = (await controlRequest(socket, { cmd: 'hydrate', rate })) as { hydration: HydrationProgress };
  if (flags.wait && !h.done) {
    const bar = flags.json ? null : progressBar('hydrating', async () => ({ done: h.presentBytes, total: h.size }), 500);
    try {
      while (!h.done) {
        await new Promise((r) => setTimeout(r, 500));
        const st = ((await controlRequest(socket, { cmd: 'status' }, 10_000)).status as DeviceStatus).hydration;
        if (!st) throw new NotAttachedError(`${device} stopped hydrating`);
        h = st;
        if (!h.running && !h.done && h.lastError) throw new IOFailedError(`hydration of ${device} stopped: ${h.lastError}`);
      }
    } finally {
      bar?.stop();
    }
  }
  if (flags.json) process.stdout.write(JSON.stringify(h) + '\n');
  else if (h.done) process.stdout.write(`${device}: the whole disk is in the cache (${formatBytes(h.size)}); reads no longer reach it\n`);
  else process.stdout.write(`${device}: hydrating, ${h.percent}% cached (${formatBytes(h.presentBytes)} of ${formatBytes(h.size)}); ulobdev hydrate --wait ${device} to wait\n`);
}

interface ReportFlags {
  runDir?: string;
  svg?: string;
  hours?: string;
  json?: boolean;
  cache?: string;
}

async function report(device: string, flags: ReportFlags): Promise<void> {
  const hours = flags.hours === undefined ? 24 : Number(flags.hours);
  if (!(hours > 0)) throw new InvalidArgumentError(`--hours must be a positive number, not ${JSON.stringify(flags.hours)}`);
  if (!flags.svg && !flags.json) throw new InvalidArgumentError('report needs --svg FILE or --json');
  // A directory that is not there is a typo, said in one line before anything is read (newuser9
  // finding 2: a raw ENOENT and exit 74, "an I/O error stopped work").
  if (flags.svg) {
    const dir = dirname(resolve(flags.svg));
    if (!(await fsp.stat(dir).catch(() => undefined))?.isDirectory()) {
      throw new InvalidArgumentError(`--svg ${flags.svg}: the directory ${dir} does not exist; create it or pick another`);
    }
    if ((await fsp.stat(flags.svg).catch(() => undefined))?.isDirectory()) {
      throw new InvalidArgumentError(`--svg ${flags.svg} is a directory; give a file name in it, e.g. ${join(flags.svg, `${device}.svg`)}`);
    }
  }
  const since = Date.now() - hours * 3600_000;
  let data: ReportData;
  try {
    const { socket } = await resolveDaemon(device, flags.runDir ?? RUN_DIR);
    ({ report: data } = (await controlRequest(socket, { cmd: 'report', since })) as { report: ReportData });
  } catch (err) {
    // Not attached: the history is in the cache's metadata (given, or from /etc/ulobdev/NAME.conf).
    if (!(err instanceof NotAttachedError)) throw err;
    const cache = flags.cache ?? (await cacheFromConfig(device));
    if (!cache) throw new NotAttachedError(`${oneLine(err)}; to read its history from the cache, add --cache CACHE`);
    data = historyFromCache(cache, since);
  }
  if (flags.svg) {
    // A file that cannot be made there (/proc, a read-only mount, no permission): one line, exit 1.
    const svg = renderReportSvg(data, { title: `${device}: dirty data, flushes and spin-ups` });
    await fsp.writeFile(flags.svg, svg).catch((err: unknown) => {
      throw new InvalidArgumentError(`--svg ${flags.svg}: cannot write it (${(err as { code?: string }).code ?? oneLine(err)}); pick a file you can write`);
    });
    process.stdout.write(`${flags.svg}: ${data.samples.length} samples, ${data.flushes.length} flushes, ${data.events.filter((e) => e.kind.startsWith('spinup')).length} spin-ups over ${hours} h\n`);
  }
  if (flags.json) process.stdout.write(JSON.stringify(data) + '\n');
}

/**
 * The state directory: --state-dir, else $ULOBDEV_STATE_DIR, else /var/lib/ulobdev. Both overrides
 * are for tests (each keeps its default caches and disk records in its own scratch directory).
 */
function stateDirOf(flags: { stateDir?: string }): string {
  return flags.stateDir ?? (process.env.ULOBDEV_STATE_DIR || STATE_DIR);
}

/** CACHE= of /etc/ulobdev/NAME.conf (ulobdev@NAME.service's settings), if there is one. */
async function cacheFromConfig(name: string): Promise<string | undefined> {
  if (!/^[A-Za-z0-9._-]+$/.test(name)) return undefined;
  const text = await fsp.readFile(join(CONFIG_DIR, `${name}.conf`), 'utf8').catch(() => '');
  return /^CACHE=(.+)$/m.exec(text)?.[1]?.trim() || undefined;
}

/** The history in a detached cache's metadata (CACHE.meta), read as `report` answers it. */
function historyFromCache(cache: string, since: number): ReportData {
  // A wrong path is bad input (exit 1), not an I/O error of a cache.
  if (!existsSync(`${cache}.meta`)) throw new InvalidArgumentError(`no cache at ${cache} (no ${cache}.meta); give the -c path the device was attached with`);
  const meta = Metadata.open(`${cache}.meta`);
  try {
    return {
      since,
      now: Date.now(),
      size: meta.info.backingSize,
      flushes: meta.flushes(since),
      samples: meta.dirtySamples(since),
      events: meta.events(since),
      nextFlushAt: null,
    };
  } finally {
    meta.close();
  }
}

async function discard(backing: string, flags: { cache?: string; bitmap?: string; metadata?: string; force?: boolean; stateDir?: string; runDir?: string }): Promise<void> {
  const runDir = flags.runDir ?? RUN_DIR;
  // A disk a daemon caches is held open by it (O_EXCL): say which daemon, not "in use".
  await assertNotServed(resolve(backing), runDir, (d) =>
    `${backing} is attached as ${describeDaemon(d)} with the cache ${d.status.paths.cache}; detach it first (ulobdev detach ${d.status.device}), then discard`,
  );
  const source = await openBacking(backing, { writable: false });
  const paths = cachePaths({ ...flags, stateDir: stateDirOf(flags) }, source.id);
  await source.close();
  const records = new DiskRecords(stateDirOf(flags));
  const { dirtyBlocks, bitmap, keptBitmap, forgotten } = await CacheStore.discard(paths, { force: flags.force, backing, backingId: source.id, records }).catch(
    async (err: unknown) => {
      throw await explainBusyCache(err, runDir);
    },
  );
  if (forgotten) {
    process.stdout.write(`${paths.cache} is not there: the disk's record no longer names it (any dirty data it held is lost); the next attach makes a new cache\n`);
    return;
  }
  process.stdout.write(
    `removed the cache ${paths.cache}${bitmap ? ` and its bitmap ${bitmap}` : ''}${dirtyBlocks ? ` and ${dirtyBlocks} dirty blocks` : ''}; the next attach re-creates it${keptBitmap ? `; ${keptBitmap}` : ''}\n`,
  );
}

/**
 * commander's errors as one line, like every other refusal: `NAME: WHAT`, with its "(Did you
 * mean --writeback?)" for a misspelt option or command kept on that line, and for a missing
 * argument `(usage: USAGE)` when `usage` is given. `name` defaults to the program's.
 */
export function oneLineErrors(program: Command, usage?: string, name = program.name()): Command {
  return program.configureOutput({
    outputError: (text, write) => {
      const [what, ...more] = text.replace(/^error: /, '').trim().split('\n');
      let suggestion = more.map((l) => l.trim()).find((l) => l.startsWith('(Did you mean'));
      // A long option with one dash (-writeback): commander sees short flags and suggests nothing.
      const oneDash = /^unknown option '-([a-z][a-z-]+)'/.exec(what ?? '');
      if (!suggestion && oneDash && program.options.some((o) => o.long === `--${oneDash[1]}`)) suggestion = `(Did you mean --${oneDash[1]}?)`;
      // A missing argument: the command's usage, on the same line.
      const hint = usage && what?.startsWith('missing required argument') ? ` (usage: ${usage})` : '';
      write(`${name}: ${what}${hint}${suggestion ? ` ${suggestion}` : ''}\n`);
    },
  });
}

/**
 * Each command's usage errors name the command's usage ("missing required argument 'BACKEND'
 * (usage: ulobdev [options] DEVICE BACKEND, ...)"); the attach form with an example.
 */
function usageHints(program: Command): void {
  for (const c of program.commands) {
    const isAttach = c.name() === 'attach';
    const usage = `${program.name()} ${isAttach ? '' : `${c.name()} `}${c.usage()}${isAttach ? `, e.g. 'ulobdev --writeback /dev/loop6 /dev/sdb'` : ''}; '${program.name()} ${c.name()} --help' says more`;
    oneLineErrors(c, usage, program.name());
  }
}

/**
 * Threads of libuv's pool in a ulobdev process unless $UV_THREADPOOL_SIZE says otherwise: the
 * flusher's copies (4) and the misses in flight to a disk that stops answering may each hold one,
 * and the cache's own reads and writes (hits, fills, status) must still find one free.
 */
const THREADPOOL_SIZE = 16;

const EXAMPLES = `
Examples:
  ulobdev --writeback --flush '*/30 * * * *' /dev/loop6 /dev/sdb
      cache the disk /dev/sdb as /dev/loop6; writes land on flash and go to the disk every 30 minutes
  ulobdev --daemon --writeback --flush '0 3 * * *' --spindown --name data /dev/loop6 /dev/sdb
      the same in the background, flushing at 03:00 and spinning the disk down after each flush
  ulobdev status                 every attached device, its cache, dirty data and policy
  ulobdev flush --wait /dev/loop6
  ulobdev detach data            by device or by --name

'ulobdev attach --help' lists every DEVICE form and every option of the attach form.`;

/** The ulobdev command line: attach (the default command), status, detach, flush, report, discard. */
export function buildProgram(): Command {
  const program = oneLineErrors(new Command('ulobdev'))
    .description('a write-back flash cache for spinning disks')
    .usage('[attach] [options] DEVICE BACKEND | <command> [options] [DEVICE|NAME]')
    .version(VERSION)
    .addHelpText('after', EXAMPLES)
    .exitOverride();

  program
    .command('attach', { isDefault: true })
    .description('put BACKEND behind the cache and expose it as DEVICE')
    .usage('[options] DEVICE BACKEND')
    .argument('<DEVICE>', DEVICE_FORMS)
    .argument('<BACKEND>', 'the disk behind the cache: a block device or a file')
    .allowExcessArguments()
    .option('-c, --cache <PATH>', 'cache file, in a directory that exists (default: /var/lib/ulobdev/<disk id>.cache)')
    .option('-b, --bitmap <PATH>', 'present bitmap file (default: next to the cache)')
    .option('--metadata <PATH>', 'metadata database (default: CACHE.meta)')
    .option('--writeback', 'accept writes: they land on flash, marked dirty (default: read-only)')
    .option('--block-size <N>', 'cache block size for a new cache, 4K to 1M', blockSizeArg)
    .option('--cache-size <SIZE|PCT>', 'flash the cache may take (256M, 500G, 25% of the disk); more than the disk is the whole disk; default: a full mirror of the disk')
    .option('--eviction-unit <SIZE>', 'for a new cache with --cache-size: what is filled and evicted at once, 64K to 1M (default 256K)')
    .option('--daemon', 'return once DEVICE is ready and keep serving in the background')
    .option('--name <NAME>', 'name for status, flush and detach, and of the control socket (default: from DEVICE)', nameArg)
    .addOption(new Option('--log-level <LEVEL>', 'how much the log says').choices(LOG_LEVELS).default('info'))
    .option('--flush <CRON>', "write dirty blocks back on this cron schedule: 5 fields, minute hour day-of-month month day-of-week, e.g. '*/30 * * * *' ('' for none: manual flushes only; 6 fields take seconds first)")
    .option('--dirty-max <SIZE|PCT>', 'flush at once when dirty data exceeds this: a size with its unit (512M, 2G) or a share of the disk (10%)')
    .option('--max-dirty-age <DURATION>', 'flush once the oldest unflushed write is this old (30m, 2h)')
    .option('--spindown', 'put the disk in standby (STANDBY IMMEDIATE) after each flush; after a flush made while a cache miss had woken it, once no miss has reached it for 10 minutes')
    .option('--standby-timeout <DURATION>', "set the disk's own standby timer like hdparm -S (10m, off)")
    .option('--on-ac <POLICY>', "on mains power: 'flush' as soon as the device is quiet, or keep the 'schedule'")
    .option('--hydrate', 'copy the whole disk into the cache in the background (refused with a --cache-size smaller than the disk)')
    .addOption(new Option('--hydrate-rate <RATE>', 'at most RATE per second, e.g. 50M, 0 for no limit (implies --hydrate; default: as fast as the disk goes)').implies({ hydrate: true }))
    .option('--allow-remote', 'let an nbd://HOST:PORT DEVICE listen on an address other machines reach (no authentication, no encryption)')
    .option('--no-flush-on-detach', 'do not flush before detach and shutdown (default: flush when a schedule or limit is set)')
    .option('--stop-timeout <DURATION>', 'on SIGTERM (systemd stop, shutdown): wait for an unmount, flush and exit within this time', '2m')
    .addOption(hidden('--state-dir <DIR>'))
    .addOption(hidden('--run-dir <DIR>'))
    .addOption(hidden('--tick-ms <MS>'))
    .addOption(hidden('--sample-ms <MS>'))
    .addOption(hidden('--fstab <PATH>'))
    .action((device: string, backing: string, flags: AttachFlags, command: Command) => attach(device, backing, flags, command));

  program
    .command('status')
    .description('show attached devices: cache, dirty data, flushes, the disk and every policy setting')
    .argument('[DEVICE|NAME]', 'one device, by device or by --name (default: all)')
    .option('--json', 'machine-readable output')
    .addOption(hidden('--run-dir <DIR>'))
    .action((device: string | undefined, flags: { json?: boolean; runDir?: string }) => status(device, flags));

  program
    .command('detach')
    .description('stop serving DEVICE, persist the cache and exit its daemon')
    .argument('<DEVICE|NAME>', 'the device or the --name given at attach')
    .addOption(hidden('--run-dir <DIR>'))
    .action((device: string, flags: { runDir?: string }) => detach(device, flags));

  program
    .command('flush')
    .description('write the dirty blocks of DEVICE back to its disk now')
    .argument('<DEVICE|NAME>', 'the device or the --name given at attach')
    .option('--wait', 'wait until the flush is done (progress bar on a terminal)')
    .option('--json', 'machine-readable output')
    .addOption(hidden('--run-dir <DIR>'))
    .action((device: string, flags: { runDir?: string; json?: boolean; wait?: boolean }) => flush(device, flags));

  program
    .command('hydrate')
    .description('copy the whole disk of DEVICE into the cache in the background, so that no read wakes it')
    .argument('<DEVICE|NAME>', 'the device or the --name given at attach')
    .option('--wait', 'wait until the whole disk is cached (progress bar on a terminal)')
    .option('--rate <RATE>', 'at most RATE per second, e.g. 50M; 0 or none: as fast as user I/O allows')
    .option('--json', 'machine-readable output')
    .addOption(hidden('--run-dir <DIR>'))
    .action((device: string, flags: { runDir?: string; wait?: boolean; rate?: string; json?: boolean }) => hydrate(device, flags));

  program
    .command('report')
    .description('draw dirty data over time, flush windows and spin-ups of DEVICE')
    .argument('<DEVICE|NAME>', 'the device or the --name given at attach')
    .option('--svg <FILE>', 'write an SVG chart to FILE')
    .option('--hours <N>', 'how far back (default 24)')
    .option('--json', 'print the history as JSON')
    .option('-c, --cache <PATH>', 'when DEVICE is not attached: read the history from this cache (default: CACHE of /etc/ulobdev/DEVICE.conf)')
    .addOption(hidden('--run-dir <DIR>'))
    .action((device: string, flags: ReportFlags) => report(device, flags));

  program
    .command('discard')
    .description("remove BACKEND's cache so the next attach re-creates it (refused while dirty)")
    .argument('<BACKEND>', 'the disk whose cache to remove')
    .option('-c, --cache <PATH>', 'cache file')
    .option('-b, --bitmap <PATH>', 'bitmap file')
    .option('--metadata <PATH>', 'metadata database')
    .option('--force', 'also when dirty blocks would be lost')
    .addOption(hidden('--state-dir <DIR>'))
    .addOption(hidden('--run-dir <DIR>'))
    .action((backing: string, flags: { cache?: string; bitmap?: string; metadata?: string; force?: boolean; runDir?: string }) =>
      discard(backing, flags),
    );
  usageHints(program);
  return program;
}

/** --name: checked as the user types it, before anything is started (checkDaemonName). */
export function nameArg(value: string): string {
  try {
    return checkDaemonName(value);
  } catch (err) {
    throw new CommanderInvalidArgument((err as Error).message.replace(/^--name \S+: /, ''));
  }
}

function hidden(flags: string) {
  return new Command().createOption(flags).hideHelp();
}

/**
 * A first word that is no command, no option and no path (`ulobdev statsu`) would be taken as the
 * DEVICE of an attach and refused for a missing BACKEND. When commander finds a command close to
 * it, returns its own one line for it, "unknown command 'statsu' (Did you mean status?)"; else null
 * (the attach form then says what is wrong with its arguments).
 */
export function mistypedCommand(program: Command, args: string[]): string | null {
  const word = args[0];
  if (word === undefined || !/^[A-Za-z][\w-]*$/.test(word)) return null;
  if (program.commands.some((c) => c.name() === word || c.aliases().includes(word))) return null;
  // A program without a default command, with the same command names: commander's unknown-command
  // error and its suggestion (the one misspelt options get), captured instead of printed.
  const probe = new Command(program.name()).exitOverride();
  let said: string | null = null;
  oneLineErrors(probe).configureOutput({ writeErr: (text) => void (said = text.trim()), writeOut: () => undefined });
  for (const c of program.commands) probe.command(c.name());
  try {
    probe.parse([word], { from: 'user' });
  } catch {
    // the unknown command: `said` has its line
  }
  const line = said as string | null;
  return line !== null && line.includes('(Did you mean') ? line : null;
}

export async function main(argv: string[]): Promise<number> {
  markStart('loaded');
  try {
    const program = buildProgram();
    const typo = mistypedCommand(program, argv.slice(2));
    if (typo) {
      process.stderr.write(`${typo}\n`);
      return exitCodeFor(new InvalidArgumentError(typo));
    }
    await program.parseAsync(argv);
    return 0;
  } catch (err) {
    // Commander has printed its own usage error (one line, oneLineErrors) already.
    if (!(err instanceof CommanderError)) process.stderr.write(`ulobdev: ${oneLine(err)}\n`);
    // A --daemon child that failed before it could start (no-op once it has reported): the
    // parent shows this as the refusal it is, not as a daemon that died.
    if (hasWaitingParent()) attachFailed(err instanceof CommanderError ? new InvalidArgumentError(err.message.replace(/^error: /, '')) : err);
    return exitCodeFor(err);
  }
}

// libuv's threadpool (default 4 threads) serves the cache's file I/O and the backing disk's alike:
// with 4, a hung disk held every thread with the flusher's 4 copies (FlushOptions.depth) and hits
// and status waited behind them (invariant 8). Read once, when the pool starts: set here, before
// the first fs call of this process (the realpath below); a daemon child inherits it.
process.env.UV_THREADPOOL_SIZE ??= String(THREADPOOL_SIZE);
const isEntry = process.argv[1] && import.meta.url === new URL(`file://${await fsp.realpath(process.argv[1]).catch(() => process.argv[1])}`).href;
if (isEntry) process.exitCode = await main(process.argv);
