// /dev/nbdN frontend: the kernel's NBD client (nbd-client, netlink) connected to our server's
// private unix socket. Needs the nbd module; without it, one line says so.
import { join } from 'node:path';
import type { Logger } from 'pino';
import { DeviceBusyError, InvalidArgumentError, ModuleMissingError } from '../errors.js';
import { exists, readTrim, sleep } from '../sys.js';
import type { Frontend } from './frontend.js';
import { assertReleasable, showPartitions } from './partitions.js';
import { run } from './programs.js';

export interface NbdAttachOptions {
  device: string;
  socket: string;
  exportName: string;
  readOnly: boolean;
  /** Connections nbd-client opens (the server advertises multi-conn). */
  connections?: number;
  logger?: Logger;
  /** Logical sector size of /dev/nbdN (nbd-client -b: 512 to 4096): the disk's. Default 512. */
  sectorSize?: number;
}

/** Refuses when the nbd module is missing or the device is connected; returns its sysfs directory. */
export async function assertNbdFree(device: string): Promise<string> {
  const m = /^\/dev\/(nbd\d+)$/.exec(device);
  if (!m) throw new InvalidArgumentError(`${device} is not an NBD device name (/dev/nbdN)`);
  const sys = `/sys/block/${m[1]}`;
  if (!(await exists('/sys/module/nbd')) && !(await exists(sys))) {
    throw new ModuleMissingError(`the nbd kernel module is not loaded; run 'modprobe nbd' first`);
  }
  if (!(await exists(sys))) throw new InvalidArgumentError(`${device} does not exist (modprobe nbd nbds_max=N)`);
  if (await readTrim(join(sys, 'pid'))) throw new DeviceBusyError(`${device} is already connected; pick another one`);
  return sys;
}

export async function attachNbdDevice(options: NbdAttachOptions): Promise<Frontend> {
  const { device } = options;
  const sys = await assertNbdFree(device);

  await run('nbd-client', [
    '-unix', options.socket, device,
    '-N', options.exportName,
    // The kernel client sets the logical and physical block size to this one value.
    '-b', String(options.sectorSize ?? 512),
    '-connections', String(options.connections ?? 4),
    ...(options.readOnly ? ['-readonly'] : []),
  ]);
  if (options.logger) await showPartitions(device, sys, options.logger);
  return {
    kind: 'nbd',
    device,
    async detach(): Promise<void> {
      await assertReleasable(device, sys);
      await run('nbd-client', ['-d', device]);
      const deadline = Date.now() + 10_000;
      while ((await readTrim(join(sys, 'pid'))) && Date.now() < deadline) await sleep(20);
    },
  };
}
