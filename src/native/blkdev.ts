// Block device ioctls (native/blkdev.cc): synchronous, they only read block layer state. A
// non-device fd throws NativeError ENOTTY.
import { addon, validateFd } from './addon.js';

interface BlkdevBinding {
  blkGetSize64(fd: number): number;
  blkFlsBuf(fd: number): void;
  blkSectorSize(fd: number): number;
  blkPhysicalSectorSize(fd: number): number;
  loopBacking(fd: number): { device: number; inode: number };
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

/**
 * Turns off a loop device's autoclear flag (LOOP_GET/SET_STATUS64), which LOOP_CLR_FD sets instead
 * of unbinding while the device is open; true if it was set. Needs CAP_SYS_ADMIN.
 */
export function loopClearAutoclear(fd: number): boolean {
  validateFd(fd);
  return binding.loopClearAutoclear(fd);
}
