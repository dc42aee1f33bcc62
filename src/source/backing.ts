// The backing disk: a block device (opened O_EXCL, refused while mounted or held) or a regular file
// (refused while a loop device is bound to it). Its identity survives reboots and renames.
import { closeSync, constants as fsConstants, openSync, promises as fsp, type Stats } from 'node:fs';
import { join, resolve } from 'node:path';
import { DeviceBusyError, InvalidArgumentError, ioError } from '../errors.js';
import { posixStorage } from '../storage/posix-storage.js';
import type { Storage } from '../storage/storage.js';
import { FileSource } from './file-source.js';
import { loopBacking } from '../native/blkdev.js';
import { exists, listDir, majorMinor, mountsByDevice, readTrim } from '../sys.js';

export { majorMinor };

export interface OpenBackingOptions {
  /** Open read-write (write-back mode). Read-only mode opens the disk read-only. */
  writable: boolean;
  storage?: Storage;
}

export async function openBacking(path: string, options: OpenBackingOptions): Promise<FileSource> {
  const storage = options.storage ?? posixStorage;
  const fullPath = resolve(path);
  let st: Stats;
  try {
    st = await fsp.stat(fullPath);
  } catch (err) {
    throw ioError('open backing device', fullPath, err);
  }
  if (st.isBlockDevice()) {
    const majMin = majorMinor(st.rdev);
    await assertBlockDeviceFree(fullPath, majMin);
    let file;
    try {
      file = await storage.open(fullPath, { readOnly: !options.writable, exclusive: true, direct: true });
    } catch (err) {
      if ((err as { code?: string }).code === 'EBUSY') {
        throw new DeviceBusyError(`${fullPath} is in use (mounted, or held by another program or device-mapper)`);
      }
      throw ioError('open backing device', fullPath, err);
    }
    const size = await file.size();
    const id = await blockDeviceIdentity(majMin);
    return new FileSource(file, { id, size, direct: true, description: fullPath });
  }
  if (st.isFile()) {
    const loop = await loopDeviceBoundTo(fullPath, st);
    if (loop) throw new DeviceBusyError(`${fullPath} is attached to ${loop}; detach it first (losetup -d ${loop})`);
    if (st.size === 0) throw new InvalidArgumentError(`${fullPath} is empty; a backing file needs a size`);
    let file;
    try {
      file = await storage.open(fullPath, { readOnly: !options.writable });
    } catch (err) {
      throw ioError('open backing file', fullPath, err);
    }
    return new FileSource(file, { id: fileIdentity(st), size: st.size, description: fullPath });
  }
  throw new InvalidArgumentError(`${fullPath} is neither a block device nor a regular file`);
}

function fileIdentity(st: Stats): string {
  return `file:${majorMinor(st.dev)}:${st.ino}`;
}

/** Refuses a disk that is mounted, has a mounted partition, or is held by dm/md (holders). */
export async function assertBlockDeviceFree(path: string, majMin: string): Promise<void> {
  const sysDir = `/sys/dev/block/${majMin}`;
  const devices = [majMin, ...(await partitionsOf(sysDir))];
  const mounts = await mountsByDevice();
  for (const dev of devices) {
    const mount = mounts.get(dev);
    if (mount) throw new DeviceBusyError(`${path} is mounted on ${mount}; unmount it first`);
  }
  for (const dir of [sysDir, ...(await partitionDirs(sysDir))]) {
    const holders = await listDir(join(dir, 'holders'));
    if (holders.length > 0) throw new DeviceBusyError(`${path} is held by ${holders.join(', ')}`);
  }
}

async function partitionDirs(sysDir: string): Promise<string[]> {
  const dirs: string[] = [];
  for (const name of await listDir(sysDir)) {
    if (await exists(join(sysDir, name, 'partition'))) dirs.push(join(sysDir, name));
  }
  return dirs;
}

async function partitionsOf(sysDir: string): Promise<string[]> {
  const devs: string[] = [];
  for (const dir of await partitionDirs(sysDir)) devs.push((await readTrim(join(dir, 'dev'))) ?? '');
  return devs.filter(Boolean);
}

/**
 * WWN or serial from sysfs for real disks (stable across reboots and renames), the partition's
 * parent identity plus its start for partitions, the backing file for loop devices, and the
 * device number only as a last resort.
 */
export async function blockDeviceIdentity(majMin: string): Promise<string> {
  const sysDir = `/sys/dev/block/${majMin}`;
  if (await exists(join(sysDir, 'partition'))) {
    const parent = await fsp.realpath(join(sysDir, '..'));
    const parentDev = await readTrim(join(parent, 'dev'));
    const start = await readTrim(join(sysDir, 'start'));
    if (parentDev) return `${await blockDeviceIdentity(parentDev)}:part@${start ?? '?'}`;
  }
  for (const file of ['wwid', 'device/wwid', 'device/serial']) {
    const value = await readTrim(join(sysDir, file));
    if (value) return `${file.endsWith('serial') ? 'serial' : 'wwid'}:${value.replace(/\s+/g, ' ')}`;
  }
  const loopBacking = await readTrim(join(sysDir, 'loop/backing_file'));
  if (loopBacking) {
    const offset = (await readTrim(join(sysDir, 'loop/offset'))) ?? '0';
    try {
      const st = await fsp.stat(loopBacking.replace(/ \(deleted\)$/, ''));
      return `loop:${fileIdentity(st)}@${offset}`;
    } catch {
      return `loop:${loopBacking}@${offset}`;
    }
  }
  const byId = await byIdName(majMin);
  if (byId) return `by-id:${byId}`;
  return `devnum:${majMin}`;
}

async function byIdName(majMin: string): Promise<string | undefined> {
  const dir = '/dev/disk/by-id';
  for (const name of (await listDir(dir)).sort()) {
    try {
      const st = await fsp.stat(join(dir, name));
      if (st.isBlockDevice() && majorMinor(st.rdev) === majMin) return name;
    } catch {
      // dangling link: skip
    }
  }
  return undefined;
}

/**
 * The loop device whose backing file is `path`, if any. Compared by device and inode from the
 * loop driver (LOOP_GET_STATUS64), never by stat() of the other loop devices' backing paths: one
 * of them may sit on a FUSE mount that no longer answers, and stat() would hang.
 */
export async function loopDeviceBoundTo(path: string, st: Stats): Promise<string | undefined> {
  for (const name of await listDir('/sys/block')) {
    if (!/^loop\d+$/.test(name)) continue;
    const backing = await readTrim(join('/sys/block', name, 'loop/backing_file'));
    if (!backing) continue;
    if (backing === path) return `/dev/${name}`;
    let fd: number | undefined;
    try {
      fd = openSync(`/dev/${name}`, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
      const bound = loopBacking(fd);
      if (bound.inode === st.ino && bound.device === st.dev) return `/dev/${name}`;
    } catch {
      // Detached meanwhile, or no device node: not bound to our file.
    } finally {
      if (fd !== undefined) closeSync(fd);
    }
  }
  return undefined;
}


