// Small readers of /proc and /sys shared by the backing-disk checks and the frontends.
import { spawnSync } from 'node:child_process';
import { closeSync, constants as fsc, openSync, promises as fsp } from 'node:fs';
import { basename, join } from 'node:path';

/** A sysfs/procfs file's trimmed text, or undefined when it is missing or empty. */
export async function readTrim(path: string): Promise<string | undefined> {
  try {
    const text = (await fsp.readFile(path, 'utf8')).trim();
    return text.length > 0 ? text : undefined;
  } catch {
    return undefined;
  }
}

export async function listDir(path: string): Promise<string[]> {
  try {
    return await fsp.readdir(path);
  } catch {
    return [];
  }
}

export async function exists(path: string): Promise<boolean> {
  try {
    await fsp.access(path);
    return true;
  } catch {
    return false;
  }
}

/** One line of /proc/self/mountinfo: the device ("maj:min"), the mount point and the mount source. */
interface MountEntry {
  majMin: string;
  point: string;
  source: string;
}

/** The lines of mountinfo `text` (proc(5)), in order; escapes (\040) undone. */
function parseMountinfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    const fields = line.split(' ');
    if (fields.length <= 4) continue;
    const dash = line.indexOf(' - ');
    const source = dash < 0 ? '' : unescapeMount(line.slice(dash + 3).split(' ')[1] ?? '');
    out.push({ majMin: fields[2]!, point: unescapeMount(fields[4]!), source });
  }
  return out;
}

async function readMountinfo(): Promise<MountEntry[]> {
  return parseMountinfo(await fsp.readFile('/proc/self/mountinfo', 'utf8'));
}

/** Mounted block devices: "maj:min" → first mount point (from /proc/self/mountinfo). */
export async function mountsByDevice(): Promise<Map<string, string>> {
  const mounts = new Map<string, string>();
  for (const m of await readMountinfo()) if (!mounts.has(m.majMin)) mounts.set(m.majMin, m.point);
  return mounts;
}

/**
 * Mount points whose mount source (mountinfo's field after the filesystem type) is `device` or a
 * partition of it (`${device}p1`, ...), in mountinfo order: for a disk deleted while mounted, which
 * sysfs no longer lists and whose maj:min no longer names it. `mountinfo`: its text (tests);
 * default /proc/self/mountinfo. Never throws for a missing file (returns []).
 */
export async function mountsOfSource(device: string, mountinfo?: string): Promise<string[]> {
  const text = mountinfo ?? (await fsp.readFile('/proc/self/mountinfo', 'utf8').catch(() => ''));
  const isPartition = (source: string) => source.startsWith(`${device}p`) && /^\d+$/.test(source.slice(device.length + 1));
  return parseMountinfo(text)
    .filter((m) => m.source === device || isPartition(m.source))
    .map((m) => m.point);
}

/** True when `dir` is a mount point. */
export async function isMountpoint(dir: string): Promise<boolean> {
  return (await readMountinfo()).some((m) => m.point === dir);
}

/** glibc's gnu_dev_major/minor encoding of a dev_t, as "maj:min". */
export function majorMinor(rdev: number): string {
  const major = ((rdev >>> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >>> 12) & ~0xff);
  return `${major}:${minor}`;
}

/**
 * The block devices `dev` ("maj:min") is built on, itself first, from sysfs: a partition's whole
 * disk, and the devices in a device-mapper or md device's `slaves/`, recursively (dm-crypt on md
 * RAID on partitions gives all of them). Each as "maj:min" → kernel name (dm-0, md0, sdb1, sdb).
 * A loop device's backing file is not a block device and is not followed. `sys` is the sysfs root
 * (tests pass a fake tree). Missing entries end the walk there; never throws.
 */
