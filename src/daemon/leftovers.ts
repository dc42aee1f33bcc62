// What a daemon leaves behind when it dies without detaching (kill -9, OOM, a crash), and taking it
// back. Every daemon keeps a record, RUN_DIR/NAME.json, from the first moment of its start to the
// last of its detach: which process it is (pid and start time, so a recycled pid is no match),
// which device and frontend. A record whose process is gone marks leftovers: for /dev/loopN the
// loop device still bound to the FUSE file of the dead daemon, the FUSE mount, an orphaned nbdfuse,
// stale sockets; for /dev/nbdN a connected NBD device. The next attach of the same name (what
// systemd's Restart=on-failure runs), `detach` and `status` find them, let them go in the order
// they were made, and say "recovered after an unclean shutdown". The cache itself needs nothing
// here: CacheStore.open recovers its dirty set from the metadata.
import { closeSync, openSync, promises as fsp, writeSync } from 'node:fs';
import { join } from 'node:path';
import { DeviceBusyError, InternalError } from '../errors.js';
import { blockDeviceUsers, describeUsers, exists, isMountpoint, listDir, readTrim, sleep } from '../sys.js';
import { run } from '../bdev/programs.js';
import type { FrontendKind } from '../bdev/frontend.js';

/** RUN_DIR/NAME.json: one running (or dead) daemon. */
export interface DaemonRecord {
  pid: number;
  /** The process's start time (/proc/PID/stat, clock ticks since boot): tells a recycled pid apart. */
  startTime: number;
  name: string;
  device: string;
  frontend: FrontendKind;
  startedAt: number;
}

/** What a recovery let go, in words for the log and the commands' output. */
export interface Recovery {
  /** The dead daemon's pid, if its record was found. */
  pid: number | null;
  device: string;
  /** One phrase per thing let go: "unbound /dev/loop2 from the dead FUSE file", ... */
  steps: string[];
}

export function recordPath(runBase: string, name: string): string {
  return join(runBase, `${name}.json`);
}

/** Start time of a process (field 22 of /proc/PID/stat), or null if there is no such process. */
export async function processStartTime(pid: number): Promise<number | null> {
  const stat = await readTrim(`/proc/${pid}/stat`);
  if (!stat) return null;
  // The command name (field 2) is in parentheses and may hold spaces: count from its end.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const state = fields[0];
  if (state === 'Z' || state === 'X') return null;
  const start = Number(fields[19]);
  return Number.isFinite(start) ? start : null;
}

/** True while the process the record names is running. */
export async function isAlive(record: Pick<DaemonRecord, 'pid' | 'startTime'>): Promise<boolean> {
  return (await processStartTime(record.pid)) === record.startTime;
}

export async function readRecord(runBase: string, name: string): Promise<DaemonRecord | null> {
  let text: string;
  try {
    text = await fsp.readFile(recordPath(runBase, name), 'utf8');
  } catch {
    return null;
  }
  try {
    const r = JSON.parse(text) as DaemonRecord;
    if (Number.isInteger(r.pid) && Number.isFinite(r.startTime) && typeof r.device === 'string') return { ...r, name };
  } catch {
    // a torn record (a crash while writing it): treated as no record
  }
  return null;
}

/** Every record under `runBase`, found by name or by the device it serves. */
export async function findRecord(runBase: string, deviceOrName: string, name: string): Promise<DaemonRecord | null> {
  const byName = await readRecord(runBase, name);
  if (byName) return byName;
  // A device's short name (loop3) means /dev/loop3, as resolveDaemon reads it: a daemon named
  // otherwise ("loop" for plain /dev/loop, or --name) that died is found by it too (newuser8 item
  // 5: 'status loop3' said "no attached device is named loop3" while 'status' listed it DEAD).
  const device = /^(loop|nbd|uloop|ublkb)\d+$/.test(deviceOrName) ? `/dev/${deviceOrName}` : deviceOrName;
  for (const file of await listDir(runBase)) {
    if (!file.endsWith('.json')) continue;
    const r = await readRecord(runBase, file.slice(0, -'.json'.length));
    if (r && r.device === device) return r;
  }
  return null;
}

/**
 * The refusal of an attach whose name a live daemon holds: names that daemon's device and pid
 * (from `other`, its record, when there is one) and what to do. `device` is this attach's DEVICE;
 * `explicit` says the name was given with --name (else it is DEVICE's default name: /dev/loop,
 * whichever loop device it binds, is always "loop").
 */
