// The backing disk: a block device (opened O_EXCL, refused while mounted or held) or a regular file
// (refused while a loop device is bound to it). Its identity survives reboots and renames.
import { closeSync, constants as fsConstants, existsSync, openSync, promises as fsp, readFileSync, type Stats } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { DeviceBusyError, InvalidArgumentError, ioError } from '../errors.js';
import { posixStorage } from '../storage/posix-storage.js';
import type { Storage } from '../storage/storage.js';
import { FileSource } from './file-source.js';
import { blkPhysicalSectorSize, blkSectorSize, loopBacking } from '../native/blkdev.js';
import { fdOf } from '../storage/posix-storage.js';
import { listDir, majorMinor, mountsByDevice, partitionsOf, readTrim } from '../sys.js';

export { majorMinor };

export interface OpenBackingOptions {
  /** Open read-write (write-back mode). Read-only mode opens the disk read-only. */
  writable: boolean;
  storage?: Storage;
}

/**
 * Opens BACKEND, the disk to cache: a block device (O_EXCL, O_DIRECT) or a regular file.
 * InvalidArgumentError when it does not exist, is empty or is neither; DeviceBusyError when it is
 * mounted, held or bound to a loop device; IOFailedError for another failure of stat or open.
 */
export async function openBacking(path: string, options: OpenBackingOptions): Promise<FileSource> {
  const storage = options.storage ?? posixStorage;
  const fullPath = resolve(path);
  let st: Stats;
  try {
    st = await fsp.stat(fullPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new InvalidArgumentError(`BACKEND ${fullPath} does not exist (a typo, or the disk not plugged in?); 'lsblk' lists the disks`);
    }
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
    if (size === 0) {
      await file.close().catch(() => undefined);
      throw new InvalidArgumentError(`${fullPath} is empty (0 bytes): no medium in the drive, or a loop device bound to nothing? name the disk to cache`);
    }
    const id = await blockDeviceIdentity(majMin);
    const fd = fdOf(file);
    // Through another Storage (tests) there are no ioctls: the sizes of a plain disk then.
    const sectorSize = fd === undefined ? { logical: 512, physical: 512 } : { logical: blkSectorSize(fd), physical: blkPhysicalSectorSize(fd) };
    return new FileSource(file, {
      id,
      size,
      direct: true,
      description: fullPath,
      sectorSize,
      present: devicePresence(majMin),
      partitionStarts: () => sysfsPartitionStarts(`/sys/dev/block/${majMin}`),
    });
  }
  if (st.isFile()) {
    const loop = await loopDeviceBoundTo(fullPath, st);
    // Bound on purpose, maybe (a 4K-sector view: losetup -b 4096, as docs/laptop.md says): both ways out (newuser14 F9).
    if (loop) throw new DeviceBusyError(`${fullPath} is attached to ${loop}: give ${loop} (or its partition) as BACKEND, or detach it first (losetup -d ${loop})`);
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

/**
 * Whether the block device `majMin` is still the one opened now: its sysfs entry exists and has the
 * same disk sequence number (diskseq, Linux 5.15+: a number given to each disk that appears, so a
 * disk plugged in later under the same device number is another one). Reads sysfs only.
 */
export function devicePresence(majMin: string): () => boolean {
  const dir = `/sys/dev/block/${majMin}`;
  const seqOf = () => {
    try {
      return readFileSync(`${dir}/diskseq`, 'utf8').trim();
    } catch {
      return null;
    }
  };
  const seq = seqOf();
  return () => existsSync(dir) && seqOf() === seq;
}

function fileIdentity(st: Stats): string {
  return `file:${majorMinor(st.dev)}:${st.ino}`;
}

/** Refuses a disk that is mounted, has a mounted partition, or is held by dm/md (holders). */
export async function assertBlockDeviceFree(path: string, majMin: string): Promise<void> {
  const sysDir = `/sys/dev/block/${majMin}`;
  const parts = await partitionsOf(sysDir);
  const mounts = await mountsByDevice();
  const mount = mounts.get(majMin);
  if (mount) throw new DeviceBusyError(`${path} is mounted on ${mount}; unmount it first`);
  // A partition is named as the user knows it (/dev/sdb1), not as its whole disk.
  for (const part of parts) {
    const partMount = mounts.get(part.dev);
    if (partMount) throw new DeviceBusyError(`/dev/${part.name}, a partition of ${path}, is mounted on ${partMount}; unmount it first`);
  }
  for (const n of [{ name: '', sysDir }, ...parts]) {
    const holders = await listDir(join(n.sysDir, 'holders'));
    if (holders.length === 0) continue;
    const what = n.name === '' ? path : `/dev/${n.name}, a partition of ${path},`;
    throw new DeviceBusyError(`${what} is held by ${holders.join(', ')} (device-mapper, md or a loop device); stop that first`);
  }
}

/**
 * WWN or serial from sysfs for real disks (stable across reboots and renames), the parent disk's
 * identity plus the partition's number and start sector for partitions, the backing file for loop
 * devices, and the device number only as a last resort (docs/format.md, "Backing identity").
 */
export async function blockDeviceIdentity(majMin: string): Promise<string> {
  // /sys/dev/block/M:m is a symlink into the device tree; resolved first, so that its parent
  // directory is the disk (a path join of ".." would only strip the link's own name).
  const sysDir = await fsp.realpath(`/sys/dev/block/${majMin}`).catch(() => `/sys/dev/block/${majMin}`);
  const number = await readTrim(join(sysDir, 'partition'));
  if (number) {
    const parentDev = await readTrim(join(dirname(sysDir), 'dev'));
    const start = await readTrim(join(sysDir, 'start'));
    if (parentDev && start) return `${await blockDeviceIdentity(parentDev)}:part${number}@${start}`;
  }
  for (const file of ['wwid', 'device/wwid', 'serial', 'device/serial']) {
    const value = await readTrim(join(sysDir, file));
    if (value) return `${file.endsWith('serial') ? 'serial' : 'wwid'}:${value.replace(/\s+/g, ' ')}`;
  }
  const backingFile = await readTrim(join(sysDir, 'loop/backing_file'));
  if (backingFile) {
    const offset = (await readTrim(join(sysDir, 'loop/offset'))) ?? '0';
    // From the loop driver (LOOP_GET_STATUS64), not stat() of the path: the file may sit on a
    // FUSE mount that no longer answers.
    let fd: number | undefined;
    try {
      fd = openSync(`/dev/${basename(sysDir)}`, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
      const bound = loopBacking(fd);
      return `loop:file:${majorMinor(bound.device)}:${bound.inode}@${offset}`;
    } catch {
      return `loop:${backingFile}@${offset}`;
    } finally {
      if (fd !== undefined) closeSync(fd);
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

/**
 * The partitions' start offsets (bytes) of the whole disk whose sysfs directory is `sysDir`
 * (/sys/dev/block/MAJ:MIN), as the kernel read its partition table; empty for a partition or a
 * disk without partitions. Reads sysfs only. For the disk fingerprint (src/cache/fingerprint.ts).
 */
export async function sysfsPartitionStarts(sysDir: string): Promise<number[]> {
  const starts: number[] = [];
  for (const p of await partitionsOf(sysDir)) {
    const sectors = Number.parseInt((await readTrim(join(p.sysDir, 'start'))) ?? '', 10);
    // sysfs counts 512-byte sectors whatever the disk's sector size.
    if (Number.isSafeInteger(sectors) && sectors >= 0) starts.push(sectors * 512);
  }
  return starts;
}
