// /dev/ublkbN: the kernel's in-tree ublk driver (ublk_drv, Linux 6.0+; no module of ours, so it
// also works under Secure Boot) with the server in the addon (native/ublk.cc): one thread per hardware
// queue, each on its own io_uring, serves hits straight from the cache file (reads of present blocks, writes into dirty
// blocks, FLUSH as an fdatasync of the cache file) and sends the rest here as upcalls, which
// UpcallHandler runs exactly as for /dev/uloopN: a MISS fills blocks, an INTENT makes blocks
// durably dirty before the thread overwrites them (or, for blocks written whole while missing,
// after it wrote them and before the write is acknowledged), a PRESERVE keeps a flush epoch's
// version. Every first write is recorded dirty before its acknowledgement, so a FLUSH needs no
// barrier: the cache file's fdatasync makes every acknowledged write durable (invariant 3).
// Added with UBLK_F_USER_RECOVERY when the kernel has it: after kill -9 the device and its queued
// I/O wait, and the same command takes it back (START/END_USER_RECOVERY).
import { existsSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { availableParallelism, constants as osConstants, release } from 'node:os';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { CacheEngine } from '../cache/engine.js';
import { DeviceBusyError, InternalError, InvalidArgumentError, ModuleMissingError } from '../errors.js';
import type { SectorSize } from '../source/source.js';
import * as native from '../native/ublk.js';
import type { Frontend } from './frontend.js';
import { modprobe, mountsOfSource, pausePoint } from '../sys.js';
import { assertReleasable } from './partitions.js';
import { NO_UNIT_FILLS, UnitFiller, unitFillWanted, type UnitFillStats } from './unit-fill.js';
import { UpcallHandler, type UpcallType } from './upcalls.js';
import { kernelCredit, kernelEpochs } from './uloop.js';

/** Requests in flight per queue, and the largest request (bytes; bigger ones are split by the block layer). */
const QUEUE_DEPTH = 32;
/** Hardware queues by default: one per online CPU, at most this many (each a thread with its own io_uring). */
const MAX_DEFAULT_QUEUES = 4;

/**
 * The number of hardware queues: `$ULOBDEV_UBLK_QUEUES` (1-16) when set, else min(online CPUs, 4).
 * A device taken back by user recovery keeps the queues it was added with. Throws
 * InvalidArgumentError for a bad value.
 */
export function ublkQueues(env: NodeJS.ProcessEnv = process.env): number {
  const v = env.ULOBDEV_UBLK_QUEUES;
  if (v === undefined || v === '') return Math.max(1, Math.min(availableParallelism(), MAX_DEFAULT_QUEUES));
  if (!/^\d+$/.test(v) || Number(v) < 1 || Number(v) > 16) throw new InvalidArgumentError(`ULOBDEV_UBLK_QUEUES=${v} is not a number of queues from 1 to 16; unset it for one per CPU (at most 4)`);
  return Number(v);
}
const MAX_IO_BYTES = 256 << 10;

/**
 * `$ULOBDEV_UBLK_BATCH=K[,US]` checked (the queue threads' batched wait, read by the native server
 * at create: a thread waiting for new requests waits for K completions or US µs, default 50,
 * whichever comes first; Linux 6.12+). Returns K (1: off, also when unset or 0) and US. Throws
 * InvalidArgumentError for anything but K from 0 to the queue depth (32) and US from 1 to 10000.
 */
export function ublkBatch(env: NodeJS.ProcessEnv = process.env): { completions: number; us: number } {
  const v = env.ULOBDEV_UBLK_BATCH;
  if (v === undefined) return { completions: 1, us: 50 };
  // K's limit is QUEUE_DEPTH, the depth the server is made with, which bounds K there too (review13 U-1)
  const m = /^(\d+)(?:,(\d+))?$/.exec(v);
  const k = m ? Number(m[1]) : NaN;
  const us = m?.[2] !== undefined ? Number(m[2]) : 50;
  if (!m || k > QUEUE_DEPTH || us < 1 || us > 10000) {
    throw new InvalidArgumentError(`ULOBDEV_UBLK_BATCH=${v} is not K[,US] (K completions from 1 to ${QUEUE_DEPTH}, US µs from 1 to 10000); unset it for one completion at a time`);
  }
  return { completions: Math.max(1, k), us };
}

/** The number N of /dev/ublkbN, or -1 for `/dev/ublkb` (the next free one). */
export function ublkIndex(device: string): number {
  const m = /^\/dev\/ublkb(\d*)$/.exec(device);
  if (!m) throw new InvalidArgumentError(`${JSON.stringify(device)} is not /dev/ublkbN`);
  return m[1] === '' ? -1 : Number(m[1]);
}

/**
 * Makes sure /dev/ublk-control exists: `modprobe ublk_drv` when it does not (Debian, Ubuntu and
 * Fedora build it as a module). Throws ModuleMissingError with one line when the kernel has none.
 */
export function assertUblkDriver(device: string): void {
  if (existsSync(native.UBLK_CONTROL)) return;
  const r = modprobe('ublk_drv');
  if (r.ok && existsSync(native.UBLK_CONTROL)) return;
  throw new ModuleMissingError(ublkDriverMissing(device, release(), r));
}

/**
 * The one line assertUblkDriver refuses with, for DEVICE on kernel `kernel` (`uname -r`) after
 * `modprobe ublk_drv` answered `r` (its last line of stderr in `said`): what is missing and what
 * to do: a kernel before 6.0 has no ublk at all; a newer one lacks the module when its
 * distribution ships it in a separate package (Ubuntu's linux-modules-extra) or was built without
 * CONFIG_BLK_DEV_UBLK; any other modprobe failure is shown as it said it.
 */
export function ublkDriverMissing(device: string, kernel: string, r: { ok: boolean; said: string; status: number | null }): string {
  const needs = `${device} needs the kernel's ublk driver (ublk_drv)`;
  const instead = 'use /dev/loopN or /dev/nbdN instead';
  const [major = 0] = kernel.split('.').map((n) => parseInt(n, 10));
  if (major > 0 && major < 6) return `${needs}, which Linux added in 6.0; kernel ${kernel} is older: ${instead}`;
  if (r.ok) return `${needs}: 'modprobe ublk_drv' loaded it but ${native.UBLK_CONTROL} did not appear (see dmesg); ${instead}`;
  const said = r.said || `exit ${String(r.status)}`;
  if (/not found/i.test(said)) {
    return (
      `${needs}, which kernel ${kernel} does not have as a module (${said}): install its extra modules if the distribution ships them apart ` +
      `(Ubuntu: linux-modules-extra-${kernel}) and run 'modprobe ublk_drv'; a kernel built without CONFIG_BLK_DEV_UBLK has no ublk: ${instead}`
    );
  }
  return `${needs}, and 'modprobe ublk_drv' failed (${said}): fix what it says and try again, or ${instead}`;
}

export interface UblkOptions {
  device: string;
  engine: CacheEngine;
  readOnly: boolean;
  logger: Logger;
  /** The backing disk's sectors, which the device presents (default 512/512). */
  sectorSize?: SectorSize;
  /** How often the counters are looked at for user activity (ms). Default 200. */
  pollMs?: number;
  /**
   * Where the record of which cache serves /dev/ublkbN is kept (RUN_DIR): a device a dead daemon
   * left is taken back only by the same cache's command.
   */
  recordDir?: string;
  /** Called when the queue thread died: the daemon must exit so that its restart takes the device back. Default: exit 70. */
  onFatal?: (message: string) => void;
}

/**
 * The ublk server's side of a /dev/ublkbN as status shows it. The unit fill's counters
 * (src/bdev/unit-fill.ts) are zeros without a budget or with ULOBDEV_UNIT_FILL=0.
 */
export interface UblkStatus extends Omit<native.UblkCounts, 'running' | 'threadError' | 'cacheError'>, UnitFillStats {
  attach: 'added' | 'recovered';
  /** Served zero copy (UblkStarted.zeroCopy): reads straight into the request's pages. */
  zeroCopy: boolean;
  failedUpcalls: number;
  preserves: number;
}

export interface UblkFrontend extends Frontend {
  readonly kind: 'ublk';
  /** The server's counts now, or null once the device is gone. */
  ublkStatus(): UblkStatus | null;
}

const TYPES: Record<number, UpcallType> = {
  [native.UBLK_UP_MISS]: 'miss',
  [native.UBLK_UP_INTENT]: 'intent',
  [native.UBLK_UP_PRESERVE]: 'preserve',
  [native.UBLK_UP_ROOM]: 'room',
};

/**
 * Adds /dev/ublkbN over the engine's cache file (or takes it back from a dead daemon of the same
 * command) and serves it until detach(). Throws ModuleMissingError (no ublk_drv), DeviceBusyError
 * (N served by a live process, or of another size), or the NativeError of the control command.
 */
export async function attachUblk(options: UblkOptions): Promise<UblkFrontend> {
  const { engine, logger } = options;
  const store = engine.store;
  const { blockSize } = engine.geometry;
  const want = ublkIndex(options.device);
  const sector = options.sectorSize ?? { logical: 512, physical: 512 };
  const queues = ublkQueues();
  const batch = ublkBatch();
  // The server takes dirty blocks as present: zeroed blocks, which the cache file does not hold,
  // get their zeros written first (as for /dev/uloopN).
  if (store.zeroBlocks() > 0) await engine.materializeZeroed();
  // A budget (--cache-size): the server keeps an accessed bit per eviction unit for the clock,
  // evicts on the engine's word (EVICT: stops serving, waits for its hit reads in flight), and
  // holds its whole-block writes into missing blocks to a credit (ROOM past it): the same
  // mechanism as uloop.ko's, and the same daemon code (kernelEpochs, kernelCredit) drives it.
  const budgeted = store.budget !== null;

  let removed = false;
  // The server stopped (stop() returned): no claim is made or answered after it.
  let stopped = false;
  let failedUpcalls = 0;
  // The unit fill (made once the device is up; the partition scan's misses at START get none).
  let filler: UnitFiller | null = null;
  // Created before the handler it calls; upcalls only arrive once start() runs.
  let handler: UpcallHandler | undefined;
  const server: native.UblkServer = new native.UblkServer(
    {
      cachePath: store.paths.cache,
      size: engine.size,
      blockSize,
      logical: sector.logical,
      physical: Math.min(Math.max(sector.physical, sector.logical), blockSize),
      queues,
      depth: QUEUE_DEPTH,
      bufBytes: MAX_IO_BYTES,
      readOnly: options.readOnly,
      // A recovery killed part-way leaves it behind: the next start deletes the device and adds it
      // again instead of recovering it (native/ublk.cc StartWorker_::Recover).
      recoveryMarker: options.recordDir && want >= 0 ? ublkRecoveryMarker(options.recordDir, want) : undefined,
      ...(budgeted ? { unitShift: Math.log2(store.unitBlocks) } : {}),
    },
    store.present.buffer,
    store.dirty.buffer,
    (m) => {
      const type = TYPES[m.type];
      if (!type || !handler) {
        server.reply(m.id, -95);
        return;
      }
      void handler.run({ id: m.id, type, offset: m.offset, length: m.length, epoch: m.epoch }).then(async (error) => {
        if (error < 0) failedUpcalls++;
        await pausePoint(`ublk:${type}-reply`);
        server.reply(m.id, error);
        // After the reply: the asked read never waits for its neighbours.
        if (type === 'miss' && error === 0 && filler) filler.afterMiss(Math.floor(m.offset / blockSize), Math.ceil((m.offset + m.length) / blockSize));
      });
    },
  );
  let device = options.device;
  const epochs = kernelEpochs(
    engine,
    {
      begin: (dirty) => server.epochBegin(dirty),
      commit: (epoch, flushed) => void server.epochCommit(epoch, flushed),
      dirtyBlocks: () => server.query().dirtyBlocks,
      gone: () => removed,
      device,
      ...(budgeted
        ? {
            evict: (first: number, count: number, bits: Buffer) => server.evict(first, count, bits),
            accessed: (first: number, count: number, bits: Buffer) => server.accessed(first, count, bits),
          }
        : {}),
    },
    (line, err) => logger.warn({ err }, line),
  );
  // Whole blocks the server writes while missing take cache space before their INTENT records
  // them: a credit of about one eviction unit bounds them (ROOM past it). Read-only: none.
  const credit = budgeted && !options.readOnly ? kernelCredit(engine, { credit: (limit) => server.credit(limit), gone: () => removed }) : null;
  handler = new UpcallHandler({
    engine,
    logger,
    device,
    port: {
      barrierBlocks() {
        throw new InternalError('the ublk server sends no barrier: its first writes are recorded before they are acknowledged');
      },
      preserve: (epoch, first, end) => epochs.preserve(epoch, first, end),
      ...(credit
        ? {
            // ROOM: reserved as a fill would (evict, commit, flush: the write waits), then counted in
            // the server for that write alone (grant) and as outside in the store in one tick; the
            // limit stays (kernelCredit.room raises it, which on uloop.ko is taken under the
            // reply's lock; here another queue's write could take the raise before this one).
            room: async (n: number) => {
              const want = Math.min(n, store.budgetBlocks);
              await engine.reserveSpace(want);
              try {
                if (!removed) store.outsideBlocks = server.grant(n);
              } finally {
                store.release(want);
              }
            },
            intentRecorded: (n: number) => credit.handedOver(n),
          }
        : {}),
    },
  });

  const recordDir = options.recordDir;
  try {
    if (recordDir) await assertUblkAvailable(options.device, store.paths.cache, recordDir);
  } catch (err) {
    await server.stop().catch(() => undefined);
    throw err;
  }

  let started: native.UblkStarted;
  try {
    started = await server.start(want);
  } catch (err) {
    await server.stop().catch(() => undefined);
    throw await ublkError(options.device, err);
  }
  device = `/dev/ublkb${started.devId}`;
  const owned = recordDir ? join(recordDir, `ublkb${started.devId}.cache`) : null;
  if (owned) await writeFile(owned, `${store.paths.cache}\n`, { mode: 0o600 });
  // What EVICT returned stays off limits in the server (requests on it wait) until the store has
  // punched it: a whole-block write landing between the two would be punched away.
  if (budgeted) {
    epochs.external.evicted = (gone) => {
      if (removed) return;
      for (const e of gone) server.evictDone(e.start, e.count);
    };
  }
  // Read-only too with a budget: the engine evicts through the server there as well.
  if (!options.readOnly || budgeted) engine.externalEpochs = epochs.external;
  credit?.update();
  // Fills around a MISS (issue 12, power), through the server's CLAIM/FILLED so that no block a
  // writer touched is overwritten: src/bdev/unit-fill.ts. With a budget, on unless
  // ULOBDEV_UNIT_FILL=0 (the server is userspace: its claims end with the process).
  if (budgeted && unitFillWanted()) {
    filler = new UnitFiller({
      engine,
      logger,
      device,
      pauseTag: 'ublk',
      port: {
        claim: (first, count, bits) => server.claim(first, count, bits),
        filled: (id, first, count, bits) => server.filled(id, first, count, bits),
        maxBlocks: native.UBLK_MAX_CLAIM_BLOCKS,
        gone: () => stopped,
      },
    });
  }
  // `bound`, not `device`: the daemon's logger carries the device asked for (/dev/ublkb) already.
  if (started.recovered) logger.warn({ bound: device }, `${device}: taken back from a daemon that died (user recovery: its queued I/O carries on)`);
  else if (started.replaced) {
    logger.warn(
      { bound: device },
      `${device}: the device a dead daemon left could not be taken back (no user recovery, or a recovery that died part-way): deleted and added again; its queued I/O failed, every acknowledged write is in the cache`,
    );
  } else logger.info({ bound: device }, 'ublk device added');
  if (started.features !== 0 && (started.features & native.UBLK_F_USER_RECOVERY) === 0) {
    logger.warn(`${device}: this kernel's ublk has no UBLK_F_USER_RECOVERY: after a crash of the daemon the device fails its I/O and is added again by the next start`);
  }
  if (!started.zeroCopy && started.features !== 0) {
    const missing = [
      ['UBLK_F_AUTO_BUF_REG', native.UBLK_F_AUTO_BUF_REG],
      ['UBLK_F_USER_COPY', native.UBLK_F_USER_COPY],
    ].filter(([, bit]) => (started.features & (bit as number)) === 0);
    logger.info(
      { bound: device },
      missing.length > 0
        ? `${device}: this kernel's ublk has no ${missing.map(([name]) => name).join(' or ')} (Linux 6.16+): reads are copied through the server's buffers, not read into the request's pages`
        : `${device}: taken back from a daemon that added it without zero copy: reads are copied through the server's buffers until it is added again`,
    );
  }

  // $ULOBDEV_UBLK_BATCH asked the queue threads for a batched wait that this kernel cannot bound
  // (no IORING_FEAT_MIN_TIMEOUT): they wait for one completion at a time, as without the knob.
  if (batch.completions > 1 && server.query().batchWait === 1) {
    logger.info(
      { bound: device },
      `${device}: this kernel's io_uring has no IORING_FEAT_MIN_TIMEOUT (Linux 6.12+): the queue threads wait for one completion at a time ($ULOBDEV_UBLK_BATCH not in force)`,
    );
  }

  // The server's counters, looked at every pollMs: requests it served without JS count as user
  // activity (the hydrator and the --on-ac flush wait for quiet).
  let served = -1;
  let cacheError = 0;
  const onFatal =
    options.onFatal ??
    ((message: string) => {
      logger.fatal(message);
      logger.flush?.();
      // No detach: the device and its queued I/O wait for the restart (user recovery); the store
      // recovers as after a crash.
      process.exit(70);
    });
  const poll = () => {
    if (removed) return;
    const q = server.query();
    if (q.cacheError !== 0 && cacheError === 0) {
      cacheError = q.cacheError;
      logger.error(`${device}: a write or sync of the cache file ${store.paths.cache} failed (${errnoName(q.cacheError)}): writes and FLUSH fail with EIO until the daemon is restarted`);
    }
    if (!q.running) {
      removed = true;
      clearInterval(poller);
      onFatal(`${device}: the ublk queue thread stopped (${q.threadError ? errnoName(q.threadError) : 'no error'}); exiting so that a restart of the same command takes the device back`);
      return;
    }
    const n = q.readHits + q.readMisses + q.writeHits + q.writeUpcalls + q.flushes;
    if (served >= 0 && n !== served) engine.lastRequestAt = Math.max(engine.lastRequestAt, Date.now());
    served = n;
    if (budgeted) {
      // The credit's count exact again (store.outsideBlocks), its limit back to one unit if the
      // budget has room; room made ahead for the next misses.
      credit?.update();
      if (!store.failed) engine.evictAhead();
    }
  };
  const poller = setInterval(poll, options.pollMs ?? 200);
  poller.unref();

  return {
    kind: 'ublk',
    device,
    ublkStatus() {
      if (removed) return null;
      const q = server.query();
      return {
        attach: started.recovered ? 'recovered' : 'added',
        zeroCopy: started.zeroCopy,
        presentBlocks: q.presentBlocks,
        dirtyBlocks: q.dirtyBlocks,
        readHits: q.readHits,
        readMisses: q.readMisses,
        zeroCopyReads: q.zeroCopyReads,
        writeHits: q.writeHits,
        writeUpcalls: q.writeUpcalls,
        flushes: q.flushes,
        ioErrors: q.ioErrors,
        evictedBlocks: q.evictedBlocks,
        rooms: q.rooms,
        claimedBlocks: q.claimedBlocks,
        queueRequests: q.queueRequests,
        coopTaskrun: q.coopTaskrun,
        batchWait: q.batchWait,
        batchWaitUs: q.batchWaitUs,
        failedUpcalls,
        preserves: epochs.preserves(),
        ...(filler?.stats() ?? NO_UNIT_FILLS),
      };
    },
    async detach(opts) {
      if (removed) return;
      if (!opts?.force) await assertReleasable(device, `/sys/block/${device.slice('/dev/'.length)}`);
      removed = true;
      clearInterval(poller);
      // externalEpochs stays: with the server gone (removed), a flush epoch begun before the detach
      // refuses to commit (its blocks stay dirty: the server's writes since its begin are unknown to
      // the engine), and later epochs run on the store alone, which holds every dirty bit.
      // Fills running end first (their claims hold requests that STOP_DEV would wait for).
      await filler?.close();
      // STOP_DEV waits for requests in flight, some of which may wait for upcalls: the handler
      // keeps answering until the server is gone.
      await server.stop();
      stopped = true;
      await handler!.drain();
      if (owned) await rm(owned, { force: true });
    },
  };
}

function errnoName(errno: number): string {
  for (const [name, n] of Object.entries(osConstants.errno)) if (n === errno) return name;
  return `errno ${errno}`;
}

/** RECORD_DIR/ublkbN.recovering: present while a user recovery of /dev/ublkbN is part-way (native/ublk.cc). */
export function ublkRecoveryMarker(recordDir: string, n: number): string {
  return join(recordDir, `ublkb${n}.recovering`);
}

/**
 * Refuses (DeviceBusyError), before any cache is opened or created (invariant 6), a /dev/ublkbN
 * that exists and was not left by a daemon of this cache: a device a dead daemon left (user
 * recovery keeps it, with its I/O queued) belongs to the cache that daemon served, whose path
 * RECORD_DIR/ublkbN.cache holds. Whether its daemon is dead is the driver's to say at start.
 * Also refuses a /dev/ublkbN deleted while a filesystem was still mounted on it (a recovery that
 * failed): its number stays taken until the unmount, so it could not be added again.
 */
export async function assertUblkAvailable(device: string, cachePath: string, recordDir: string): Promise<void> {
  const n = ublkIndex(device);
  if (n < 0) return;
  if (!existsSync(`/sys/block/ublkb${n}`)) {
    const mounted = await mountsOfSource(device);
    if (mounted.length > 0) throw staleMount(device, mounted);
  }
  if (!existsSync(`/dev/ublkc${n}`)) return;
  const owner = await readFile(join(recordDir, `ublkb${n}.cache`), 'utf8').then(
    (t) => t.trim(),
    () => null,
  );
  if (owner === cachePath) return;
  throw new DeviceBusyError(
    `${device} exists and is not this cache's device (${owner ? `it serves ${owner}` : 'no ulobdev record of it'}); attach it with its own command, or pick another N`,
  );
}

/**
 * /dev/ublkbN was deleted (its daemon died part-way through a recovery) while a filesystem stayed
 * mounted on it: the number is taken until the unmount. The old mount fails every I/O; every
 * acknowledged write is in the cache. Refused rather than served under another number: the
 * sysadmin's fstab, scripts and the record name this one, and the dead mount must go anyway.
 * `mountpoints`: every mount of the device and its partitions (bind mounts included), all named so
 * that one round of unmounts is enough.
 */
export function staleMount(device: string, mountpoints: readonly string[]): DeviceBusyError {
  const each = mountpoints.length > 1 ? 'each' : 'it';
  return new DeviceBusyError(`${device} is still mounted at ${mountpoints.join(', ')} (its old device was deleted after its daemon died during a recovery; every acknowledged write is in the cache); unmount ${each}, then run the same command again`);
}

/**
 * One line for a failed start of /dev/ublkbN (`err`: the addon's error, with its errno `code`).
 * EADDRINUSE: the old device was deleted but something still holds it. A mount of it in this
 * namespace is named (staleMount, from `mountinfo`: its text in tests, default
 * /proc/self/mountinfo); otherwise the line names every other kind of holder and the command that
 * shows it (a mount elsewhere, device-mapper/LVM, swap, a process: the device node is gone, so
 * fuser/lsof on it cannot work). Other codes get their own lines; anything else is returned as is.
 */
export async function ublkError(device: string, err: unknown, mountinfo?: string): Promise<Error> {
  const code = (err as { code?: string }).code;
  const msg = (err as Error)?.message ?? String(err);
  if (code === 'EADDRINUSE') {
    const mounted = await mountsOfSource(device, mountinfo);
    if (mounted.length > 0) return staleMount(device, mounted);
    const name = device.slice('/dev/'.length);
    return new DeviceBusyError(
      `${device}: its old device was deleted but something still holds it, so the number cannot be used again; release the holder, then run the same command again: a filesystem mounted in another namespace or under another name (grep ${name} /proc/*/mountinfo), device-mapper/LVM on top (dmsetup ls --tree, then dmsetup remove), swap (swapon --show; swapoff by name fails once the node is gone, a reboot frees it), or a process (ls -l /proc/*/fd | grep ${name})`,
    );
  }
  if (code === 'EBUSY') return new DeviceBusyError(`${device} is served by another process; stop it first, or use /dev/ublkb for the next free one`);
  if (code === 'EEXIST') return new DeviceBusyError(`${device} exists and is not this cache's device (${msg}); delete it (ublk del) or pick another N`);
  if (code === 'ENOENT' || code === 'ENODEV') return new ModuleMissingError(`${device}: the kernel's ublk driver is not there (${msg}); modprobe ublk_drv`, { cause: err });
  if (code === 'EPERM' || code === 'EACCES') return new DeviceBusyError(`${device}: the ublk driver refused (${msg}); run ulobdev as root`);
  return err as Error;
}