export function nameTaken(name: string, other: Pick<DaemonRecord, 'pid' | 'device'> | null, device: string, explicit: boolean): DeviceBusyError {
  const holder = other ? `the ulobdev daemon of ${other.device} (pid ${other.pid})` : 'a running ulobdev daemon';
  if (!explicit && other?.device === device) {
    return new DeviceBusyError(`${device} is already served by ${holder}, named "${name}"; detach it first (ulobdev detach ${name})`);
  }
  const which = explicit ? `the name "${name}"` : `${device}'s default name "${name}"`;
  return new DeviceBusyError(`${which} is taken by ${holder}: give this attach ${explicit ? 'another' : 'its own'} --name, or detach that one first (ulobdev detach ${name})`);
}

/**
 * Claims NAME for this process: writes the record, exclusively. A record of a live daemon refuses
 * (DeviceBusyError); one of a dead daemon is recovered first (recoverLeftovers), and what that did
 * is returned. Called before anything else of the attach exists.
 */
export async function claimName(
  runBase: string,
  record: Omit<DaemonRecord, 'pid' | 'startTime' | 'startedAt'>,
  explicit = true,
): Promise<Recovery | null> {
  await fsp.mkdir(runBase, { recursive: true, mode: 0o700 });
  const startTime = await processStartTime(process.pid);
  if (startTime === null) throw new InternalError('cannot read this process start time from /proc/self/stat');
  const mine: DaemonRecord = { ...record, pid: process.pid, startTime, startedAt: Date.now() };
  let recovery: Recovery | null = null;
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fd = openSync(recordPath(runBase, record.name), 'wx', 0o600);
      try {
        writeSync(fd, `${JSON.stringify(mine)}\n`);
      } finally {
        closeSync(fd);
      }
      return recovery;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const other = await readRecord(runBase, record.name);
    if (other && (await isAlive(other))) {
      throw nameTaken(record.name, other, record.device, explicit);
    }
    recovery = await recoverLeftovers(runBase, record.name, other ?? { ...record, pid: 0 });
    await fsp.rm(recordPath(runBase, record.name), { force: true });
  }
  throw new DeviceBusyError(`another ulobdev is starting as ${record.name} at the same time; try again`);
}

/**
 * Names in this process's record the device its frontend took, when that was chosen at attach
 * (/dev/loop: the first free loop device), so `detach /dev/loopN` and `status` find it by device.
 * Written to a temporary file and renamed over the record: a crash leaves the old or the new one.
 */
export async function updateRecordDevice(runBase: string, name: string, device: string): Promise<void> {
  const r = await readRecord(runBase, name);
  if (!r || r.pid !== process.pid) return;
  const tmp = `${recordPath(runBase, name)}.${process.pid}.tmp`;
  await fsp.writeFile(tmp, `${JSON.stringify({ ...r, device })}\n`, { mode: 0o600 });
  await fsp.rename(tmp, recordPath(runBase, name));
}

/** Removes this process's record (the last step of a detach, or of an attach that failed). */
export async function releaseName(runBase: string, name: string): Promise<void> {
  const r = await readRecord(runBase, name);
  if (!r || r.pid === process.pid) await fsp.rm(recordPath(runBase, name), { force: true });
}

/**
 * Lets go of what the dead daemon `name` left, in the reverse order of its attach: the frontend
 * (the loop device bound to its FUSE file, refused while anything uses it, or the connected NBD
 * device), nbdfuse, the FUSE mount, its sockets and run directory, its record. Refused, changing
 * nothing, while the device is mounted or open: that is the user's to let go first. Returns what
 * was done; `steps` is empty when nothing was left.
 */
