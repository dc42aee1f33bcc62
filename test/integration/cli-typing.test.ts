// What users type (issue 14, items 7-16), through the real CLI: every mistake gets one line on
// stderr that says what is wrong and what to do, exit 1, and changes nothing (the files of the
// scratch directory and `losetup -a` are compared before and after, as in cli-errors.test.ts);
// and the right forms work: commands by device or by --name, --hydrate, the policy in status,
// a /dev/loopN that does not exist yet, the log on a terminal, --help.
import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loopCtlAdd, loopCtlRemove } from '../../src/native/blkdev.js';
import { attachFreeLoop, CLI, testEnv, loopsUnder, mustSh, prepareCliTests, scratch, sh, snapshot, ulobdev, unusedLoop, type CliResult } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
const undo: Array<() => unknown> = [];

beforeAll(() => {
  prepareCliTests();
});

afterEach(async () => {
  for (const step of undo.splice(0).reverse()) await step();
  s?.cleanup();
});

function loops(): string {
  return loopsUnder(s.dir);
}

/** Runs a command that must be refused; `ignore` lists files others change meanwhile (a mounted image). */
async function expectRefused(args: string[], message: RegExp, ignore: string[] = []): Promise<CliResult> {
  const files = () => Object.fromEntries(Object.entries(snapshot(s.dir)).filter(([p]) => !ignore.includes(p)));
  const before = files();
  const loopsBefore = loops();
  const r = await ulobdev([...args, '--run-dir', s.runDir], { timeoutMs: 20_000 });
  // Accepted by mistake (the bug this guards against): do not leave its daemon behind.
  if (r.code === 0 && args.includes('--daemon')) undo.push(() => ulobdev(['detach', args[args.length - 2]!, '--run-dir', s.runDir]));
  expect(r.code, r.stderr).toBe(1);
  expect(r.stdout).toBe('');
  expect(r.stderr).toMatch(/^ulobdev: [^\n]+\n$/);
  expect(r.stderr).toMatch(message);
  expect(files()).toEqual(before);
  expect(loops()).toBe(loopsBefore);
  return r;
}

function makeDisk(name: string, size = '16M'): string {
  const p = join(s.dir, name);
  mustSh('truncate', ['-s', size, p]);
  return p;
}

function cacheArgs(name = 'c'): string[] {
  return ['-c', join(s.dir, `${name}.cache`), '-b', join(s.dir, `${name}.bitmap`)];
}

function serveUrl(name = 'nbd'): string {
  return `nbd+unix:///?socket=${join(s.dir, `${name}.sock`)}`;
}

/** Attaches in the background and registers the detach; returns the CLI's result. */
async function attachDaemon(args: string[], device: string, backing: string): Promise<CliResult> {
  const r = await ulobdev([...args, '--daemon', '--run-dir', s.runDir, device, backing]);
  expect(r.code, r.stderr).toBe(0);
  undo.push(() => ulobdev(['detach', device, '--run-dir', s.runDir]));
  return r;
}

