// Partitions of a frontend's device: making them appear once it is bound, and the check detach
// and SIGTERM make on every frontend, before they change anything, that neither the device nor any
// partition of it is in use.
import type { Logger } from 'pino';
import { DeviceBusyError } from '../errors.js';
import { blockDeviceUsers, describeUsers, partitionsOf, type BlockDeviceUser } from '../sys.js';
import { run } from './programs.js';

/**
 * Makes the partitions of a freshly bound device appear (/dev/loopNpM). The frontend asks the
 * kernel to scan (loop's --partscan); a kernel built without the table's parser finds none, so
 * then partx reads the table in userspace and adds them (BLKPG), as it would on the bare disk. A
 * device without a partition table stays as it is. Never fails the attach.
 */
export async function showPartitions(device: string, sys: string, logger: Logger): Promise<void> {
  if ((await partitionsOf(sys)).length > 0) return;
  try {
    await run('partx', ['--add', device]);
    const found = await partitionsOf(sys);
    if (found.length > 0) logger.info({ partitions: found.map((p) => `/dev/${p.name}`) }, 'partitions added from the partition table (partx)');
  } catch {
    // No partition table (or no partx): a whole-disk filesystem, nothing to show.
  }
}

/** How long assertReleasable waits for processes that only have the device open to close it (ms). */
export const OPENER_GRACE_MS = 2000;

/**
 * Refuses (DeviceBusyError) while the device or a partition of it is mounted, held, claimed or
 * open: one line naming each user and what to do. When every user is only a process with the
 * device open (no mount, holder or claim), it looks again for up to `graceMs` first: `losetup -a`,
 * blkid and monitoring tools open a device for a moment (a detach during a `losetup -a` elsewhere
 * was refused: session 13's clean-clone run).
 */
export async function assertReleasable(device: string, sys: string, graceMs = OPENER_GRACE_MS): Promise<void> {
  let users = await blockDeviceUsers(sys);
  const until = Date.now() + graceMs;
  while (users.length > 0 && users.every((u) => u.kind === 'open') && Date.now() < until) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    users = await blockDeviceUsers(sys);
  }
  if (users.length === 0) return;
  throw new DeviceBusyError(`${device} stays attached: ${describeUsers(users)}; ${releaseAdvice(users)}`, { use: users[0]!.text });
}

/**
 * What to do about the users blockDeviceUsers() listed (at least one), by the first one's kind:
 * "unmount it first", or "them" for several (newuser11: two partitions mounted).
 */
export function releaseAdvice(users: readonly BlockDeviceUser[]): string {
  const it = users.length > 1 ? 'them' : 'it';
  const kind = users[0]!.kind;
  return kind === 'mounted' ? `unmount ${it} first` : kind === 'held' ? `remove what is stacked on ${it} first` : `stop or close ${it} first`;
}
