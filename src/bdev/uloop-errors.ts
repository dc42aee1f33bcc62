// What each errno of the uloop control device (kernel/uloop.c: open, ULOOP_IOC_ADD, ATTACH) means
// for the user, as an error class of src/errors.ts whose message says what to do. Anything not
// listed stays an I/O error naming the errno.
import { readdirSync } from 'node:fs';
import {
  DeviceBusyError,
  InternalError,
  InvalidArgumentError,
  ioError,
  ModuleMissingError,
  ModuleRejectedError,
  ModuleVersionError,
  PermissionDeniedError,
  type UlobError,
} from '../errors.js';
import { ULOOP_ABI_VERSION, ULOOP_CONTROL } from '../native/uloop.js';

/** What was asked of the kernel, for the messages. */
export interface UloopRequest {
  /** The DEVICE argument, /dev/uloopN. */
  device: string;
  /** Disk size in bytes, block size in bytes and the cache file: what ADD checks. */
  size?: number;
  blockSize?: number;
  cache?: string;
}

const REBUILD = 'make -C kernel, then rmmod uloop and insmod kernel/uloop.ko once no /dev/uloopN is in use';

/**
 * The error for a failed `op` ('open' of the control device, 'ADD' or 'ATTACH'); `err` is the
 * NativeError of the call (anything else is returned as it is).
 */
export function uloopError(op: 'open' | 'ADD' | 'ATTACH', err: unknown, req: UloopRequest): unknown {
  const code = (err as { code?: unknown })?.code;
  if (typeof code !== 'string') return err;
  const { device } = req;
  const options = { cause: err };
  switch (code) {
    case 'ENOENT':
    case 'ENXIO':
    case 'ENODEV':
      if (op === 'open') return moduleMissing(device, `${ULOOP_CONTROL}: ${code}`, options);
      return new ModuleMissingError(`${device} is gone (${code}): it was removed, or the uloop module was reloaded; attach it anew`, options);
    case 'EACCES':
    case 'EPERM':
      return new PermissionDeniedError(
        op === 'open'
          ? `cannot open ${ULOOP_CONTROL} (${code}): run ulobdev as root`
          : `the uloop module refused ${op} of ${device} (${code}): the daemon needs CAP_SYS_ADMIN; run it as root, outside a container that drops it`,
        options,
      );
    case 'EPROTO':
      return new ModuleVersionError(
        `the loaded uloop module speaks another ABI than this ulobdev (version ${ULOOP_ABI_VERSION}): rebuild and reload it (${REBUILD})`,
        options,
      );
    case 'ENOSPC':
    case 'EEXIST': {
      const free = freeUloop();
      return new DeviceBusyError(`${device} is taken by another uloop device; pick a free one${free ? `, e.g. ${free}` : ''}`);
    }
    case 'EBUSY':
      if (op === 'ATTACH') return new DeviceBusyError(`another daemon serves ${device}; detach it first`);
      return new InternalError(`the uloop control fd of ${device} is attached already (EBUSY on ADD)`, options);
    case 'EINVAL':
      return new InvalidArgumentError(
        `the uloop module refused ${device} (EINVAL): it takes a disk whose size is a multiple of 512 bytes (${req.size ?? '?'}), ` +
          `a block size from 4 KiB to 1 MiB (${req.blockSize ?? '?'}), a cache that is a regular file at least the disk's size ` +
          `(${req.cache ?? '?'}) and N below 1048576; the kernel log (dmesg) says which`,
      );
    default:
      return ioError(`${op === 'open' ? 'open' : `${op} of`} ${op === 'open' ? ULOOP_CONTROL : device}`, undefined, err) as UlobError;
  }
}

/** /dev/uloop-control is missing: the module is not loaded. `detail` says how we know. */
export function moduleMissing(device: string, detail?: string, options?: { cause?: unknown }): ModuleMissingError {
  return new ModuleMissingError(
    `${device} needs the uloop kernel module${detail ? ` (${detail})` : ''}: install it with DKMS or build it (make -C kernel, then insmod kernel/uloop.ko), see docs/laptop.md; /dev/loopN and /dev/nbdN need no module of ours`,
    options,
  );
}

/**
 * `modprobe uloop` failed with `said` (its last stderr line): the kernel's refusal of the module's
 * signature as one line that says what happened and what to do, or undefined for any other failure.
 * "Key was rejected by service" is EKEYREJECTED: Secure Boot (or module.sig_enforce=1) and a module
 * unsigned or signed with a key not enrolled; "Operation not permitted" under lockdown is EPERM.
 */
export function moduleRejected(device: string, said: string, lockedDown: boolean): ModuleRejectedError | undefined {
  if (/Key was rejected by service/i.test(said)) {
    return new ModuleRejectedError(
      `${device}: the kernel refused uloop.ko (Key was rejected by service: Secure Boot loads only modules signed with an enrolled key); enrol the DKMS key with mokutil --import and reboot, see docs/laptop.md "Secure Boot"`,
    );
  }
  if (/Operation not permitted/i.test(said) && lockedDown) {
    return new ModuleRejectedError(
      `${device}: the kernel is in lockdown and refused the unsigned uloop.ko (${said}); sign it with the DKMS key and enrol that with mokutil --import, see docs/laptop.md "Secure Boot"`,
    );
  }
  return undefined;
}

/** The lowest /dev/uloopN not in use, from /sys/block; undefined if that cannot be read. */
export function freeUloop(): string | undefined {
  let names: string[];
  try {
    names = readdirSync('/sys/block');
  } catch {
    return undefined;
  }
  const used = new Set(names.flatMap((n) => (/^uloop(\d+)$/.exec(n) ? [Number(n.slice(5))] : [])));
  let n = 0;
  while (used.has(n)) n++;
  return `/dev/uloop${n}`;
}