async function statusJson(deviceOrName: string): Promise<Record<string, any>> {
  const r = await ulobdev(['status', deviceOrName, '--json', '--run-dir', s.runDir]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

describe('--cache-size larger than the disk (newuser9)', () => {
  it('is the whole disk: clamped to the disk with one notice line, and status says so', async () => {
    s = scratch('ulob-typing-');
    const r = await attachDaemon([...cacheArgs(), '--cache-size', '1T'], serveUrl(), makeDisk('disk.img'));
    expect(r.stderr).toMatch(new RegExp(`^ulobdev: [^\\n]*--cache-size 1 TiB is more than all of ${s.dir}/disk\\.img \\(16 MiB\\): the cache holds at most the whole disk, so its budget is 16 MiB\\n`, 'm'));
    expect((await statusJson(serveUrl())).budgetBytes).toBe(16 << 20);
  });

  it('a clamp notice followed by a refusal: one line, the refusal (newuser10b)', async () => {
    s = scratch('ulob-typing-');
    const flash = join(s.dir, 'flash');
    mkdirSync(flash);
    mustSh('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', flash]);
    undo.push(() => sh('umount', ['-l', flash]));
    // 1 TiB is clamped to the 16 MiB disk, which then does not fit on 8 MiB of flash.
    const disk = makeDisk('disk.img');
    const r = await expectRefused(['-c', join(flash, 'c.cache'), '-b', join(flash, 'c.bitmap'), '--cache-size', '1T', '--daemon', serveUrl(), disk], /a cache budget of 16 MiB does not fit/);
    expect(r.stderr).not.toMatch(/is more than all of/);
  });

  it('names no device in the notice when DEVICE is /dev/loop: not the device it got (newuser9b)', async () => {
    s = scratch('ulob-typing-');
    const r = await ulobdev([...cacheArgs(), '--cache-size', '1T', '--daemon', '--run-dir', s.runDir, '/dev/loop', makeDisk('disk.img')]);
    expect(r.code, r.stderr).toBe(0);
    const got = r.stdout.trim();
    undo.push(() => ulobdev(['detach', got, '--run-dir', s.runDir]));
    expect(got).toMatch(/^\/dev\/loop\d+$/);
    expect(r.stderr).toMatch(new RegExp(`^ulobdev: --cache-size 1 TiB is more than all of ${s.dir}/disk\\.img \\(16 MiB\\)`, 'm'));
  });
});

describe('every command takes the device or the --name (item 9)', () => {
  it('status, flush and detach of a loop device attached with --name data', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    const { loop } = await attachFreeLoop((dev) => ulobdev([...cacheArgs(), '--writeback', '--name', 'data', '--daemon', '--run-dir', s.runDir, dev, disk]));
    undo.push(() => ulobdev(['detach', 'data', '--run-dir', s.runDir]));
    const byDevice = await statusJson(loop);
    expect(byDevice.name).toBe('data');
    expect(byDevice.device).toBe(loop);
    expect((await statusJson('data')).pid).toBe(byDevice.pid);
    const text = await ulobdev(['status', loop, '--run-dir', s.runDir]);
    expect(text.stdout.split('\n')[0]).toBe(`${loop} "data": writeback cache of ${disk} (loop frontend, daemon pid ${byDevice.pid})`);
    mustSh('dd', ['if=/dev/urandom', `of=${loop}`, 'bs=64k', 'count=4', 'oflag=direct', 'status=none']);
    const flushed = await ulobdev(['flush', '--wait', loop, '--run-dir', s.runDir]);
    expect(flushed.code, flushed.stderr).toBe(0);
    expect(flushed.stdout).toMatch(new RegExp(`^${loop}: wrote 256 KiB back`));
    const detached = await ulobdev(['detach', loop, '--run-dir', s.runDir]);
    expect(detached.stderr).toBe('');
    // It says what it wrote back (issue 13): nothing here, the flush above took it all.
    expect(detached.stdout).toBe(`${loop} detached: nothing to write back: the disk has everything\n`);
    expect(loops()).not.toContain(`${loop}:`);
  });

  it('a device or name nobody serves: one line, no socket path', async () => {
    s = scratch('ulob-typing-');
    mkdirSync(s.runDir);
    for (const cmd of ['status', 'detach', 'flush']) {
      const r = await expectRefused([cmd, '/dev/loop7'], /^ulobdev: \/dev\/loop7 is not attached \(no ulobdev daemon serves it\); 'ulobdev status' lists what is attached\n$/);
      expect(r.stderr).not.toContain('.sock');
    }
    await expectRefused(['status', 'data'], /^ulobdev: no attached device is named "data"; 'ulobdev status' lists what is attached\n$/);
  });
});

describe('--name is one safe path component (item 7)', () => {
  for (const name of ['..', '.', '../etc', 'a/b', '-x', '.hidden', '']) {
    it(`refuses --name ${JSON.stringify(name)} before anything is made`, async () => {
      s = scratch('ulob-typing-');
      const disk = makeDisk('disk.img');
      await expectRefused([...cacheArgs(), '--name', name, '--daemon', serveUrl(), disk], /--name .*is invalid\. a name is one word of letters, digits/);
      expect(existsSync(s.runDir)).toBe(false);
    });
  }
});

