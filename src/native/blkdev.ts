// Block device ioctls (native/blkdev.cc): synchronous, they only read block layer state, except
// BLKZEROOUT (on the threadpool). A non-device fd throws NativeError ENOTTY.
import { addon, validateFd, validateInteger } from './addon.js';

interface BlkdevBinding {
  blkGetSize64(fd: number): number;
  blkFlsBuf(fd: number): void;
  blkSectorSize(fd: number): number;
  blkPhysicalSectorSize(fd: number): number;
  loopBacking(fd: number): { device: number; inode: number };
  blkZeroOut(fd: number, offset: number, length: number): Promise<void>;
  loopCtlAdd(fd: number, index: number): number;
  loopCtlRemove(fd: number, index: number): void;
  loopClearAutoclear(fd: number): boolean;
}

const binding = addon<BlkdevBinding>();

/** BLKGETSIZE64: the device size in bytes. */
export function blkGetSize64(fd: number): number {
  validateFd(fd);
  return binding.blkGetSize64(fd);
}

/** BLKFLSBUF: writes back and drops the device's page cache (needs CAP_SYS_ADMIN). */
export function blkFlsBuf(fd: number): void {
  validateFd(fd);
  binding.blkFlsBuf(fd);
}

/** BLKSSZGET: the logical sector size in bytes. */
export function blkSectorSize(fd: number): number {
  validateFd(fd);
  return binding.blkSectorSize(fd);
}

/** BLKPBSZGET: the physical block size in bytes (4096 on a 512e disk, whose logical sectors are 512). */
export function blkPhysicalSectorSize(fd: number): number {
  validateFd(fd);
  return binding.blkPhysicalSectorSize(fd);
}

/** LOOP_GET_STATUS64: dev_t and inode of a loop device's backing file, without touching it. */
export function loopBacking(fd: number): { device: number; inode: number } {
  validateFd(fd);
  return binding.loopBacking(fd);
}

/** Largest loop index: minor numbers are 20 bits (MINORMASK), and each loop device may take one. */
const MAX_LOOP_INDEX = (1 << 20) - 1;

/**
 * LOOP_CTL_ADD on an fd of /dev/loop-control: creates /dev/loopN (losetup does the same for a
 * device that does not exist yet). Returns N; NativeError EEXIST when it exists.
 */
export function loopCtlAdd(fd: number, index: number): number {
  validateFd(fd);
  validateInteger(index, 'index', 0, MAX_LOOP_INDEX);
  return binding.loopCtlAdd(fd, index);
}

/** LOOP_CTL_REMOVE: removes an unbound /dev/loopN (NativeError EBUSY while it is bound or open). */
export function loopCtlRemove(fd: number, index: number): void {
  validateFd(fd);
  validateInteger(index, 'index', 0, MAX_LOOP_INDEX);
  binding.loopCtlRemove(fd, index);
}

/**
 * BLKZEROOUT: [offset, offset + length) of the device reads as zeros afterwards (the device may
 * zero it without data transfer: WRITE ZEROES, WRITE SAME). Both must be multiples of the logical
 * sector size (EINVAL otherwise). Runs on the threadpool; durable after a flush of the device.
 */
export function blkZeroOut(fd: number, offset: number, length: number): Promise<void> {
  validateFd(fd);
  validateInteger(offset, 'offset');
  validateInteger(length, 'length', 1, Number.MAX_SAFE_INTEGER - offset);
  return binding.blkZeroOut(fd, offset, length);
}

/**
 * Turns off a loop device's autoclear flag (LOOP_GET/SET_STATUS64), which LOOP_CLR_FD sets instead
 * of unbinding while the device is open; true if it was set. Needs CAP_SYS_ADMIN.
 */
export function loopClearAutoclear(fd: number): boolean {
  validateFd(fd);
  return binding.loopClearAutoclear(fd);
}
