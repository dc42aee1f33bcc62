// /dev/loopN frontend without a kernel module of our own: nbdfuse (libnbd) exports our NBD server
// as one file on a private FUSE mount, and the loop device is bound to that file. nbdfuse was
// chosen over a FUSE binding for Node: it is maintained with libnbd, speaks NBD to our server
// over multi-conn, and maps fsync to NBD FLUSH, so a filesystem's barriers reach the engine.
import { closeSync, constants as fsConstants, openSync, promises as fsp } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { DeviceBusyError, FuseError, InvalidArgumentError, ioError } from '../errors.js';
import { loopClearAutoclear, loopCtlAdd, loopCtlRemove } from '../native/blkdev.js';
import { blockDeviceUsers, crashPoint, describeUsers, exists, isMountpoint, readTrim, sleep } from '../sys.js';
import { assertReleasable, showPartitions } from './partitions.js';
import { run, start } from './programs.js';
import { ANY_LOOP, type Frontend } from './frontend.js';

export interface LoopAttachOptions {
  /** The loop device, /dev/loopN. */
  device: string;
  /** Unix socket our NBD server listens on. */
  socket: string;
  /** Private directory for the FUSE mount. */
  runDir: string;
  readOnly: boolean;
  logger: Logger;
  /** Logical sector size the loop device presents (losetup --sector-size): the disk's. Default 512. */
  sectorSize?: number;
}

const READY_TIMEOUT_MS = 15_000;

export function loopIndex(device: string): number {
  const m = /^\/dev\/loop(\d+)$/.exec(device);
  if (!m) throw new InvalidArgumentError(`${device} is not a loop device name (/dev/loopN)`);
  return Number(m[1]);
}

const LOOP_CONTROL = '/dev/loop-control';
// NBD connections nbdfuse opens to our server (its default is 4): with 4, fio's QD16 reached the
// daemon only a few requests at a time, so first writes shared a dirty-intent fsync 2.3 per round.
const NBDFUSE_CONNECTIONS = 8;
// libfuse's worker cap (max_threads, default 10) is not raised: nbdfuse 1.14 hands -o to fuse_new,
// which rejects `-o max_threads=16` here (fuse_new: Resource temporarily unavailable).

/**
 * Refuses a loop device that is bound already, or that does not exist and cannot be made (no
 * loop driver); returns its sysfs directory. A /dev/loopN that does not exist yet is fine:
 * attachLoop creates it, as losetup does.
 */
export async function assertLoopFree(device: string): Promise<string> {
  const sys = `/sys/block/loop${loopIndex(device)}`;
  if (!(await exists(sys))) {
    if (await exists(LOOP_CONTROL)) return sys;
    throw new InvalidArgumentError(`${device} does not exist and ${LOOP_CONTROL} is missing: load the loop driver first (modprobe loop)`);
  }
  const bound = await readTrim(join(sys, 'loop/backing_file'));
  if (bound) throw new DeviceBusyError(`${device} is in use (bound to ${bound}); pick a free one with 'losetup -f'`);
  return sys;
}

/**
 * Creates /dev/loopN with LOOP_CTL_ADD when the kernel has no such device yet (max_loop devices
 * exist at boot; losetup makes the others on demand), and waits for its node. Returns true when
 * it made one: the caller removes it again if the attach fails, so a refused attach leaves none.
 */
async function ensureLoopDevice(device: string, sys: string): Promise<boolean> {
  if (await exists(sys)) return false;
  const index = loopIndex(device);
  let fd: number;
  try {
    fd = openSync(LOOP_CONTROL, fsConstants.O_RDWR);
  } catch (err) {
    throw ioError('open', LOOP_CONTROL, err);
  }
  try {
    loopCtlAdd(fd, index);
  } catch (err) {
    // Made by someone else in the meantime: assertLoopFree's checks apply to it as to any other.
    if ((err as { code?: string }).code !== 'EEXIST') throw ioError(`create ${device} with LOOP_CTL_ADD on`, LOOP_CONTROL, err);
    return false;
  } finally {
    closeSync(fd);
  }
  // devtmpfs makes the node before the ioctl returns; udev may still be applying its rules.
  const deadline = Date.now() + 5000;
  while (!(await exists(device)) && Date.now() < deadline) await sleep(20);
  return true;
}

/** LOOP_CTL_REMOVE of a loop device this attach made; a failure leaves an unbound device, logged. */
function removeLoopDevice(device: string, logger: Logger): void {
  try {
    const fd = openSync(LOOP_CONTROL, fsConstants.O_RDWR);
    try {
      loopCtlRemove(fd, loopIndex(device));
    } finally {
      closeSync(fd);
    }
  } catch (err) {
    logger.warn(`cannot remove ${device}, made for this attach: ${(err as Error).message}`);
  }
}

