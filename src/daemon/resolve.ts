// Finding the daemon a command means. Every command takes the device (/dev/loop3, an NBD URL) or
// the --name given at attach; a daemon listens on RUN_DIR/NAME.sock, and its name is the device's
// short form unless --name said otherwise, so a device is found by asking the daemons which one
// serves it (status). A device or name nobody serves is one line that says so, without the
// internal socket path.
import { promises as fsp } from 'node:fs';
import { join, resolve } from 'node:path';
import { InvalidArgumentError, NotAttachedError, PermissionDeniedError } from '../errors.js';
import { defaultName } from '../bdev/frontend.js';
import { RUN_DIR } from '../paths.js';
import { controlRequest } from './control.js';
import { checkDaemonName, type DeviceStatus } from './daemon.js';

/** One running daemon: its name, control socket and current status. */
export interface DaemonEntry {
  name: string;
  socket: string;
  status: DeviceStatus;
}

/** How long a daemon may take to answer `status` while the others are looked up. */
const STATUS_TIMEOUT_MS = 10_000;

/** True when DEVICE-OR-NAME is a name (no slash, no scheme), false for a device or NBD URL. */
export function isDaemonName(deviceOrName: string): boolean {
  return !deviceOrName.includes('/') && !deviceOrName.includes(':');
}

/**
 * Every daemon answering on a control socket in `runDir`, with its status, in name order. Sockets
 * nobody listens on (a daemon that crashed) are skipped. PermissionDeniedError when `runDir`
 * cannot be read (it is root's, mode 0700); a daemon that listens but does not answer (stopped,
 * hung: DaemonTimeoutError, DaemonError) throws its error, as surveyDaemons' first failure.
 */
export async function listDaemons(runDir = RUN_DIR): Promise<DaemonEntry[]> {
  const { entries, failures } = await surveyDaemons(runDir);
  if (failures.length > 0) throw failures[0]!.error;
  return entries;
}

/** A daemon whose socket is there but which did not answer `status`. */
export interface DaemonFailure {
  name: string;
  socket: string;
  error: unknown;
}

/**
 * listDaemons that does not stop at the first daemon that fails to answer: the ones that answered
 * (`entries`, in name order), and those that listen but did not answer (`failures`), so `ulobdev
 * status` can show every device and mark the one that is stuck. PermissionDeniedError as listDaemons.
 */
export async function surveyDaemons(runDir = RUN_DIR): Promise<{ entries: DaemonEntry[]; failures: DaemonFailure[] }> {
  let names: string[];
  try {
    names = await fsp.readdir(runDir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return { entries: [], failures: [] };
    if (code === 'EACCES' || code === 'EPERM') throw new PermissionDeniedError(`cannot read ${runDir}: ${code} (run as root)`, { cause: err });
    throw err;
  }
  const sockets = names.filter((n) => n.endsWith('.sock')).sort();
  const answers = await Promise.all(
    sockets.map(async (file): Promise<{ entry: DaemonEntry } | { failure: DaemonFailure } | null> => {
      const socket = join(runDir, file);
      const name = file.slice(0, -'.sock'.length);
      try {
        const { status } = (await controlRequest(socket, { cmd: 'status' }, STATUS_TIMEOUT_MS)) as { status: DeviceStatus };
        return { entry: { name, socket, status } };
      } catch (err) {
        if (err instanceof NotAttachedError) return null;
        return { failure: { name, socket, error: err } };
      }
    }),
  );
  const entries: DaemonEntry[] = [];
  const failures: DaemonFailure[] = [];
  for (const a of answers) {
    if (a === null) continue;
    if ('entry' in a) entries.push(a.entry);
    else failures.push(a.failure);
  }
  return { entries, failures };
}

/**
 * The control socket of the daemon that `deviceOrName` means: a name's own socket, or for a device
 * the daemon whose status says it serves that device (its default name first, then every daemon,
 * so `--name data` is found from /dev/loop3 too). A device's short name nobody has taken (loop3)
 * means that device. NotAttachedError when none does; when it names the disk a daemon caches, that
 * error names the daemon's device (newuser14 F5d).
 */
export async function resolveDaemon(deviceOrName: string, runDir = RUN_DIR): Promise<{ name: string; socket: string }> {
  const notAttached = () =>
    new NotAttachedError(
      isDaemonName(deviceOrName)
        ? `no attached device is named ${JSON.stringify(deviceOrName)}; 'ulobdev status' lists what is attached`
        : `${deviceOrName} is not attached (no ulobdev daemon serves it); 'ulobdev status' lists what is attached`,
    );
  if (isDaemonName(deviceOrName)) {
    checkNameArgument(deviceOrName);
    const socket = join(runDir, `${deviceOrName}.sock`);
    if (await fsp.lstat(socket).catch(() => null)) return { name: deviceOrName, socket };
    // A device's short name (loop2) also finds the daemon serving /dev/loop2 under another name:
    // plain /dev/loop is named "loop" whichever loop device it binds.
    if (/^(loop|nbd|uloop|ublkb)\d+$/.test(deviceOrName)) {
      return resolveDaemon(`/dev/${deviceOrName}`, runDir).catch((err: unknown) => {
        throw err instanceof NotAttachedError ? notAttached() : err;
      });
    }
    throw notAttached();
  }
  // The common case first: no --name, so the socket is the device's default name.
  let guess: string | undefined;
  try {
    guess = defaultName(deviceOrName);
  } catch {
    // not a device name ulobdev makes; only a daemon's own status can tell
  }
  if (guess !== undefined) {
    const socket = join(runDir, `${guess}.sock`);
    const status = await controlRequest(socket, { cmd: 'status' }, STATUS_TIMEOUT_MS).then(
      (r) => r.status as DeviceStatus,
      (err: unknown) => {
        if (err instanceof NotAttachedError) return undefined;
        throw err;
      },
    );
    if (status && (await sameDevice(status.device, deviceOrName))) return { name: guess, socket };
  }
  const daemons = await listDaemons(runDir);
  for (const entry of daemons) {
    if (await sameDevice(entry.status.device, deviceOrName)) return { name: entry.name, socket: entry.socket };
  }
  // The disk given where its device is meant, as bcache's tools take the backing disk (newuser14 F5d).
  for (const entry of daemons) {
    if (await sameDevice(entry.status.backing, deviceOrName)) {
      throw new NotAttachedError(`${deviceOrName} is the disk that ${entry.status.device} (pid ${entry.status.pid}) caches, not a device of ours: give ${entry.status.device} instead`);
    }
  }
  throw notAttached();
}

/** Two spellings of one device: equal, or device paths that resolve to the same node. */
async function sameDevice(a: string, b: string): Promise<boolean> {
  if (a === b) return true;
  if (!a.startsWith('/') || !b.startsWith('/')) return false;
  const [ra, rb] = await Promise.all([fsp.realpath(a).catch(() => resolve(a)), fsp.realpath(b).catch(() => resolve(b))]);
  return ra === rb;
}

function checkNameArgument(name: string): void {
  try {
    checkDaemonName(name);
  } catch {
    throw new InvalidArgumentError(`${JSON.stringify(name)} is neither a device (/dev/loopN, /dev/nbdN, /dev/uloopN, an NBD URL) nor a name given with --name`);
  }
}
