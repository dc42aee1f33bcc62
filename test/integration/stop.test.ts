// Stopping under systemd (SIGTERM to a foreground daemon, as ulobdev@.service stops it) with the
// device still mounted: the daemon waits a bounded time for the unmount, flushes as the policy
// says, and exits; a device still mounted then is let go with one log line that says what happened
// and how to order the mount. Never the 30 minutes of TimeoutStopSec. Real loop devices, ext4.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CLI, mustSh, prepareCliTests, scratch, sh, testEnv } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
let daemon: { child: ChildProcess; stderr: () => string; exited: Promise<number | null> } | null = null;
const mounts: string[] = [];

beforeAll(() => {
  prepareCliTests();
});

afterEach(async () => {
  for (const m of mounts.splice(0)) sh('umount', ['-l', m]);
  if (daemon) {
    daemon.child.kill('SIGKILL');
    await daemon.exited;
    daemon = null;
  }
  // Loop devices bound to this test's FUSE files (a failed run); autoclear ones go by themselves.
  for (const line of sh('losetup', ['-a']).stdout.split('\n')) {
    if (s && line.includes(s.dir)) sh('losetup', ['-d', line.split(':')[0]!]);
  }
  if (s) {
    for (const line of readFileSync('/proc/mounts', 'utf8').split('\n')) {
      const at = line.split(' ')[1];
      if (at?.startsWith(s.dir)) sh('umount', ['-l', at]);
    }
    s.cleanup();
  }
});

/** Starts `ulobdev ... /dev/loop DISK` in the foreground; resolves with the device once it serves. */
async function start(args: string[], env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: testEnv(args, env) });
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  daemon = { child, stderr: () => err, exited };
  // A poll: a start takes seconds, and over a minute at load 15 on the shared 2 cores.
  const deadline = Date.now() + 120_000;
  while (!/^\/dev\/loop\d+$/m.test(out)) {
    if (Date.now() > deadline || child.exitCode !== null) throw new Error(`the daemon did not start: ${err}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return out.trim().split('\n')[0]!;
}

/** The log lines (pino JSON) of the daemon so far, as { level, msg }. */
function logLines(): Array<{ level: number; msg: string }> {
  return daemon!
    .stderr()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as { level: number; msg: string });
}

/**
 * A losetup first in the daemon's PATH that fails the next `losetup -d` once `failNext` exists
 * (not for "in use": as an I/O error of the ioctl would), and is the real one otherwise.
 */
function failingLosetup(dir: string): { env: NodeJS.ProcessEnv; failNext: string } {
  const bin = join(dir, 'bin');
  const failNext = join(bin, 'fail-next-detach');
  const real = mustSh('sh', ['-c', 'command -v losetup']).trim();
  mustSh('mkdir', ['-p', bin]);
  writeFileSync(
    join(bin, 'losetup'),
    `#!/bin/sh\nif [ "$1" = -d ] && rm "${failNext}" 2>/dev/null; then echo "losetup: $2: detach failed: Input/output error" >&2; exit 1; fi\nexec ${real} "$@"\n`,
    { mode: 0o755 },
  );
  return { env: { ...process.env, PATH: `${bin}:${process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin'}` }, failNext };
}

async function setUp(stopTimeout: string, env?: (dir: string) => NodeJS.ProcessEnv): Promise<{ device: string; mnt: string; disk: string; data: Buffer }> {
  s = scratch('ulob-stop-');
  const disk = join(s.dir, 'disk.img');
  mustSh('truncate', ['-s', '64M', disk]);
  const device = await start([
    '--writeback', '--flush', '0 3 * * *', '-c', join(s.dir, 'c.cache'), '--name', 'st', '--run-dir', s.runDir,
    '--stop-timeout', stopTimeout, '/dev/loop', disk,
  ], env?.(s.dir));
  mustSh('mkfs.ext4', ['-q', '-F', device]);
  const mnt = join(s.dir, 'mnt');
  mustSh('mkdir', ['-p', mnt]);
  mustSh('mount', [device, mnt]);
  mounts.push(mnt);
  const data = randomBytes(2 << 20);
  writeFileSync(join(mnt, 'data.bin'), data);
  mustSh('sync', ['-f', join(mnt, 'data.bin')]);
  return { device, mnt, disk, data };
}

/**
 * What the stop wrote back is said in its error line alone, not again in a "detached:" line
 * (nits14: "nothing to write back: the disk has everything" was logged twice).
 */
function expectSaidOnce(stopLine: string): void {
  const said = /: ((?:wrote|no flush|nothing to write|the flush failed|waited for).*?); (?:the filesystem on|check that)/.exec(stopLine)?.[1];
  expect(said, stopLine).toBeDefined();
  const msgs = logLines().map((l) => l.msg);
  expect(msgs.filter((m) => m.includes(said!)), msgs.join('\n')).toHaveLength(1);
}

/** The file's bytes on the disk image itself (not through the cache): debugfs reads ext4 offline. */
function onDisk(disk: string, name: string): Buffer {
  const out = join(s.dir, `${name}.dumped`);
  mustSh('debugfs', ['-R', `dump /${name} ${out}`, disk]);
  return readFileSync(out);
}

