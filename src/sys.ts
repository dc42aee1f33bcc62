// Small readers of /proc and /sys shared by the backing-disk checks and the frontends.
import { promises as fsp } from 'node:fs';

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

/** Mounted block devices: "maj:min" → first mount point (from /proc/self/mountinfo). */
export async function mountsByDevice(): Promise<Map<string, string>> {
  const mounts = new Map<string, string>();
  const text = await fsp.readFile('/proc/self/mountinfo', 'utf8');
  for (const line of text.split('\n')) {
    const fields = line.split(' ');
    if (fields.length > 4 && !mounts.has(fields[2]!)) mounts.set(fields[2]!, unescapeMount(fields[4]!));
  }
  return mounts;
}

/** True when `dir` is a mount point. */
export async function isMountpoint(dir: string): Promise<boolean> {
  const text = await fsp.readFile('/proc/self/mountinfo', 'utf8');
  return text.split('\n').some((line) => unescapeMount(line.split(' ')[4] ?? '') === dir);
}

/** glibc's gnu_dev_major/minor encoding of a dev_t, as "maj:min". */
export function majorMinor(rdev: number): string {
  const major = ((rdev >>> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >>> 12) & ~0xff);
  return `${major}:${minor}`;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// mountinfo escapes space, tab, newline and backslash as octal.
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}