describe('NBD on an address other machines reach (item 8)', () => {
  it('is refused without --allow-remote, saying what it would expose', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    await expectRefused(
      [...cacheArgs(), '--writeback', 'nbd://0.0.0.0:10809', disk],
      /^ulobdev: nbd:\/\/0\.0\.0\.0:10809 would let anyone who can reach port 10809 of this machine read and write the cached disk, with no password and no encryption; listen on 127\.0\.0\.1 or a unix socket, or pass --allow-remote if that is what you want\n$/,
    );
    await expectRefused([...cacheArgs(), 'nbd://[::]:10809', disk], /would let anyone .* read the cached disk/);
  });

  it('listens there with --allow-remote, and says so in the log', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    const port = 20000 + Math.floor(Math.random() * 20000);
    const url = `nbd://0.0.0.0:${port}`;
    await attachDaemon([...cacheArgs(), '--allow-remote'], url, disk);
    const log = readFileSync(join(s.runDir, `nbd-0.0.0.0_${port}.log`), 'utf8');
    expect(log).toMatch(/serving the cached disk to the network with no authentication and no encryption \(--allow-remote\)/);
    expect(sh('nbdinfo', ['--size', `nbd://127.0.0.1:${port}`]).stdout.trim()).toBe(String(16 << 20));
  });
});

describe('--hydrate and its rate (item 10)', () => {
  it('takes no value: DEVICE and BACKEND after it are DEVICE and BACKEND', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    await attachDaemon([...cacheArgs(), '--hydrate'], serveUrl(), disk);
    const st = await statusJson(serveUrl());
    expect(st.hydration).toBeDefined();
    expect(st.policy.hydrateRate).toBe(0);
  });

  it('--hydrate-rate sets the rate and implies --hydrate', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    await attachDaemon([...cacheArgs(), '--hydrate-rate', '50M'], serveUrl(), disk);
    const st = await statusJson(serveUrl());
    expect(st.hydration).toBeDefined();
    expect(st.policy.hydrateRate).toBe(50 << 20);
    expect((await ulobdev(['status', serveUrl(), '--run-dir', s.runDir])).stdout).toMatch(/policy: hydrate 50 MiB\/s/);
  });

  it('a rate after --hydrate is refused in one line that names --hydrate-rate', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    await expectRefused([...cacheArgs(), '--hydrate', '50M', serveUrl(), disk], /^ulobdev: too many arguments: expected DEVICE BACKEND, got 50M .*; --hydrate takes no value: the rate is --hydrate-rate 50M\n$/);
    await expectRefused([...cacheArgs(), '--daemon', '--hydrate-rate', 'fast', serveUrl(), disk], /^ulobdev: --hydrate-rate "fast" is not a rate/);
  });

  it('an unquoted --flush schedule (split by the shell, its stars globbed) is refused in one line that says to quote it (newuser14 F5c)', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    // What `--flush */30 * * * *` becomes in a directory holding a.txt and b.txt.
    await expectRefused(
      [...cacheArgs(), '--writeback', '--flush', '*/30', 'a.txt', 'b.txt', '*', '*', '*', serveUrl(), disk],
      /^ulobdev: too many arguments: expected DEVICE BACKEND, got a\.txt b\.txt \* \* \* and 2 more; --flush \*\/30 looks like the first field of a cron expression the shell split: quote it, --flush '\*\/30 \* \* \* \*'\n$/,
    );
  });
});

describe('--dirty-max (item 11)', () => {
  it('needs a unit or %', async () => {
    s = scratch('ulob-typing-');
    await expectRefused([...cacheArgs(), '--writeback', '--dirty-max', '10', serveUrl(), makeDisk('disk.img')], /^ulobdev: --dirty-max 10 has no unit: write 10% for a share of the disk, or a size such as 10M or 10G\n$/);
  });

  it('may not exceed the disk', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    await expectRefused([...cacheArgs(), '--writeback', '--daemon', '--dirty-max', '1G', serveUrl(), disk], /^ulobdev: --dirty-max 1 GiB is more than all of .*disk\.img \(16 MiB\): it would never start a flush/);
  });

  it('shows every policy setting in status', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    await attachDaemon(
      [...cacheArgs(), '--writeback', '--dirty-max', '25%', '--max-dirty-age', '2h', '--flush', '0 3 * * *', '--on-ac', 'schedule', '--standby-timeout', '20m'],
      serveUrl(),
      disk,
    );
    const st = await statusJson(serveUrl());
    expect(st.policy).toEqual({
      flushCron: '0 3 * * *',
      dirtyMaxBytes: 4 << 20,
      maxDirtyAgeSeconds: 7200,
      spindown: false,
      standbyTimeoutSeconds: 1200,
      onAc: 'schedule',
      hydrateRate: null,
      flushOnDetach: true,
    });
    const text = (await ulobdev(['status', serveUrl(), '--run-dir', s.runDir])).stdout;
    expect(text).toContain("policy: flush '0 3 * * *', dirty-max 4 MiB, max-dirty-age 2.0 h, on-ac schedule, standby-timeout 20 min, flush on detach");
  });
});

