// kill -9 of a /dev/loopN daemon, and the next command of the same device: re-running the attach
// (what systemd's Restart=on-failure does), `detach` and `status` recognise what the dead daemon
// left (the loop device bound to its FUSE file, the FUSE mount, an orphaned nbdfuse, sockets), let
// go of it, say "recovered after an unclean shutdown", and lose nothing that was flushed. Killed
// during the attach (at named points: ULOBDEV_CRASH_AT), under fio --verify load, and with a
// filesystem mounted on the device (refused, changing nothing, until it is unmounted).
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { killStrays, mustSh, prepareCliTests, scratch, sh, ulobdev, unusedLoop } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
const undo: Array<() => Promise<unknown> | unknown> = [];

beforeAll(() => {
  prepareCliTests();
}, 900_000);

afterEach(async () => {
  for (const step of undo.splice(0).reverse()) await step();
  killStrays(s.dir, s.runDir);
  s?.cleanup();
});

/** leftovers() once it is empty, or after 10 s: a detached daemon takes a moment to exit. */
async function settledLeftovers(): Promise<string[]> {
  for (let i = 0; i < 200 && leftovers().length > 0; i++) await new Promise((r) => setTimeout(r, 50));
  return leftovers();
}

/** What this test's daemons left running, bound or mounted: empty once everything is let go. */
function leftovers(): string[] {
  const out: string[] = [];
  for (const pid of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
    let cmdline = '';
    try {
      cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    } catch {
      continue;
    }
    if (Number(pid) !== process.pid && cmdline.includes(s.runDir)) out.push(`process ${pid}: ${cmdline.split('\0')[0]}`);
  }
  for (const line of sh('losetup', ['-a']).stdout.split('\n')) if (line.includes(s.runDir)) out.push(`loop ${line}`);
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    if ((line.split(' ')[4] ?? '').startsWith(s.runDir)) out.push(`mount ${line.split(' ')[4]}`);
  }
  return out;
}

function pidOf(dev: string): number {
  return JSON.parse(readFileSync(join(s.runDir, `${dev.slice('/dev/'.length)}.json`), 'utf8')).pid;
}

async function waitGone(pid: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    try {
      const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
      if (/\) [ZX] /.test(st)) return;
    } catch {
      return;
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`pid ${pid} still alive`);
}

/**
 * The attach command of one device, as a systemd unit would run it again and again; the loop
 * device is bound once here (another test may take a free one between `losetup -f` and the attach)
 * and detached again, so the command's device is ours.
 */
async function device(): Promise<{ dev: string; args: string[] }> {
  const disk = join(s.dir, 'disk.img');
  mustSh('truncate', ['-s', '64M', disk]);
  const argsFor = (loop: string) => ['--writeback', '-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap'), '--run-dir', s.runDir, '--daemon', loop, disk];
  // The tests run "the same command" on this device again after it is detached below, so it must
  // stay free meanwhile: a number the kernel has not made (unusedLoop, from 256 up; ulobdev makes
  // it), which `losetup -f` in a test running beside this one never hands out. A free low number
  // was taken there between the detach and the same command (make test, two host files at once:
  // "/dev/loop0 is in use (bound to .../parted.img)", cli-errors' disk).
  const dev = unusedLoop();
  const args = argsFor(dev);
  const first = await ulobdev(args);
  expect(first.code, first.stderr).toBe(0);
  expect((await ulobdev(['detach', dev, '--run-dir', s.runDir])).code).toBe(0);
  undo.push(async () => {
    const d = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
    if (d.code !== 0 && !/no ulobdev daemon/.test(d.stderr)) killStrays(s.dir, s.runDir);
  });
  return { dev, args };
}

function bound(dev: string): string {
  return sh('losetup', ['-n', '-O', 'BACK-FILE', dev]).stdout.trim();
}

const RECOVERED = /recovered after an unclean shutdown: the daemon of \/dev\/loop\d+ \(pid \d+\) had died; /;

