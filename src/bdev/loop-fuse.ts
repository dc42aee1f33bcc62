// /dev/loopN frontend without a kernel module of our own: nbdfuse (libnbd) exports our NBD server
// as one file on a private FUSE mount, and the loop device is bound to that file. nbdfuse was
// chosen over a FUSE binding for Node: it is maintained with libnbd, speaks NBD to our server
// over multi-conn, and maps fsync to NBD FLUSH, so a filesystem's barriers reach the engine.
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { DeviceBusyError, FuseError, InvalidArgumentError } from '../errors.js';
import { exists, isMountpoint, mountsByDevice, readTrim, sleep } from '../sys.js';
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
}

const READY_TIMEOUT_MS = 15_000;

export function loopIndex(device: string): number {
  const m = /^\/dev\/loop(\d+)$/.exec(device);
  if (!m) throw new InvalidArgumentError(`${device} is not a loop device name (/dev/loopN)`);
  return Number(m[1]);
}

/** Refuses a loop device that does not exist or is bound already; returns its sysfs directory. */
export async function assertLoopFree(device: string): Promise<string> {
  const sys = `/sys/block/loop${loopIndex(device)}`;
  if (!(await exists(sys))) {
    throw new InvalidArgumentError(`${device} does not exist (is the loop module loaded? try 'losetup -f')`);
  }
  const bound = await readTrim(join(sys, 'loop/backing_file'));
  if (bound) throw new DeviceBusyError(`${device} is in use (bound to ${bound}); pick a free one with 'losetup -f'`);
  return sys;
}

export async function attachLoop(options: LoopAttachOptions): Promise<Frontend> {
  const { logger } = options;
  const anyLoop = options.device === ANY_LOOP;
  if (!anyLoop) await assertLoopFree(options.device);

  const mountDir = join(options.runDir, 'fuse');
  const file = join(mountDir, 'disk');
  await fsp.mkdir(mountDir, { recursive: true, mode: 0o700 });
  if (await isMountpoint(mountDir)) await run('fusermount3', ['-u', mountDir]).catch(() => undefined);
  const pidfile = join(options.runDir, 'nbdfuse.pid');
  await fsp.rm(pidfile, { force: true });

  const args = [...(options.readOnly ? ['-r'] : []), '-P', pidfile, file, '--unix', options.socket];
  const fuse = start('nbdfuse', args);
  let detaching = false;
  void fuse.exited.then((code) => {
    if (!detaching) logger.error({ code, stderr: fuse.stderr() }, `nbdfuse exited unexpectedly; ${device} now fails I/O`);
  });
  let device = options.device;
  try {
    await waitForReady(pidfile, fuse.exited, fuse.stderr);
    // Direct I/O: the device's own page cache is the only copy in memory, not also the FUSE file's.
    // /dev/loop: losetup finds a free device and binds it in one step (no race with another
    // program taking the same one); the backing file's path names this daemon for udev.
    const flags = ['--direct-io=on', ...(options.readOnly ? ['-r'] : [])];
    if (anyLoop) device = (await run('losetup', [...flags, '--find', '--show', file])).trim();
    else await run('losetup', [...flags, device, file]);
  } catch (err) {
    detaching = true;
    await run('fusermount3', ['-u', mountDir]).catch(() => undefined);
    fuse.child.kill();
    throw err;
  }
  const sys = `/sys/block/loop${loopIndex(device)}`;
  logger.info({ device, file }, 'loop device bound to the FUSE export');

  return {
    kind: 'loop',
    device,
    async detach(detachOptions: { force?: boolean } = {}): Promise<void> {
      const force = detachOptions.force ?? false;
      if (!force) {
        const dev = await readTrim(join(sys, 'dev'));
        const mount = dev ? (await mountsByDevice()).get(dev) : undefined;
        if (mount) throw new DeviceBusyError(`${device} is mounted on ${mount}; unmount it first`);
        const holders = await fsp.readdir(join(sys, 'holders')).catch(() => []);
        if (holders.length > 0) throw new DeviceBusyError(`${device} is held by ${holders.join(', ')}`);
      }
      detaching = true;
      // In use, losetup -d only marks the device to be cleared at its last close (autoclear).
      await run('losetup', ['-d', device]).catch((err: unknown) => {
        if (!force) throw err;
      });
      // The loop driver lets go of the file only when its last opener closes it.
      const deadline = Date.now() + (force ? 1000 : 10_000);
      while ((await readTrim(join(sys, 'loop/backing_file'))) && Date.now() < deadline) await sleep(20);
      // Forced: a lazy unmount, and nbdfuse goes; the loop device's file then fails I/O (ENOTCONN).
      await run('fusermount3', force ? ['-u', '-z', mountDir] : ['-u', mountDir]).catch((err: unknown) => {
        if (!force) throw err;
      });
      if (force) fuse.child.kill('SIGTERM');
      const killer = setTimeout(() => fuse.child.kill('SIGKILL'), force ? 2000 : 5000);
      await fuse.exited;
      clearTimeout(killer);
      await fsp.rm(pidfile, { force: true });
    },
  };
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