describe('--flush schedules (items 12, 14)', () => {
  it('warns about a six-field schedule that fires every 30 s, and attaches', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    const r = await attachDaemon([...cacheArgs(), '--writeback', '--flush', '*/30 * * * * *'], serveUrl(), disk);
    expect(r.stderr).toBe(
      "ulobdev: warning: --flush '*/30 * * * * *' fires every 30 s: the disk spins up that often and never sleeps (6 fields: the first is seconds; '*/30 * * * *' is every 30 minutes)\n",
    );
  });

  it('refuses an out-of-range step and words', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    await expectRefused([...cacheArgs(), '--writeback', '--flush', '*/70 * * * *', serveUrl(), disk], /^ulobdev: --flush '\*\/70 \* \* \* \*': the step \/70 in the minute field is larger than minutes 0-59, so it fires at minute 0 only; use a step from 1 to 59\n$/);
    await expectRefused([...cacheArgs(), '--writeback', '--flush', 'every 30 minutes', serveUrl(), disk], /^ulobdev: --flush 'every 30 minutes' is not a cron expression: it takes 5 fields/);
  });
});

describe('-c in a directory that does not exist (item 13)', () => {
  it('is refused, naming the directory; nothing is created', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    const missing = join(s.dir, 'flash', 'ulobdev');
    await expectRefused(['-c', join(missing, 'c.cache'), '--daemon', serveUrl(), disk], new RegExp(`^ulobdev: -c ${missing}/c\\.cache: the directory ${missing} does not exist \\(a typo, or the flash is not mounted yet\\?\\); create it or pick another\\n$`));
    await expectRefused([...cacheArgs(), '-b', join(missing, 'c.bitmap'), serveUrl(), disk], /-b .*the directory .* does not exist/);
    expect(existsSync(join(s.dir, 'flash'))).toBe(false);
  });
});