describe('kill -9 of a /dev/loopN daemon', () => {
  it.each([
    ['attach:claimed', []],
    ['attach:fuse', ['stopped the orphaned nbdfuse']],
    ['attach:bound', ['unbound /dev/loop', 'stopped the orphaned nbdfuse']],
  ])('during the attach (%s): the same command recovers and attaches', async (point, said) => {
    s = scratch('ulob-crash-attach-');
    const { dev, args } = await device();
    const killed = await ulobdev(args, { env: { ULOBDEV_CRASH_AT: point } });
    expect(killed.code, killed.stderr).not.toBe(0);
    expect(killed.stderr).toMatch(/^ulobdev: the daemon was killed by SIGKILL before it was ready \(log: [^)]+\)\n$/);
    if (point !== 'attach:claimed') expect(leftovers().length).toBeGreaterThan(0);
    if (point === 'attach:bound') expect(bound(dev)).toBe(join(s.runDir, dev.slice(5), 'fuse/disk'));

    const again = await ulobdev(args);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stdout).toBe(`${dev}\n`);
    if (said.length === 0) expect(again.stderr).toBe('');
    else {
      expect(again.stderr).toMatch(new RegExp(`^ulobdev: ${dev}: ${RECOVERED.source}`));
      for (const step of said) expect(again.stderr).toContain(step);
    }
    const data = randomBytes(1 << 20);
    writeFileSync(join(s.dir, 'data'), data);
    mustSh('dd', [`if=${join(s.dir, 'data')}`, `of=${dev}`, 'bs=1M', 'oflag=direct', 'status=none']);
    expect(mustSh('cmp', ['-n', String(1 << 20), join(s.dir, 'data'), dev])).toBe('');
    const d = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
    expect(d.stderr).toBe('');
    expect(await settledLeftovers()).toEqual([]);
  });

  it('under fio --verify load: every write fio saw complete reads back after the recovery', async () => {
    s = scratch('ulob-crash-fio-');
    const { dev, args } = await device();
    expect((await ulobdev(args)).code).toBe(0);
    const pid = pidOf(dev);
    // O_SYNC + O_DIRECT: each write is acknowledged only after a FLUSH covered it. Four writers of
    // one write in flight each, on their own 8 MiB: fio's saved verify state counts a write that
    // failed in flight as done when more are in flight per job, so deeper queues would report
    // blocks the device rightly never acknowledged.
    const job = ['--name=crash', `--filename=${dev}`, '--direct=1', '--sync=1', '--rw=randwrite', '--bs=4k', '--numjobs=4', '--size=8M', '--offset_increment=12M', '--group_reporting', '--ioengine=psync', '--verify=crc32c', `--aux-path=${s.dir}`];
    const fio = spawn('fio', [...job, '--do_verify=0', '--verify_state_save=1', `--output=${join(s.dir, 'fio.out')}`], { stdio: 'ignore' });
    const fioExit = new Promise<number | null>((resolve) => fio.once('exit', resolve));
    // Kill the daemon once fio has written for a while: its first writes seen dirty (at load fio
    // took over 3 s to start, and a fixed 3 s sleep killed the daemon before any write), then 2 s.
    for (let i = 0; i < 300; i++) {
      const st = await ulobdev(['status', dev, '--json', '--run-dir', s.runDir]);
      if (st.code === 0 && JSON.parse(st.stdout).dirtyBytes > 0) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    await new Promise((r) => setTimeout(r, 2000));
    process.kill(pid, 'SIGKILL');
    await waitGone(pid);
    expect(await fioExit).not.toBe(0);
    const written = /WRITE: .* io=(\d+(?:\.\d+)?)([KMG]i)B/.exec(readFileSync(join(s.dir, 'fio.out'), 'utf8'));
    expect(written, 'fio wrote something before the kill').not.toBeNull();

    const again = await ulobdev(args);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toMatch(RECOVERED);
    const verify = sh('fio', [...job, '--verify_only', '--verify_state_load=1', `--output=${join(s.dir, 'verify.out')}`]);
    expect(verify.status, readFileSync(join(s.dir, 'verify.out'), 'utf8')).toBe(0);
    expect(readFileSync(join(s.dir, 'verify.out'), 'utf8')).toMatch(/err= 0/);
    // And the device works as before: a full write-and-verify pass.
    const full = sh('fio', ['--name=after', `--filename=${dev}`, '--direct=1', '--rw=randwrite', '--bs=16k', '--size=16M', '--ioengine=libaio', '--iodepth=8', '--verify=crc32c', `--aux-path=${s.dir}`]);
    expect(full.status, full.stdout + full.stderr).toBe(0);
    expect((await ulobdev(['detach', dev, '--run-dir', s.runDir])).code).toBe(0);
    expect(await settledLeftovers()).toEqual([]);
  });

  it('while mounted: refused, changing nothing, until unmounted; then recovered with the fsync-ed data', async () => {
    s = scratch('ulob-crash-mounted-');
    const { dev, args } = await device();
    expect((await ulobdev(args)).code).toBe(0);
    mustSh('mkfs.ext4', ['-q', dev]);
    const mnt = join(s.dir, 'mnt');
    mkdirSync(mnt);
    mustSh('mount', [dev, mnt]);
    undo.push(() => sh('umount', [mnt]));
    const data = randomBytes(300_000);
    writeFileSync(join(mnt, 'kept'), data);
    mustSh('sync', ['-f', join(mnt, 'kept')]);
    // A second device, alive: `status` of all lists it, and marks the dead one (newuser7 item 1:
    // one dead daemon whose leftovers cannot go made status print only that one's error).
    const other = unusedLoop();
    const otherDisk = join(s.dir, 'other.img');
    mustSh('truncate', ['-s', '16M', otherDisk]);
    const o = await ulobdev(['-c', join(s.dir, 'o.cache'), '-b', join(s.dir, 'o.bitmap'), '--run-dir', s.runDir, '--daemon', other, otherDisk]);
    expect(o.code, o.stderr).toBe(0);
    undo.push(() => ulobdev(['detach', other, '--run-dir', s.runDir]));
    const pid = pidOf(dev);
    process.kill(pid, 'SIGKILL');
    await waitGone(pid);

    const all = await ulobdev(['status', '--run-dir', s.runDir]);
    expect(all.code).toBe(1);
    expect(all.stdout).toMatch(new RegExp(`^${other}: readonly cache of ${otherDisk} \\(loop frontend, daemon pid \\d+\\)\n`));
    expect(all.stdout).toMatch(new RegExp(`\n${dev}: DEAD \\(its daemon, pid ${pid}, died; see the error below\\)\n$`));
    expect(all.stderr).toMatch(new RegExp(`^ulobdev: ${dev} is left over from an unclean shutdown .* but ${dev} is mounted on ${mnt}; let go of it \\(umount\\) and run the command again\n$`));
    const allJson = await ulobdev(['status', '--json', '--run-dir', s.runDir]);
    expect(allJson.code).toBe(1);
    expect(JSON.parse(allJson.stdout).map((st: { device: string }) => st.device)).toEqual([other]);
    expect(allJson.stderr).toMatch(/is left over from an unclean shutdown/);
    expect((await ulobdev(['detach', other, '--run-dir', s.runDir])).code).toBe(0);
    undo.pop();

    const fuseFile = bound(dev);
    for (const command of [args, ['detach', dev, '--run-dir', s.runDir]]) {
      const r = await ulobdev(command);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(
        new RegExp(`^ulobdev: ${dev} is left over from an unclean shutdown \\(the daemon \\(pid ${pid}\\) that served it died\\) and its I/O fails, but ${dev} is mounted on ${mnt}; let go of it \\(umount\\) and run the command again\\n$`),
      );
      expect(bound(dev)).toBe(fuseFile);
    }
    // The kernel cannot write the journal any more: umount may complain, but lets go.
    sh('umount', [mnt]);
    undo.pop();

    const again = await ulobdev(args);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toMatch(RECOVERED);
    mustSh('mount', [dev, mnt]);
    undo.push(() => sh('umount', [mnt]));
    expect(readFileSync(join(mnt, 'kept')).equals(data)).toBe(true);
    mustSh('umount', [mnt]);
    undo.pop();
    const fsck = sh('fsck.ext4', ['-fn', dev]);
    expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
    expect((await ulobdev(['detach', dev, '--run-dir', s.runDir])).code).toBe(0);
    expect(await settledLeftovers()).toEqual([]);
  });

  it('detach and status recognise a dead daemon and let go of what it left', async () => {
    s = scratch('ulob-crash-cmds-');
    const { dev, args } = await device();
    const kill = async () => {
      expect((await ulobdev(args)).code).toBe(0);
      const pid = pidOf(dev);
      process.kill(pid, 'SIGKILL');
      await waitGone(pid);
      expect(leftovers().length).toBeGreaterThan(0);
      return pid;
    };

    let pid = await kill();
    const st = await ulobdev(['status', dev, '--run-dir', s.runDir]);
    expect(st.code).toBe(1);
    expect(st.stderr).toMatch(new RegExp(`^ulobdev: ${dev} is not attached: recovered after an unclean shutdown: the daemon of ${dev} \\(pid ${pid}\\) had died; unbound ${dev} from the dead FUSE file, .*; run the attach command again\\n$`));
    expect(await settledLeftovers()).toEqual([]);

    pid = await kill();
    const d = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
    expect(d.code, d.stderr).toBe(0);
    expect(d.stdout).toMatch(new RegExp(`^${dev}: recovered after an unclean shutdown: the daemon of ${dev} \\(pid ${pid}\\) had died; unbound ${dev} .*\\n${dev} detached\\n$`));
    expect(await settledLeftovers()).toEqual([]);

    pid = await kill();
    const all = await ulobdev(['status', '--run-dir', s.runDir]);
    expect(all.code, all.stderr).toBe(0);
    expect(all.stdout).toBe('no ulobdev devices attached\n');
    expect(all.stderr).toMatch(new RegExp(`^ulobdev: ${dev}: recovered after an unclean shutdown: the daemon of ${dev} \\(pid ${pid}\\) had died; `));
    expect(await settledLeftovers()).toEqual([]);

    // With nothing left over, the commands say what they always said.
    const none = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
    expect(none.code).toBe(1);
    expect(none.stderr).toBe(`ulobdev: ${dev} is not attached (no ulobdev daemon serves it); 'ulobdev status' lists what is attached\n`);
  });
});
