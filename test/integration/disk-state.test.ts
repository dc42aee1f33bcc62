// The backing disk's state in status: a disk that starts failing (nbdkit's error filter under a
// FUSE file, the daemon's backing file) shows as failing with the error; once it answers again,
// ok, with the last error kept; a disk whose transport is gone (nbdkit killed) shows as gone. A
// flush against the failing disk fails, the data stays dirty, and both the flush and the disk
// say why.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { killStrays, mustSh, prepareCliTests, scratch, sh, ulobdev } from '../support/cli.js';

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

async function waitFor(what: string, ok: () => boolean): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (ok()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/**
 * A 64 MiB disk that fails every request while `trigger` exists: nbdkit's memory plugin behind its
 * error filter, exported as one file by nbdfuse. Returns the file and a way to kill nbdkit.
 */
async function flakyDisk(): Promise<{ file: string; trigger: string; killServer: () => void }> {
  const sock = join(s.dir, 'nbdkit.sock');
  const trigger = join(s.dir, 'trigger');
  const pidfile = join(s.dir, 'nbdkit.pid');
  mustSh('nbdkit', ['-U', sock, '-P', pidfile, '--filter=error', 'memory', '64M', 'error-rate=100%', `error-file=${trigger}`]);
  const killServer = () => {
    if (existsSync(pidfile)) sh('kill', [readFileSync(pidfile, 'utf8').trim()]);
  };
  undo.push(killServer);
  const mnt = join(s.dir, 'fuse');
  mkdirSync(mnt);
  const fuse: ChildProcess = spawn('nbdfuse', [join(mnt, 'disk'), '--unix', sock], { stdio: 'ignore' });
  undo.push(() => {
    sh('fusermount3', ['-u', mnt]);
    fuse.kill('SIGKILL');
  });
  await waitFor('nbdfuse', () => existsSync(join(mnt, 'disk')));
  return { file: join(mnt, 'disk'), trigger, killServer };
}

describe('the backing disk state in status', () => {
  it('ok, failing with the error, ok again, and gone', async () => {
    s = scratch('ulob-disk-state-');
    const disk = await flakyDisk();
    const sock = join(s.dir, 'dev.sock');
    const r = await ulobdev(['--writeback', '-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap'), '--name', 'd', '--daemon', '--run-dir', s.runDir, `nbd+unix:///?socket=${sock}`, disk.file]);
    expect(r.code, r.stderr).toBe(0);
    undo.push(() => ulobdev(['detach', 'd', '--run-dir', s.runDir]));
    const status = async () => JSON.parse((await ulobdev(['status', 'd', '--json', '--run-dir', s.runDir])).stdout);
    const text = async () => (await ulobdev(['status', 'd', '--run-dir', s.runDir])).stdout;
    // Reads of blocks not cached yet, far apart, so no readahead of the FUSE file has them.
    const read = (mib: number) => sh('qemu-io', ['-f', 'raw', '-c', `read ${mib}M 4k`, `nbd+unix:///ulobdev?socket=${sock}`]);

    read(1);
    expect((await status()).disk).toEqual({ state: 'ok', lastError: null, lastErrorAt: null, errors: 0, waitingSeconds: null });
    expect(await text()).toMatch(/\n {2}backing disk ok\n/);

    writeFileSync(disk.trigger, '');
    expect(read(20).stdout + read(20).stderr).toMatch(/Input\/output error/);
    const failing = (await status()).disk;
    expect(failing.state).toBe('failing');
    expect(failing.lastError).toMatch(/EIO/);
    expect(failing.errors).toBeGreaterThan(0);
    expect(await text()).toMatch(/\n {2}backing disk FAILING; last error .*: .*EIO/);

    // A flush while it fails: refused by the disk, the data stays dirty, both say why.
    expect(sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 8M 64k', '-c', 'flush', `nbd+unix:///ulobdev?socket=${sock}`]).status).toBe(0);
    const flush = await ulobdev(['flush', 'd', '--wait', '--run-dir', s.runDir]);
    expect(flush.code).not.toBe(0);
    const afterFlush = await status();
    expect(afterFlush.dirtyBytes).toBe(64 << 10);
    expect(afterFlush.writeback.lastError).toMatch(/EIO/);
    expect(afterFlush.disk.state).toBe('failing');

    rmSync(disk.trigger);
    expect(read(30).status).toBe(0);
    const again = (await status()).disk;
    expect(again.state).toBe('ok');
    expect(again.lastError).toMatch(/EIO/);
    expect(again.lastErrorAt).toBeGreaterThanOrEqual(failing.lastErrorAt);

    disk.killServer();
    read(40);
    const gone = (await status()).disk;
    expect(gone.state).toBe('gone');
    expect(gone.lastError).toMatch(/ESHUTDOWN|ENOTCONN/);
    expect(await text()).toMatch(/\n {2}backing disk GONE; last error/);
  });
});