describe('what else users get wrong (item 14)', () => {
  it('DEVICE and BACKEND swapped', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    // The hint is the whole command with the two swapped back: options kept. A loop device no
    // one has (not /dev/loop6: a bound loop device can be a disk, and another test file running
    // beside this one may have bound it: the cc10 clean-clone run).
    let n = 4000;
    while (existsSync(`/dev/loop${n}`) || existsSync(`/sys/class/block/loop${n}`)) n++;
    const free = `/dev/loop${n}`;
    await expectRefused([...cacheArgs(), disk, free], new RegExp(`^ulobdev: DEVICE and BACKEND look swapped: the device to create comes first, then the disk to cache: ulobdev ${cacheArgs().join(' ')} ${free} ${disk} --run-dir ${s.runDir}\\n$`));
    await expectRefused([...cacheArgs(), '/dev/sdb', free], new RegExp(`look swapped: .*: ulobdev ${cacheArgs().join(' ')} ${free} /dev/sdb --run-dir ${s.runDir}\\n$`));
    // Two block devices (newuser4 #5): the disk a bound loop device, BACKEND a form that can only be
    // a device of ours. Not "in use": the bound loop device is the disk here.
    const bound = mustSh('losetup', ['-f', '--show', disk]).trim();
    undo.push(() => sh('losetup', ['-d', bound]));
    // /dev/uloopN and /dev/ublkbN take /dev/loop's path (a name that is never a disk); /dev/nbd15 the sysfs one.
    for (const only of ['/dev/loop', '/dev/nbd15']) {
      await expectRefused([...cacheArgs(), bound, only], new RegExp(`^ulobdev: DEVICE and BACKEND look swapped: .*: ulobdev ${cacheArgs().join(' ')} ${only} ${bound} --run-dir ${s.runDir}\\n$`));
    }
    // A DEVICE that is no disk either (a directory, a device node that is not there) with a bound
    // loop device as BACKEND: a bad DEVICE, not a swap (newuser7 item 9: the swapped command
    // suggested '/dev/loop0 /tmp').
    for (const bad of ['/tmp', '/dev/sdq9']) {
      await expectRefused([...cacheArgs(), bad, bound], new RegExp(`^ulobdev: DEVICE must be /dev/loopN .*, got "${bad}"\\n$`));
    }
  });

  it('an empty disk: a block device of 0 bytes', async () => {
    s = scratch('ulob-typing-');
    // A loop device of our own, bound to nothing: no other test binds it meanwhile.
    const n = Number(unusedLoop().slice('/dev/loop'.length));
    const empty = `/dev/loop${n}`;
    const ctl = openSync('/dev/loop-control', 'r+');
    try {
      loopCtlAdd(ctl, n);
    } finally {
      closeSync(ctl);
    }
    undo.push(() => {
      const fd = openSync('/dev/loop-control', 'r+');
      try {
        loopCtlRemove(fd, n);
      } finally {
        closeSync(fd);
      }
    });
    for (let i = 0; i < 100 && !existsSync(empty); i++) await new Promise((r) => setTimeout(r, 20));
    await expectRefused([...cacheArgs(), serveUrl(), empty], new RegExp(`^ulobdev: ${empty} is empty \\(0 bytes\\): no medium in the drive, or a loop device bound to nothing\\?`));
  });

  it('a second daemon on the same disk names the device and pid that hold it', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    await attachDaemon([...cacheArgs('a'), '--writeback'], serveUrl('first'), disk);
    const pid = (await statusJson(serveUrl('first'))).pid;
    const holder = new RegExp(`^ulobdev: ${disk} is already cached by the ulobdev daemon of nbd\\+unix:///\\?socket=.*first\\.sock \\(pid ${pid}\\); detach it first \\(ulobdev detach nbd`);
    // Another cache: two daemons would write the one disk.
    await expectRefused([...cacheArgs('b'), '--writeback', '--daemon', serveUrl('second'), disk], holder);
    // The same cache: the same attach run again (newuser11 finding 7), said as such.
    await expectRefused(
      [...cacheArgs('a'), '--writeback', serveUrl('second'), disk],
      new RegExp(`^ulobdev: ${disk} is already attached with this cache, as nbd\\+unix:///\\?socket=.*first\\.sock \\(pid ${pid}\\): nothing to do \\('ulobdev status nbd`),
    );
  });

  it('a mounted partition is named as the partition, not as the whole disk', async () => {
    s = scratch('ulob-typing-');
    const img = makeDisk('parted.img', '64M');
    mustSh('sgdisk', ['-o', '-n', '1:2048:+16M', '-n', '2:0:0', img]);
    const loop = mustSh('losetup', ['-f', '--show', '-P', img]).trim();
    undo.push(() => sh('losetup', ['-d', loop]));
    // A kernel without partition table parsers scans nothing: partx adds them from userspace.
    if (!existsSync(`${loop}p1`)) mustSh('partx', ['-a', loop]);
    for (let i = 0; i < 50 && !existsSync(`${loop}p1`); i++) await new Promise((r) => setTimeout(r, 50));
    mustSh('mkfs.ext4', ['-q', `${loop}p1`]);
    const mnt = join(s.dir, 'mnt');
    mkdirSync(mnt);
    mustSh('mount', [`${loop}p1`, mnt]);
    undo.push(() => sh('umount', [mnt]));
    // The mounted ext4 writes its image behind our back: not ours to compare.
    await expectRefused([...cacheArgs(), serveUrl(), loop], new RegExp(`^ulobdev: ${loop}p1, a partition of ${loop}, is mounted on ${mnt}; unmount it first\\n$`), [img]);
  });

  it('a cache file that is truncated or missing points at discard --force', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    await attachDaemon([...cacheArgs(), '--writeback'], serveUrl(), disk);
    expect((await ulobdev(['detach', serveUrl(), '--run-dir', s.runDir])).code).toBe(0);
    undo.pop();
    truncateSync(join(s.dir, 'c.cache'), 4096);
    await expectRefused([...cacheArgs(), serveUrl(), disk], new RegExp(`^ulobdev: ${s.dir}/c\\.cache is 4096 bytes, not the \\d+ of this cache \\(truncated or replaced\\?\\); if the cache is lost, 'ulobdev discard --force -c ${s.dir}/c\\.cache ${disk}' starts over`));
    mustSh('rm', [join(s.dir, 'c.cache')]);
    await expectRefused([...cacheArgs(), serveUrl(), disk], new RegExp(`^ulobdev: ${s.dir}/c\\.cache is missing, but its metadata .*c\\.cache\\.meta is there \\(moved, or the flash not mounted\\?\\); if the cache is lost, 'ulobdev discard --force`));
    // And that is the way out.
    const d = await ulobdev(['discard', '--force', ...cacheArgs(), disk]);
    expect(d.code, d.stderr).toBe(0);
    await attachDaemon([...cacheArgs()], serveUrl(), disk);
  });

  it('a full mirror larger than the flash filesystem says how much it needs and has, and the budget that fits', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img', '64M');
    const flash = join(s.dir, 'flash');
    mkdirSync(flash);
    mustSh('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', flash]);
    undo.push(() => sh('umount', [flash]));
    const args = ['-c', join(flash, 'c.cache')];
    const r = await expectRefused(
      [...args, serveUrl(), disk],
      new RegExp(`^ulobdev: a full mirror of ${disk} needs 64 MiB for ${flash}/c\\.cache, but ${flash} has \\d+(\\.\\d+)? MiB free; give --cache-size \\(at most (\\d+) MiB\\) for a cache smaller than the disk, or put the cache on a larger filesystem with -c\\n$`),
    );
    // The budget it names is taken.
    const most = /at most (\d+) MiB/.exec(r.stderr)![1]!;
    expect(Number(most)).toBeGreaterThanOrEqual(6);
    await attachDaemon([...args, '--cache-size', `${most}M`], serveUrl(), disk);
  });

  it('a full flash filesystem names the file and the way out', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img', '64M');
    const flash = join(s.dir, 'flash');
    mkdirSync(flash);
    // 1 MiB of flash for a 64 MiB disk: the cache file cannot be allocated.
    mustSh('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', flash]);
    undo.push(() => sh('umount', [flash]));
    const args = ['-c', join(flash, 'c.cache')];
    // The full mirror is refused before it is allocated (newuser7 item 27: "the filesystem holding
    // it is full" when it was not; the mirror was larger than the whole filesystem).
    await expectRefused([...args, serveUrl(), disk], new RegExp(`^ulobdev: a full mirror of ${disk} needs 64 MiB for ${flash}/c\\.cache, but ${flash} has \\d+(\\.\\d+)? (KiB|MiB) free; put the cache on a larger filesystem with -c\\n$`));
    // Metadata first: SQLite's "database or disk is full" names its file too.
    writeFileSync(join(flash, 'filler'), Buffer.alloc(1024 * 1024 - 4096));
    await expectRefused([...args, serveUrl(), disk], new RegExp(`^ulobdev: (no space left for ${flash}/c\\.cache\\.meta: the filesystem holding it is full|a full mirror of ${disk} needs 64 MiB)`));
    // A filesystem that fills up while the daemon runs: the next metadata transaction fails, and
    // what the user sees names the file and the way out, not SQLite's "database or disk is full".
    // Only the requests that needed it fail (newuser10 F1): the cache keeps serving, and once
    // space is freed the same requests go through without a re-attach.
    sh('rm', ['-f', join(flash, 'filler')]);
    sh('mount', ['-o', 'remount,size=24m', flash]);
    const small = makeDisk('small.img', '16M');
    await attachDaemon(['-c', join(flash, 'c.cache'), '--writeback'], serveUrl(), small);
    const before = sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 4M 1M', '-c', 'flush', serveUrl()]);
    expect(before.status, before.stderr).toBe(0);
    const avail = Number(mustSh('df', ['-B1', '--output=avail', flash]).split('\n')[1]);
    writeFileSync(join(flash, 'filler'), Buffer.alloc(avail));
    const write = sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 0 1M', '-c', 'flush', serveUrl()]);
    expect(write.stdout + write.stderr).toMatch(/write failed|flush failed/);
    // A flush still commits (newuser10b N1: it failed on its own SQLITE_FULL, rc 74): the flash
    // reserve (c.cache.meta-reserve) gives its metadata the room, and status says so.
    const f = await ulobdev(['flush', '--wait', serveUrl(), '--run-dir', s.runDir]);
    expect(f.code, f.stderr).toBe(0);
    // Acked data still reads; status says why requests failed, and counts them.
    const acked = sh('qemu-io', ['-f', 'raw', '-c', 'read -P 0x33 4M 1M', serveUrl()]);
    expect(acked.status, acked.stdout + acked.stderr).toBe(0);
    expect(acked.stdout).not.toMatch(/failed|Pattern verification/);
    const full = await statusJson(serveUrl());
    expect(full.spaceError).toMatch(/^the flash filesystem is full: \d+ requests failed; free space on it/);
    expect(full.failedRequests).toBeGreaterThan(0);
    expect(full.flashReserve).toMatchObject({ bytes: 1 << 20, releases: 1 });
    const text = await ulobdev(['status', serveUrl(), '--run-dir', s.runDir]);
    expect(text.stdout).toMatch(/\n {2}flash reserve: .*released 1x.* \d+ failed for want of room\n/);
    // Space comes back: the next flush just works, and the write's data is there.
    sh('rm', ['-f', join(flash, 'filler')]);
    const again = await ulobdev(['flush', '--wait', serveUrl(), '--run-dir', s.runDir]);
    expect(again.code, again.stderr).toBe(0);
    const after = sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x66 8M 1M', '-c', 'flush', '-c', 'read -P 0x55 0 1M', serveUrl()]);
    expect(after.status, after.stdout + after.stderr).toBe(0);
    expect(after.stdout + after.stderr).not.toMatch(/failed|Pattern verification/);
  });

  it('a full flash filesystem with only dirty blocks cached (newuser10b N1): writes wait for a flush with reason room, then go through; nothing fails', async () => {
    s = scratch('ulob-typing-');
    const flash = join(s.dir, 'flash');
    mkdirSync(flash);
    mustSh('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', flash]);
    undo.push(() => sh('umount', [flash]));
    const disk = makeDisk('disk.img', '16M');
    await attachDaemon(['-c', join(flash, 'c.cache'), '--writeback', '--cache-size', '8M', '--eviction-unit', '64K'], serveUrl(), disk);
    // 4 MiB written and flushed (durable, dirty): every cached block is dirty.
    const dirty = sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 4M', '-c', 'flush', serveUrl()]);
    expect(dirty.status, dirty.stderr).toBe(0);
    expect(await statusJson(serveUrl())).toMatchObject({ dirtyBytes: 4 << 20, usedBytes: 4 << 20 });
    // Another program takes every byte left.
    const avail = Number(mustSh('df', ['-B1', '--output=avail', flash]).split('\n')[1]);
    writeFileSync(join(flash, 'filler'), Buffer.alloc(avail));
    // New blocks need room in the cache file, their FLUSH room in the metadata.
    const more = sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 8M 2M', '-c', 'flush', '-c', 'read -P 0x55 8M 2M', '-c', 'read -P 0x33 0 4M', serveUrl()]);
    expect(more.status, more.stdout + more.stderr).toBe(0);
    expect(more.stdout + more.stderr).not.toMatch(/failed|Pattern verification/);
    const st = await statusJson(serveUrl());
    expect(st.failedRequests).toBe(0);
    expect(st.roomFlushes).toBeGreaterThan(0);
    expect(st.flashReserve.releases).toBeGreaterThan(0);
    // The last word on room: the room flush, or an eviction after it (the flash is still full).
    expect(st.spaceError).toMatch(/ran full with only dirty blocks cached: flushed them to the disk \(reason room\)|ran full \(another program filled it\): evicted/);
    const log = readdirSync(s.runDir)
      .filter((f) => f.endsWith('.log'))
      .map((f) => readFileSync(join(s.runDir, f), 'utf8'))
      .join('');
    expect(log).toMatch(/"reason":"room"[^\n]*flushed dirty blocks to the backing disk/);
    // The room flush wrote the first 4 MiB to the disk.
    expect(readFileSync(disk).subarray(0, 4 << 20).equals(Buffer.alloc(4 << 20, 0x33))).toBe(true);
  });
});