export async function blockStack(dev: string, sys = '/sys'): Promise<Map<string, string>> {
  const found = new Map<string, string>();
  const todo = [dev];
  while (todo.length > 0 && found.size < 256) {
    const mm = todo.shift()!;
    if (found.has(mm)) continue;
    let real: string;
    try {
      real = await fsp.realpath(join(sys, 'dev/block', mm));
    } catch {
      continue;
    }
    found.set(mm, basename(real));
    if (await exists(join(real, 'partition'))) {
      const parent = await readTrim(join(real, '..', 'dev'));
      if (parent) todo.push(parent);
    }
    for (const s of await listDir(join(real, 'slaves'))) {
      const below = await readTrim(join(real, 'slaves', s, 'dev'));
      if (below) todo.push(below);
    }
  }
  return found;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// mountinfo escapes space, tab, newline and backslash as octal.
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** A block device or one of its partitions, as sysfs names it. */
export interface BlockDeviceNode {
  /** Kernel name: loop3, loop3p1, sdb2. */
  name: string;
  /** "maj:min". */
  dev: string;
  /** Its sysfs directory (/sys/block/loop3/loop3p1). */
  sysDir: string;
}

/** The partitions of the disk whose sysfs directory is `sysDir` (subdirectories with a `partition` file). */
export async function partitionsOf(sysDir: string): Promise<BlockDeviceNode[]> {
  const out: BlockDeviceNode[] = [];
  for (const name of (await listDir(sysDir)).sort()) {
    const dir = join(sysDir, name);
    if (!(await exists(join(dir, 'partition')))) continue;
    const dev = await readTrim(join(dir, 'dev'));
    if (dev) out.push({ name, dev, sysDir: dir });
  }
  return out;
}

/** One use of a block device, as blockDeviceUsers finds it: its kind, and one phrase for a message. */
export interface BlockDeviceUser {
  kind: 'mounted' | 'held' | 'claimed' | 'open';
  /** "/dev/loop3 is mounted on /mnt", "/dev/loop3 is open by pid 9 (dd)", ... */
  text: string;
}

/** The phrases of `users`, joined for one line: "A is mounted on /m; B is open by pid 9 (dd)". */
export function describeUsers(users: readonly BlockDeviceUser[]): string {
  return users.map((u) => u.text).join('; ');
}

/**
 * Why a disk cannot be let go now, one reason per user, for the disk and each of its partitions:
 * mounted (mountinfo), held by device-mapper or md (sysfs holders), claimed exclusively by anything
 * else (swap, another ulobdev, a filesystem being made: an O_EXCL open fails with EBUSY) or open by
 * a process (its /proc/PID/fd). Empty when nothing uses it. Reads only kernel state: the disk is
 * not touched. Processes in `ignorePids` (the caller) and udev's short-lived probes do not count.
 */
export async function blockDeviceUsers(sysDir: string, options: { ignorePids?: readonly number[] } = {}): Promise<BlockDeviceUser[]> {
  const real = await fsp.realpath(sysDir);
  const whole: BlockDeviceNode = { name: basename(real), dev: (await readTrim(join(real, 'dev'))) ?? '', sysDir: real };
  const nodes = [whole, ...(await partitionsOf(real))];
  const reasons: BlockDeviceUser[] = [];
  const mounts = await mountsByDevice();
  for (const n of nodes) {
    const mount = mounts.get(n.dev);
    if (mount) reasons.push({ kind: 'mounted', text: `/dev/${n.name} is mounted on ${mount}` });
    const holders = await listDir(join(n.sysDir, 'holders'));
    if (holders.length > 0) reasons.push({ kind: 'held', text: `/dev/${n.name} is held by ${holders.join(', ')}` });
  }
  if (reasons.length === 0) {
    // Exclusive claims without a mount or a holder: swap, btrfs, another ulobdev's backing disk.
    // Claiming the whole disk fails while any partition is claimed, so probe the partitions first
    // to name the right one.
    for (const n of [...nodes.slice(1), whole]) {
      if (exclusivelyClaimed(`/dev/${n.name}`)) {
        reasons.push({ kind: 'claimed', text: `/dev/${n.name} is claimed by another program (swap, a filesystem or another block device layer)` });
        break;
      }
    }
  }
  const ignore = new Set([process.pid, ...(options.ignorePids ?? [])]);
  for (const [pid, name] of await openersOf(new Set(nodes.map((n) => n.dev)), ignore)) {
    reasons.push({ kind: 'open', text: `/dev/${nodes.find((n) => n.dev === name.dev)!.name} is open by pid ${pid} (${name.comm})` });
  }
  return reasons;
}

function exclusivelyClaimed(path: string): boolean {
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDONLY | fsc.O_EXCL | fsc.O_NONBLOCK);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EBUSY';
  }
  closeSync(fd);
  return false;
}