export async function recoverLeftovers(
  runBase: string,
  name: string,
  dead: Pick<DaemonRecord, 'pid' | 'device'> & Partial<DaemonRecord>,
): Promise<Recovery> {
  const runDir = join(runBase, name);
  const fuseDir = join(runDir, 'fuse');
  const fuseFile = join(fuseDir, 'disk');
  const steps: string[] = [];
  const who = dead.pid > 0 ? `the daemon (pid ${dead.pid}) that served it died` : 'its daemon died';

  // Loop devices still bound to the dead FUSE file: compared by the path sysfs keeps, without
  // touching the file (a stat of it could hang on a FUSE mount that no longer answers).
  const loops: string[] = [];
  for (const entry of await listDir('/sys/block')) {
    if (/^loop\d+$/.test(entry) && (await readTrim(`/sys/block/${entry}/loop/backing_file`)) === fuseFile) loops.push(entry);
  }
  for (const loop of loops) {
    const users = await blockDeviceUsers(`/sys/block/${loop}`);
    if (users.length > 0) {
      throw new DeviceBusyError(
        `/dev/${loop} is left over from an unclean shutdown (${who}) and its I/O fails, but ${describeUsers(users)}; let go of it (umount) and run the command again`,
      );
    }
  }
  const nbd = /^\/dev\/(nbd\d+)$/.exec(dead.frontend === 'nbd' || dead.frontend === undefined ? dead.device : '')?.[1];
  const nbdConnected = nbd !== undefined && (await readTrim(`/sys/block/${nbd}/pid`)) !== undefined;
  if (nbdConnected) {
    const users = await blockDeviceUsers(`/sys/block/${nbd}`);
    if (users.length > 0) {
      throw new DeviceBusyError(
        `/dev/${nbd} is left over from an unclean shutdown (${who}) and its I/O fails, but ${describeUsers(users)}; let go of it (umount) and run the command again`,
      );
    }
  }

  for (const loop of loops) {
    // The driver may let go by itself meanwhile (autoclear at the last close: systemd unmounting
    // the filesystem of the dead device as the daemon restarts); losetup -d then fails with ENXIO.
    await run('losetup', ['-d', `/dev/${loop}`]).catch(async (err: unknown) => {
      if (await readTrim(`/sys/block/${loop}/loop/backing_file`)) throw err;
    });
    const deadline = Date.now() + 10_000;
    while ((await readTrim(`/sys/block/${loop}/loop/backing_file`)) && Date.now() < deadline) await sleep(20);
    steps.push(`unbound /dev/${loop} from the dead FUSE file`);
  }
  if (nbdConnected) {
    await run('nbd-client', ['-d', `/dev/${nbd}`]);
    steps.push(`disconnected /dev/${nbd}`);
  }

  // nbdfuse outlives its server until the next request: stopped by its pid file, and only if that
  // pid is still the nbdfuse of this run directory.
  const fusePid = Number(await readTrim(join(runDir, 'nbdfuse.pid')));
  if (Number.isInteger(fusePid) && fusePid > 0 && (await processStartTime(fusePid)) !== null) {
    const cmdline = (await fsp.readFile(`/proc/${fusePid}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (cmdline.some((a) => a.endsWith('nbdfuse')) && cmdline.includes(fuseFile)) {
      await stopProcess(fusePid);
      steps.push(`stopped the orphaned nbdfuse (pid ${fusePid})`);
    }
  }
  if (await isMountpoint(fuseDir)) {
    // Lazily: the mount may no longer answer, and nothing uses it any more.
    await run('fusermount3', ['-u', '-z', fuseDir]).catch(() => run('umount', ['-l', fuseDir]));
    steps.push(`unmounted ${fuseDir}`);
  }
  if (await isMountpoint(fuseDir)) throw new InternalError(`cannot unmount ${fuseDir} left over from an unclean shutdown`);

  const sockets = [join(runBase, `${name}.sock`), join(runDir, 'nbd.sock')];
  let removed = false;
  for (const p of sockets) if (await exists(p)) removed = true;
  if ((await exists(runDir)) || removed) {
    for (const p of sockets) await fsp.rm(p, { force: true });
    await fsp.rm(runDir, { recursive: true, force: true });
    steps.push(`removed its sockets and ${runDir}`);
  }
  return { pid: dead.pid > 0 ? dead.pid : null, device: dead.device, steps };
}

/** The words every command uses for a recovery that did something. */
export function describeRecovery(r: Recovery): string {
  const whose = r.pid !== null ? `the daemon of ${r.device} (pid ${r.pid}) had died` : `the daemon of ${r.device} had died`;
  return `recovered after an unclean shutdown: ${whose}; ${r.steps.join(', ')}`;
}

async function stopProcess(pid: number): Promise<void> {
  const start = await processStartTime(pid);
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return;
  }
  const deadline = Date.now() + 3000;
  while (Date.now() < deadline) {
    if ((await processStartTime(pid)) !== start) return;
    await sleep(20);
  }
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone meanwhile
  }
}

/**
 * For `detach` and `status` when no daemon answers for DEVICE or NAME: if its record names a
 * process that is gone (or there is no record but leftovers of that name exist), lets go of the
 * leftovers. Null when a daemon of that name is alive (it may just be slow to answer) or nothing
 * was left at all.
 */
export async function recoverDeadDaemon(runBase: string, deviceOrName: string, name: string): Promise<Recovery | null> {
  const record = await findRecord(runBase, deviceOrName, name);
  if (record && (await isAlive(record))) return null;
  const owner = record?.name ?? name;
  const recovery = await recoverLeftovers(runBase, owner, record ?? { pid: 0, device: deviceOrName });
  if (record) {
    await fsp.rm(recordPath(runBase, owner), { force: true });
    if (recovery.steps.length === 0) recovery.steps.push('nothing else was left');
  }
  return recovery.steps.length > 0 ? recovery : null;
}

/** Records under `runBase` whose process is gone. */
export async function deadRecords(runBase: string): Promise<DaemonRecord[]> {
  const out: DaemonRecord[] = [];
  for (const file of await listDir(runBase)) {
    if (!file.endsWith('.json')) continue;
    const r = await readRecord(runBase, file.slice(0, -'.json'.length));
    if (r && !(await isAlive(r))) out.push(r);
  }
  return out;
}