describe('SIGTERM while the device is mounted', () => {
  it('/dev/loop takes the first free loop device; unmounted within the wait: flushes and exits cleanly', async () => {
    const { device, mnt, disk, data } = await setUp('20s');
    expect(readFileSync(`/sys/block/${device.slice(5)}/loop/backing_file`, 'utf8').trim()).toBe(join(s.runDir, 'st', 'fuse', 'disk'));
    const t0 = Date.now();
    daemon!.child.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 1500));
    expect(daemon!.child.exitCode).toBeNull(); // still waiting for the unmount
    mustSh('umount', [mnt]);
    mounts.length = 0;
    expect(await daemon!.exited).toBe(0);
    expect(Date.now() - t0).toBeLessThan(15_000);
    const msgs = logLines().map((l) => l.msg);
    expect(msgs.some((m) => /^stopping: .* is mounted on .*; waiting up to 10 s for that to end$/.test(m))).toBe(true);
    expect(msgs.find((m) => m.startsWith('detached:'))).toMatch(/^detached: wrote \d+(\.\d+)? (B|KiB|MiB) back; nothing stays dirty$/);
    // The flush the schedule implies at stop reached the disk itself.
    expect(onDisk(disk, 'data.bin').equals(data)).toBe(true);
  });

  it('still mounted after the wait: flushes, lets go, one error line naming the fix; bounded by --stop-timeout', async () => {
    const { device, mnt, disk, data } = await setUp('6s');
    // Written just before the stop: dirty until some flush (an opportunistic one may come first).
    const late = randomBytes(1 << 20);
    writeFileSync(join(mnt, 'late.bin'), late);
    mustSh('sync', ['-f', join(mnt, 'late.bin')]);
    const t0 = Date.now();
    daemon!.child.kill('SIGTERM');
    expect(await daemon!.exited).toBe(0);
    const took = Date.now() - t0;
    expect(took).toBeGreaterThanOrEqual(3000); // waited half of --stop-timeout for the unmount
    expect(took).toBeLessThan(6000 + 5000);
    const errors = logLines().filter((l) => l.level >= 50).map((l) => l.msg);
    expect(errors).toHaveLength(1);
    // The filesystem is still mounted: its journal may write a block after the flush began, which
    // then stays dirty for the next flush (said so in the line).
    expect(errors[0]).toMatch(
      new RegExp(`^stopped while ${device} is mounted on ${mnt}: (wrote \\d+(\\.\\d+)? (B|KiB|MiB) back|no flush); (nothing stays dirty|\\d+(\\.\\d+)? (B|KiB|MiB) stay dirty in the cache for the next flush); the filesystem on ${device} now fails I/O until it is unmounted\\. Order its mount after this daemon \\(fstab: x-systemd\\.requires=ulobdev@st\\.service\\) so it is unmounted first$`),
    );
    expectSaidOnce(errors[0]!);
    expect(onDisk(disk, 'data.bin').equals(data)).toBe(true);
    expect(onDisk(disk, 'late.bin').equals(late)).toBe(true);
    // The filesystem is left failing, not hanging: reading uncached blocks errors out, unmount works.
    const read = sh('dd', [`if=${device}`, 'of=/dev/null', 'bs=1M', 'count=1', 'skip=40', 'iflag=direct']);
    expect(read.status).not.toBe(0);
    mustSh('umount', [mnt]);
    mounts.length = 0;
  });

  it('the FUSE mount behind the loop device unmounted by someone else first (systemd at shutdown): still flushes, detaches and exits 0', async () => {
    const { mnt, disk, data } = await setUp('20s');
    mustSh('umount', [mnt]);
    mounts.length = 0;
    // Lazily, as an unmount that comes while the loop device still holds the file: the mount is
    // gone from the namespace at once, the file lives until the loop device lets go. The daemon's
    // own unmount then finds nothing to unmount (fusermount3: Invalid argument), as it did at
    // stop 18's CI when systemd unmounted it just after the loop device let go.
    mustSh('umount', ['-l', join(s.runDir, 'st', 'fuse')]);
    daemon!.child.kill('SIGTERM');
    expect(await daemon!.exited, daemon!.stderr()).toBe(0);
    const msgs = logLines().map((l) => l.msg);
    expect(msgs.find((m) => m.startsWith('detached:')), msgs.join('\n')).toMatch(/^detached: wrote \d+(\.\d+)? (B|KiB|MiB) back; nothing stays dirty$/);
    expect(onDisk(disk, 'data.bin').equals(data)).toBe(true);
  });

  it('releasing the device fails for another reason than its use: still flushes, lets go, one error line, exits 0', async () => {
    let failNext = '';
    const { device, mnt, disk, data } = await setUp('20s', (dir) => {
      const f = failingLosetup(dir);
      failNext = f.failNext;
      return f.env;
    });
    mustSh('umount', [mnt]);
    mounts.length = 0;
    writeFileSync(failNext, '');
    daemon!.child.kill('SIGTERM');
    expect(await daemon!.exited, daemon!.stderr()).toBe(0);
    expect(existsSync(failNext)).toBe(false); // the release did fail once
    const msgs = logLines().map((l) => l.msg);
    const errors = logLines().filter((l) => l.level >= 50).map((l) => l.msg);
    expect(errors, msgs.join('\n')).toHaveLength(1);
    expect(errors[0]).toMatch(new RegExp(`^stopped after releasing ${device} failed \\(losetup -d ${device} failed: losetup: ${device}: detach failed: Input/output error\\): wrote \\d+(\\.\\d+)? (B|KiB|MiB) back; nothing stays dirty; check that`));
    expectSaidOnce(errors[0]!);
    expect(onDisk(disk, 'data.bin').equals(data)).toBe(true);
    expect(existsSync(`/sys/block/${device.slice(5)}/loop/backing_file`)).toBe(false); // let go of
  });
});
