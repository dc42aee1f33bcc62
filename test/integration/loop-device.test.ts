// /dev/loopN end to end through the real CLI: ext4 made, mounted, written, checked by fsck,
// re-attached with the same cache; read-only mode; the daemon lifecycle (--daemon, status,
// detach, SIGTERM).
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { shaOf, useLoopFixture, type Scratch } from '../support/loop-fixture.js';
import { attachFreeLoop, CLI, mustSh, prepareCliTests, sh, testEnv, ulobdev, type CliResult } from '../support/cli.js';

const fx = useLoopFixture();
let s: Scratch;

beforeAll(() => {
  prepareCliTests();
});

const sha = shaOf;

async function attach(args: string[]): Promise<string> {
  const { loop, result } = await attachFreeLoop((dev) => ulobdev([...args, '--daemon', '--run-dir', s.runDir, '--state-dir', s.stateDir, dev, join(s.dir, 'disk.img')]));
  expect(result.stdout.trim()).toBe(loop);
  fx.attached(loop);
  return loop;
}

async function detach(loop: string): Promise<void> {
  const r = await ulobdev(['detach', loop, '--run-dir', s.runDir]);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  fx.detached(loop);
}

const { mount, umount } = fx;

describe('/dev/loopN frontend', () => {
  it('carries an ext4 filesystem in write-back mode across detach and re-attach', async () => {
    s = fx.scratch('ulob-loop-');
    const disk = join(s.dir, 'disk.img');
    mustSh('truncate', ['-s', '128M', disk]);
    const diskBefore = sha(disk);
    const cacheArgs = ['-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap'), '--writeback'];
    const loop = await attach(cacheArgs);

    mustSh('mkfs.ext4', ['-q', loop]);
    const mnt = join(s.dir, 'mnt');
    mount(loop, mnt);
    const files = new Map<string, string>();
    for (let i = 0; i < 12; i++) {
      const data = randomBytes(1024 * (1 + i * 97));
      writeFileSync(join(mnt, `f${i}`), data);
      files.set(`f${i}`, createHash('sha256').update(data).digest('hex'));
    }
    umount(mnt);
    const fsck = sh('fsck.ext4', ['-fn', loop]);
    expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);

    const status = JSON.parse((await ulobdev(['status', loop, '--json', '--run-dir', s.runDir])).stdout);
    expect(status).toMatchObject({ device: loop, frontend: 'loop', mode: 'writeback', size: 128 << 20 });
    expect(status.dirtyBytes).toBeGreaterThan(1 << 20);
    await detach(loop);
    // Write-back: nothing reached the disk yet.
    expect(sha(disk)).toBe(diskBefore);

    const again = await attach(cacheArgs);
    mount(again, mnt);
    for (const [name, sum] of files) expect(sha(join(mnt, name)), name).toBe(sum);
    umount(mnt);
    await detach(again);
  });

  it('is read-only without --writeback: writes fail, reads work', async () => {
    s = fx.scratch('ulob-loop-ro-');
    const disk = join(s.dir, 'disk.img');
    mustSh('truncate', ['-s', '64M', disk]);
    mustSh('mkfs.ext4', ['-q', disk]);
    const before = sha(disk);
    const loop = await attach(['-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap')]);
    expect(mustSh('blockdev', ['--getro', loop]).trim()).toBe('1');
    const dd = sh('dd', ['if=/dev/zero', `of=${loop}`, 'bs=4096', 'count=1', 'oflag=direct']);
    expect(dd.status).not.toBe(0);
    const mnt = join(s.dir, 'mnt');
    mount(loop, mnt, ['-o', 'ro']);
    expect(existsSync(join(mnt, 'lost+found'))).toBe(true);
    umount(mnt);
    await detach(loop);
    expect(sha(disk)).toBe(before);
  });

  it('refuses to detach while mounted, and keeps serving', async () => {
    s = fx.scratch('ulob-loop-busy-');
    mustSh('truncate', ['-s', '64M', join(s.dir, 'disk.img')]);
    mustSh('mkfs.ext4', ['-q', join(s.dir, 'disk.img')]);
    const loop = await attach(['-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap'), '--writeback']);
    const mnt = join(s.dir, 'mnt');
    mount(loop, mnt);
    const r = await ulobdev(['detach', loop, '--run-dir', s.runDir]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^ulobdev: .*is mounted on .*; unmount it first\n$/);
    writeFileSync(join(mnt, 'still-here'), 'yes');
    umount(mnt);
    await detach(loop);
  });

  it('runs in the foreground and detaches on SIGTERM', async () => {
    s = fx.scratch('ulob-loop-fg-');
    mustSh('truncate', ['-s', '32M', join(s.dir, 'disk.img')]);
    // In the foreground the command prints the device once it serves it; a test beside this one may
    // take the free device first (the command exits refusing it), so the next free one is tried.
    let child!: ChildProcess;
    const { loop, result } = await attachFreeLoop(
      (dev) =>
        new Promise<CliResult>((resolve) => {
          const args = ['-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap'), '--run-dir', s.runDir, dev, join(s.dir, 'disk.img')];
          child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: testEnv(args) });
          let out = '';
          let err = '';
          child.stdout!.setEncoding('utf8');
          child.stderr!.setEncoding('utf8');
          child.stderr!.on('data', (c: string) => (err += c));
          child.stdout!.on('data', (c: string) => {
            out += c;
            if (out.includes('\n')) resolve({ code: 0, stdout: out, stderr: err });
          });
          child.once('close', (code) => resolve({ code: code ?? 1, stdout: out, stderr: `exited early: ${err}` }));
        }),
      'the foreground attach failed',
    );
    expect(result.stdout.trim()).toBe(loop);
    expect(mustSh('losetup', ['-n', '-O', 'BACK-FILE', loop])).toContain(join(s.runDir, 'loop'));
    const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
    child.kill('SIGTERM');
    expect(await exited).toBe(0);
    expect(sh('losetup', ['-n', '-O', 'BACK-FILE', loop]).stdout.trim()).toBe('');
    expect(existsSync(join(s.runDir, `${loop.slice(5)}.sock`))).toBe(false);
  });
});
