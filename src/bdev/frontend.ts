// The DEVICE argument picks the frontend: /dev/loopN (loop over a FUSE-exported file), /dev/nbdN
// (the kernel NBD client), an NBD URL (serve only), /dev/uloopN (our kernel module, kernel/uloop.c),
// /dev/ublkbN (the kernel's ublk driver, served by native/ublk.cc).
import { InvalidArgumentError } from '../errors.js';

export type FrontendKind = 'loop' | 'nbd' | 'serve' | 'uloop' | 'ublk';

/** An attached frontend. detach() stops it; the NBD server and engine are closed by the caller. */
export interface Frontend {
  readonly kind: FrontendKind;
  /** The device it serves: /dev/loop6 (also when /dev/loop was asked for), /dev/nbd0 or the NBD URL. */
  readonly device: string;
  /**
   * Unbinds the device; refused (DeviceBusyError) while it is mounted or held, and nothing
   * changes. With `force` (the daemon is stopping and waited long enough) it lets go anyway: the
   * device is unbound as far as the kernel allows while it is in use, and further I/O on it fails.
   */
  detach(options?: { force?: boolean }): Promise<void>;
}

/** Every form DEVICE takes, for help texts and the refusal of any other: one list for both commands. */
export const DEVICE_FORMS =
  '/dev/loopN (/dev/loop: the first free one), /dev/nbdN, /dev/uloopN, /dev/ublkbN (/dev/ublkb: the next free one), nbd+unix:///?socket=PATH or nbd://HOST:PORT';

/** `/dev/loop` without a number: the first free loop device, as `losetup -f`. */
export const ANY_LOOP = '/dev/loop';

export function frontendKind(device: string): FrontendKind {
  if (/^\/dev\/loop\d*$/.test(device)) return 'loop';
  if (/^\/dev\/nbd\d+$/.test(device)) return 'nbd';
  if (/^\/dev\/uloop\d+$/.test(device)) return 'uloop';
  if (/^\/dev\/ublkb\d*$/.test(device)) return 'ublk';
  if (/^nbd(\+unix)?:\/\//.test(device)) return 'serve';
  throw new InvalidArgumentError(`DEVICE must be ${DEVICE_FORMS}, got ${JSON.stringify(device)}`);
}

/** Short name for the daemon's run directory and control socket: loop6, nbd0, or the URL's socket/port. */
export function defaultName(device: string): string {
  const kind = frontendKind(device);
  if (kind !== 'serve') return device.slice('/dev/'.length);
  return 'nbd-' + device.replace(/^nbd(\+unix)?:\/\//, '').replace(/[^A-Za-z0-9.-]+/g, '_').replace(/^_+|_+$/g, '');
}