export async function attachLoop(options: LoopAttachOptions): Promise<Frontend> {
  const { logger } = options;
  // /dev/loop: losetup --find picks the device below; a named one is checked, and made if missing.
  const anyLoop = options.device === ANY_LOOP;
  let created = false;
  if (!anyLoop) {
    created = await ensureLoopDevice(options.device, await assertLoopFree(options.device));
    if (created) await assertLoopFree(options.device);
  }

  const mountDir = join(options.runDir, 'fuse');
  const file = join(mountDir, 'disk');
  await fsp.mkdir(mountDir, { recursive: true, mode: 0o700 });
  if (await isMountpoint(mountDir)) await run('fusermount3', ['-u', mountDir]).catch(() => undefined);
  const pidfile = join(options.runDir, 'nbdfuse.pid');
  await fsp.rm(pidfile, { force: true });

  const args = [
    ...(options.readOnly ? ['-r'] : []),
    '-C', String(NBDFUSE_CONNECTIONS),
    '-P', pidfile, file, '--unix', options.socket,
  ];
  const fuse = start('nbdfuse', args);
  let detaching = false;
  void fuse.exited.then((code) => {
    if (!detaching) logger.error({ code, stderr: fuse.stderr() }, `nbdfuse exited unexpectedly; ${device} now fails I/O`);
  });
  let device = options.device;
  try {
    await waitForReady(pidfile, fuse.exited, fuse.stderr);
    crashPoint('attach:fuse');
    // Direct I/O: the device's own page cache is the only copy in memory, not also the FUSE file's.
    // The disk's logical sector size, so a filesystem made on the device mounts on the bare disk.
    // The loop driver sets the physical block size to the same value; it has no separate knob.
    // --partscan: a disk with a partition table shows /dev/loopNpM, as the bare disk shows sdbM.
    const flags = ['--direct-io=on', '--partscan', '--sector-size', String(options.sectorSize ?? 512), ...(options.readOnly ? ['-r'] : [])];
    // /dev/loop: losetup finds a free device and binds it in one step (no race with another
    // program taking the same one); the backing file's path names this daemon for udev.
    if (anyLoop) device = (await run('losetup', [...flags, '--find', '--show', file])).trim();
    else await run('losetup', [...flags, device, file]);
  } catch (err) {
    detaching = true;
    await run('fusermount3', ['-u', mountDir]).catch(() => undefined);
    fuse.child.kill();
    if (created) removeLoopDevice(device, logger);
    throw err;
  }
  const sys = `/sys/block/loop${loopIndex(device)}`;
  // `bound`, not `device`: the daemon's logger carries the device asked for (/dev/loop) already.
  logger.info({ bound: device, file, ...(created ? { created: true } : {}) }, 'loop device bound to the FUSE export');
  await showPartitions(device, sys, logger);

  return {
    kind: 'loop',
    device,
    /**
     * Unbinds the loop device and stops nbdfuse. Refused, changing nothing, while the device or any
     * partition of it is in use (once unbound, the filesystem on it would only get I/O errors),
     * unless `force`: the stop deadline passed, so the device is let go of even in use (a lazy
     * unmount of the FUSE file; its I/O then fails with ENOTCONN).
     */
    async detach(detachOptions: { force?: boolean } = {}): Promise<void> {
      const force = detachOptions.force ?? false;
      if (force) {
        detaching = true;
        // In use, losetup -d only marks the device to be cleared at its last close (autoclear).
        await run('losetup', ['-d', device]).catch(() => undefined);
        const deadline = Date.now() + 1000;
        while ((await readTrim(join(sys, 'loop/backing_file'))) && Date.now() < deadline) await sleep(20);
        await run('fusermount3', ['-u', '-z', mountDir]).catch(() => undefined);
        fuse.child.kill('SIGTERM');
      } else {
        await assertReleasable(device, sys);
        detaching = true;
        try {
          await unbindLoop(device, sys);
        } catch (err) {
          detaching = false;
          throw err;
        }
        // The device has let go: from here on nothing can be refused, what is left is tidying up,
        // and a failure of it must not stop the detach (the flush and the clean close come after).
        // At shutdown systemd unmounts every mount it sees; ulobdev@.service orders this one after
        // the daemon, but one unmounted first by someone else is just as good.
        await run('fusermount3', ['-u', mountDir]).catch(async (err: unknown) => {
          if (!(await isMountpoint(mountDir))) return;
          logger.warn(`${(err as Error).message}; unmounting ${mountDir} lazily`);
          await run('fusermount3', ['-u', '-z', mountDir]).catch(() => undefined);
        });
      }
      const killer = setTimeout(() => fuse.child.kill('SIGKILL'), force ? 2000 : 5000);
      await fuse.exited;
      clearTimeout(killer);
      await fsp.rm(pidfile, { force: true });
    },
  };
}

/**
 * LOOP_CLR_FD, then waits for the driver to let go of the file. Should something open the device
 * between the check and the ioctl, the driver only marks it to unbind at the last close
 * (autoclear): that mark is taken back and the detach refused, so the device stays as it was.
 */
async function unbindLoop(device: string, sys: string): Promise<void> {
  await run('losetup', ['-d', device]);
  const deadline = Date.now() + 10_000;
  while ((await readTrim(join(sys, 'loop/backing_file'))) && Date.now() < deadline) await sleep(20);
  if (!(await readTrim(join(sys, 'loop/backing_file')))) return;
  const fd = openSync(device, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  try {
    loopClearAutoclear(fd);
  } finally {
    closeSync(fd);
  }
  const users = await blockDeviceUsers(sys);
  throw new DeviceBusyError(`${device} was opened while detaching${users.length ? ` (${describeUsers(users)})` : ''}; it stays attached, try again`, { use: users[0]?.text });
}

async function waitForReady(pidfile: string, exited: Promise<number | null>, stderr: () => string): Promise<void> {
  let gone = false;
  void exited.then(() => (gone = true));
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (await exists(pidfile)) return;
    if (gone) {
      const why = stderr().trim().split('\n').pop() || 'no message';
      throw new FuseError(`nbdfuse failed to start: ${why}`);
    }
    await sleep(20);
  }
  throw new FuseError(`nbdfuse did not become ready within ${READY_TIMEOUT_MS / 1000} s`);
}