/** Processes with an open fd on any of the devices ("maj:min"), as pid → which device and the process name. */
async function openersOf(devs: ReadonlySet<string>, ignore: ReadonlySet<number>): Promise<Map<number, { dev: string; comm: string }>> {
  const found = new Map<number, { dev: string; comm: string }>();
  for (const entry of await listDir('/proc')) {
    if (!/^\d+$/.test(entry) || ignore.has(Number(entry))) continue;
    const fdDir = `/proc/${entry}/fd`;
    for (const fd of await listDir(fdDir)) {
      let st;
      try {
        // By the path the link names, and only under /dev: a stat through the fd itself would ask
        // the file's filesystem, and a FUSE mount that no longer answers would hang it.
        const target = await fsp.readlink(join(fdDir, fd));
        if (!target.startsWith('/dev/')) continue;
        st = await fsp.stat(target);
      } catch {
        continue;
      }
      if (!st.isBlockDevice()) continue;
      const dev = majorMinor(st.rdev);
      if (!devs.has(dev)) continue;
      const comm = (await readTrim(`/proc/${entry}/comm`)) ?? '?';
      // udev opens new devices for a moment to probe them; that is no user of the disk.
      if (comm === 'systemd-udevd' || comm === '(udev-worker)') continue;
      found.set(Number(entry), { dev, comm });
      break;
    }
  }
  return found;
}

/**
 * For race tests: when $ULOBDEV_PAUSE_FILE names a file that holds `NAME MS`, waits MS ms at the
 * point named NAME (test/vm/ublk.test.ts writes the file while the daemon runs); with `NAME PATH`
 * (an absolute path) it waits until PATH exists, a gate the test opens once what it needs has
 * happened (test/vm/uloop-pit.test.ts), at most 10 minutes. No-op otherwise.
 */
export async function pausePoint(name: string): Promise<void> {
  const file = process.env.ULOBDEV_PAUSE_FILE;
  if (!file) return;
  let said: string;
  try {
    said = (await fsp.readFile(file, 'utf8')).trim();
  } catch {
    return;
  }
  const [at, arg] = said.split(/\s+/);
  if (at !== name) return;
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  if (arg?.startsWith('/')) {
    const end = Date.now() + 600_000;
    while (Date.now() < end && !(await fsp.access(arg).then(() => true, () => false))) await sleep(20);
    return;
  }
  await sleep(Number(arg) || 3000);
}

/**
 * For crash tests: SIGKILLs this process at the named point of its work when the environment
 * variable ULOBDEV_CRASH_AT names it (test/integration/crash-leftovers.test.ts). No-op otherwise.
 */
export function crashPoint(name: string): void {
  if (process.env.ULOBDEV_CRASH_AT === name) process.kill(process.pid, 'SIGKILL');
}

const startPhases: Record<string, number> = {};

/**
 * Records when this process's start first reached `phase`, in ms since the process began
 * (performance.now(): node's own start included). The attach line logs them (`startMs`): where a
 * restart's time goes (module loading, checks, store open, the ATTACH ioctl).
 */
export function markStart(phase: string): void {
  startPhases[phase] ??= Math.round(performance.now());
}

/** The phases markStart recorded so far, in the order reached. */
export function startTimes(): Readonly<Record<string, number>> {
  return startPhases;
}

/**
 * Runs `modprobe NAME` as a sysadmin would (sbin directories on PATH, at most 60 s). Returns
 * whether it exited 0 and its last line of stderr (or why it did not run) for the caller's message.
 */
export function modprobe(name: string): { ok: boolean; said: string; ran: boolean; status: number | null } {
  const path = `${process.env.PATH ?? '/usr/bin:/bin'}:/usr/local/sbin:/usr/sbin:/sbin`;
  const r = spawnSync('modprobe', [name], { encoding: 'utf8', env: { ...process.env, PATH: path }, timeout: 60_000 });
  const said = `${r.stderr ?? ''}`.trim().split('\n').pop() ?? '';
  return { ok: r.status === 0, said: said || (r.error ? r.error.message : ''), ran: !r.error, status: r.status };
}
