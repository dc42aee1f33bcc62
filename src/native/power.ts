// Disk power commands (native/power.cc): raw command transport only; src/writeback/power.ts
// builds the commands and decodes the answers.
import { addon, outOfRange, validateBytes, validateFd, validateInteger } from './addon.js';

/** What SG_IO reports for a command (sg_io_hdr_t); the sense bytes land in the caller's buffer. */
export interface SgIoResult {
  /** SCSI status: 0 GOOD, 2 CHECK CONDITION. */
  status: number;
  hostStatus: number;
  driverStatus: number;
  /** Sense bytes written. */
  senseLength: number;
}

interface PowerBinding {
  ataSgIo(fd: number, cdb: Uint8Array, sense: Uint8Array, timeoutMs: number): Promise<SgIoResult>;
  hdioDriveCmd(fd: number, args: Uint8Array): Promise<void>;
}

const binding = addon<PowerBinding>();

/** SG_IO of a non-data CDB (6 to 16 bytes) on the threadpool; `sense` (18 to 255 bytes) is filled. */
export function ataSgIo(fd: number, cdb: Uint8Array, sense: Uint8Array, timeoutMs = 15_000): Promise<SgIoResult> {
  validateFd(fd);
  validateBytes(cdb, 'cdb');
  validateBytes(sense, 'sense');
  if (cdb.byteLength < 6 || cdb.byteLength > 16) throw outOfRange('cdb.byteLength', '>= 6 && <= 16', cdb.byteLength);
  if (sense.byteLength < 18 || sense.byteLength > 255) throw outOfRange('sense.byteLength', '>= 18 && <= 255', sense.byteLength);
  validateInteger(timeoutMs, 'timeoutMs', 1, 3_600_000);
  return binding.ataSgIo(fd, cdb, sense, timeoutMs);
}

/**
 * HDIO_DRIVE_CMD with args [command, count, feature, sectors] followed by room for `sectors` × 512
 * bytes of data; the kernel writes [status, error, count] and the data back.
 */
export function hdioDriveCmd(fd: number, args: Uint8Array): Promise<void> {
  validateFd(fd);
  validateBytes(args, 'args');
  const need = args.byteLength < 4 ? 4 : 4 + 512 * args[3]!;
  if (args.byteLength < need) throw outOfRange('args.byteLength', `>= ${need} (4 + 512 per sector of args[3])`, args.byteLength);
  return binding.hdioDriveCmd(fd, args);
}