describe('a /dev/loopN that does not exist yet (item 15)', () => {
  it('is created with LOOP_CTL_ADD, as losetup does', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    const loop = unusedLoop();
    const n = Number(loop.slice('/dev/loop'.length));
    const remove = () => {
      const fd = openSync('/dev/loop-control', 'r+');
      try {
        loopCtlRemove(fd, n);
      } catch {
        // not there
      } finally {
        closeSync(fd);
      }
    };
    undo.push(remove);
    const r = await ulobdev([...cacheArgs(), '--daemon', '--run-dir', s.runDir, loop, disk]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe(`${loop}\n`);
    undo.push(() => ulobdev(['detach', loop, '--run-dir', s.runDir]));
    expect(mustSh('blockdev', ['--getsize64', loop]).trim()).toBe(String(16 << 20));
    expect((await ulobdev(['detach', loop, '--run-dir', s.runDir])).code).toBe(0);
    undo.pop();
  });
});

describe('the log and the help (item 16)', () => {
  it('ulobdev --help shows the attach form with --writeback and --flush', async () => {
    s = scratch('ulob-typing-');
    const r = await ulobdev(['--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("ulobdev --writeback --flush '*/30 * * * *' /dev/loop6 /dev/sdb");
    expect(r.stdout.split('\n')[0]).toBe('Usage: ulobdev [attach] [options] DEVICE BACKEND | <command> [options] [DEVICE|NAME]');
    const attach = await ulobdev(['attach', '--help']);
    for (const o of ['--writeback', '--flush <CRON>', '--hydrate-rate <RATE>', '--allow-remote']) expect(attach.stdout).toContain(o);
  });

  it('a usage error is one line, not the help', async () => {
    s = scratch('ulob-typing-');
    await expectRefused(['/dev/loop3'], /^ulobdev: missing required argument 'BACKEND' \(usage: ulobdev \[options\] DEVICE BACKEND, e\.g\. 'ulobdev --writeback \/dev\/loop6 \/dev\/sdb'; 'ulobdev attach --help' says more\)\n$/);
    // Another command's: its own usage.
    await expectRefused(['discard'], /^ulobdev: missing required argument 'BACKEND' \(usage: ulobdev discard \[options\] <BACKEND>; 'ulobdev discard --help' says more\)\n$/);
  });

  it('JSON lines with one device key when not on a terminal', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    const r = await attachDaemon([...cacheArgs(), '--name', 'data'], serveUrl(), disk);
    expect(r.stderr).toBe('');
    const lines = readFileSync(join(s.runDir, 'data.log'), 'utf8').split('\n').filter((l) => l.startsWith('{'));
    expect(lines.length).toBeGreaterThan(1);
    for (const line of lines) {
      expect(line.match(/"device":/g)?.length ?? 0, line).toBeLessThanOrEqual(1);
      JSON.parse(line);
    }
    expect(lines.some((l) => JSON.parse(l).msg === 'attached' && JSON.parse(l).device === serveUrl() && JSON.parse(l).name === 'data')).toBe(true);
  });

  it('human-readable lines and a hint on a terminal', async () => {
    s = scratch('ulob-typing-');
    const disk = makeDisk('disk.img');
    const url = serveUrl();
    // script(1) gives the foreground run a pseudo-terminal.
    const cmd = [process.execPath, CLI, ...cacheArgs(), '--run-dir', s.runDir, url, disk].map((a) => `'${a}'`).join(' ');
    const child = spawn('script', ['-qefc', cmd, '/dev/null'], { stdio: ['pipe', 'pipe', 'pipe'], env: testEnv(['--run-dir', s.runDir]) });
    let out = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    const exited = new Promise<number | null>((r) => child.once('exit', r));
    undo.push(() => child.exitCode === null && child.kill('SIGKILL'));
    for (let i = 0; i < 300 && !out.includes('Ctrl-C detaches'); i++) await new Promise((r) => setTimeout(r, 50));
    expect(out).toContain(`connect to ${url} from another shell; Ctrl-C detaches`);
    const d = await ulobdev(['detach', url, '--run-dir', s.runDir]);
    expect(d.code, d.stderr).toBe(0);
    expect(await exited).toBe(0);
    const plain = out.replace(/\x1b\[[0-9;]*m/g, '');
    expect(plain).not.toContain('{"level"');
    expect(plain).toMatch(/\[\d\d:\d\d:\d\d\] INFO: attached/);
    expect(plain).toMatch(/INFO: detached/);
  });
});
