// The backing disk's state for status (src/source/health.ts): each I/O that reaches the disk says
// ok or not, an errno that means the disk or its transport is gone says gone, a later success says
// ok again (the last error stays, with its time), and a block device that left sysfs is gone
// without any I/O.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { devicePresence } from '../../src/source/backing.js';
import { DiskHealth, STUCK_AFTER_MS } from '../../src/source/health.js';
import { majorMinor } from '../../src/sys.js';
import type { WritableSource } from '../../src/source/source.js';

function errno(code: string, message = `${code}: failed, pread`): Error {
  return Object.assign(new Error(message), { code });
}

/** A source whose next calls fail with the queued errors, then succeed. */
function flakySource(): WritableSource & { fail: Error[] } {
  const fail: Error[] = [];
  const io = async () => {
    const e = fail.shift();
    if (e) throw e;
  };
  return { fail, size: 1 << 20, id: 'test', description: 'test disk', readAt: io, writeAt: io, sync: io, close: async () => undefined };
}

describe('DiskHealth', () => {
  it('is ok until an I/O fails, failing after, and ok again after the next success (keeping the error)', async () => {
    const health = new DiskHealth();
    const src = flakySource();
    const watched = health.watch(src) as WritableSource;
    expect(health.status()).toEqual({ state: 'ok', lastError: null, lastErrorAt: null, errors: 0, waitingSeconds: null });
    src.fail.push(errno('EIO', 'EIO: i/o error, pread'));
    await expect(watched.readAt(Buffer.alloc(8), 0)).rejects.toThrow(/EIO/);
    const failing = health.status();
    expect(failing).toMatchObject({ state: 'failing', lastError: 'EIO: i/o error, pread', errors: 1 });
    expect(failing.lastErrorAt).toBeGreaterThan(Date.now() - 5000);
    // Writes and syncs count too (the flusher's).
    src.fail.push(errno('EIO', 'EIO: i/o error, fdatasync'));
    await expect(watched.sync()).rejects.toThrow();
    expect(health.status()).toMatchObject({ state: 'failing', lastError: 'EIO: i/o error, fdatasync', errors: 2 });
    await watched.writeAt(Buffer.alloc(8), 0);
    expect(health.status()).toMatchObject({ state: 'ok', lastError: 'EIO: i/o error, fdatasync', errors: 2 });
  });

  it("keeps the flusher's fast paths (writeMany, zeroAt) of the disk it watches, and counts their errors", async () => {
    const health = new DiskHealth();
    const src = flakySource();
    const calls: string[] = [];
    const disk = Object.assign(src, {
      writeMany: async (_buf: Uint8Array, pieces: ReadonlyArray<readonly [number, number, number]>) => {
        calls.push(`many ${pieces.length}`);
        await src.writeAt();
      },
      zeroAt: async (position: number, length: number) => {
        calls.push(`zero ${position}+${length}`);
        await src.writeAt();
      },
    });
    const watched = health.watch(disk) as WritableSource;
    expect(typeof watched.writeMany).toBe('function');
    expect(typeof watched.zeroAt).toBe('function');
    await watched.writeMany!(Buffer.alloc(8192), [
      [0, 4096, 0],
      [4096, 4096, 8192],
    ]);
    await watched.zeroAt!(4096, 4096);
    expect(calls).toEqual(['many 2', 'zero 4096+4096']);
    src.fail.push(errno('EIO', 'EIO: i/o error, pwrite'));
    await expect(watched.writeMany!(Buffer.alloc(4096), [[0, 4096, 0]])).rejects.toThrow(/EIO/);
    expect(health.status()).toMatchObject({ state: 'failing', errors: 1 });
  });

  it("counts a hydration stream's disk-side failures (pread), not its cache-side ones (pwrite), and a success after", async () => {
    const health = new DiskHealth();
    const src = flakySource();
    const calls: string[] = [];
    const disk = Object.assign(src, {
      streamInto: async (_into: unknown, _buf: Uint8Array, position: number, _intoPosition: number, length: number) => {
        calls.push(`stream ${position}+${length}`);
        await src.readAt();
      },
    });
    const watched = health.watch(disk) as WritableSource;
    const cache = {} as never;
    src.fail.push(Object.assign(errno('ENOSPC', 'ENOSPC: no space left on device, pwrite'), { syscall: 'pwrite' }));
    await expect(watched.streamInto!(cache, Buffer.alloc(4096), 0, 0, 1 << 20)).rejects.toThrow(/ENOSPC/);
    expect(health.status()).toMatchObject({ state: 'ok', errors: 0 });
    src.fail.push(Object.assign(errno('EIO', 'EIO: i/o error, pread'), { syscall: 'pread' }));
    await expect(watched.streamInto!(cache, Buffer.alloc(4096), 1 << 20, 1 << 20, 1 << 20)).rejects.toThrow(/EIO/);
    expect(health.status()).toMatchObject({ state: 'failing', errors: 1, lastError: 'EIO: i/o error, pread' });
    await watched.streamInto!(cache, Buffer.alloc(4096), 2 << 20, 2 << 20, 1 << 20);
    expect(health.status()).toMatchObject({ state: 'ok', errors: 1 });
    expect(calls).toEqual(['stream 0+1048576', 'stream 1048576+1048576', 'stream 2097152+1048576']);
  });

  it.each(['ENODEV', 'ENXIO', 'ENOMEDIUM', 'ENOTCONN', 'ESHUTDOWN', 'ESTALE'])('calls %s gone', async (code) => {
    const health = new DiskHealth();
    const src = flakySource();
    src.fail.push(errno(code));
    await expect(health.watch(src).readAt(Buffer.alloc(8), 0)).rejects.toThrow();
    expect(health.status().state).toBe('gone');
  });

  it('calls other errors failing (a short read, a timeout, an error without errno)', async () => {
    for (const err of [errno('ULOB_E_IO', 'short read from disk at 0'), errno('ETIMEDOUT'), new Error('boom')]) {
      const health = new DiskHealth();
      const src = flakySource();
      src.fail.push(err);
      await expect(health.watch(src).readAt(Buffer.alloc(8), 0)).rejects.toThrow();
      expect(health.status().state).toBe('failing');
    }
  });

  it('is stuck while an I/O has waited STUCK_AFTER_MS without an answer, and ok once it returns', async () => {
    const health = new DiskHealth();
    let answer!: () => void;
    const src = flakySource();
    src.writeAt = () => new Promise<void>((resolve) => (answer = resolve));
    const write = (health.watch(src) as WritableSource).writeAt(Buffer.alloc(8), 0);
    const t0 = Date.now();
    expect(health.status(t0 + STUCK_AFTER_MS - 1000)).toMatchObject({ state: 'ok', waitingSeconds: STUCK_AFTER_MS / 1000 - 1 });
    expect(health.status(t0 + STUCK_AFTER_MS + 2000)).toMatchObject({ state: 'stuck', waitingSeconds: STUCK_AFTER_MS / 1000 + 2 });
    // Another I/O that comes back meanwhile does not hide the one still waiting.
    await health.watch(flakySource()).readAt(Buffer.alloc(8), 0);
    expect(health.status(t0 + STUCK_AFTER_MS + 2000).state).toBe('stuck');
    answer();
    await write;
    expect(health.status(t0 + STUCK_AFTER_MS + 2000)).toEqual({ state: 'ok', lastError: null, lastErrorAt: null, errors: 0, waitingSeconds: null });
  });

  it('is gone as soon as the device has left, without any I/O', () => {
    let present = true;
    const health = new DiskHealth({ present: () => present });
    expect(health.status().state).toBe('ok');
    present = false;
    expect(health.status()).toEqual({ state: 'gone', lastError: null, lastErrorAt: null, errors: 0, waitingSeconds: null });
  });
});

describe('devicePresence', () => {
  it('is false once the device number holds another disk (a new diskseq)', () => {
    const dir = mkdtempSync('/var/tmp/ulob-presence-');
    const loops: string[] = [];
    try {
      for (const name of ['a', 'b']) writeFileSync(join(dir, name), Buffer.alloc(1 << 20));
      const loop = execFileSync('losetup', ['-f', '--show', join(dir, 'a')], { encoding: 'utf8' }).trim();
      loops.push(loop);
      const present = devicePresence(majorMinor(statSync(loop).rdev));
      expect(present()).toBe(true);
      execFileSync('losetup', ['-d', loop]);
      loops.pop();
      // The same /dev/loopN, bound to another file: another disk to anyone who opened the first.
      execFileSync('losetup', [loop, join(dir, 'b')]);
      loops.push(loop);
      expect(present()).toBe(false);
      expect(devicePresence('259:999999')()).toBe(false);
    } finally {
      for (const l of loops) execFileSync('losetup', ['-d', l]);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
