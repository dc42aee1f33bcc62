// posixStorage's write path: small writes issued in one event-loop turn reach the threadpool as one
// job (native pwriteList), yet each resolves or rejects on its own; large writes and O_DIRECT files
// are not gathered.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';

const calls = vi.hoisted(() => ({ list: [] as number[], single: 0, preads: 0 }));
vi.mock('../../src/native/io.js', async (importOriginal) => {
  const io = await importOriginal<typeof import('../../src/native/io.js')>();
  return {
    ...io,
    pwriteList: (fd: number, buffers: Uint8Array[], positions: Float64Array) => {
      calls.list.push(buffers.length);
      return io.pwriteList(fd, buffers, positions);
    },
    pread: (...args: Parameters<typeof io.pread>) => {
      calls.preads++;
      return io.pread(...args);
    },
    pwrite: (...args: Parameters<typeof io.pwrite>) => {
      calls.single++;
      return io.pwrite(...args);
    },
  };
});

const { posixStorage } = await import('../../src/storage/posix-storage.js');
const { NativeError } = await import('../../src/native/addon.js');

let dir: string;
beforeEach(() => {
  dir = mkdtempSync('/var/tmp/ulob-posix-');
  calls.list.length = 0;
  calls.single = 0;
  calls.preads = 0;
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

describe('posixStorage writes', () => {
  it('gathers the small writes of one turn into one threadpool job; each lands where it was aimed', async () => {
    const path = join(dir, 'f');
    const file = await posixStorage.open(path, { create: true });
    await file.allocate(1 << 20);
    const data = randomBytes(1 << 20);
    const writes = [];
    for (let i = 0; i < 40; i++) writes.push(file.write(data.subarray(i * 8192, i * 8192 + 4096), i * 8192));
    await Promise.all(writes);
    expect(calls.list).toEqual([40]);
    // The next turn is a new job; a write above 64 KiB goes alone.
    await Promise.all([file.write(data.subarray(4096, 8192), 4096), file.write(data.subarray(327680, 327680 + 131072), 327680)]);
    expect(calls.list).toEqual([40]);
    expect(calls.single).toBe(2);
    await file.close();
    const back = readFileSync(path);
    for (let i = 0; i < 40; i++) expect(back.subarray(i * 8192, i * 8192 + 4096).equals(data.subarray(i * 8192, i * 8192 + 4096))).toBe(true);
    expect(back.subarray(4096, 8192).equals(data.subarray(4096, 8192))).toBe(true);
    expect(back.subarray(327680, 327680 + 131072).equals(data.subarray(327680, 327680 + 131072))).toBe(true);
  });

  it('a write that fails in a gathered job rejects alone, with the errno of its own pwrite', async () => {
    const path = join(dir, 'g');
    writeFileSync(path, Buffer.alloc(65536));
    const file = await posixStorage.open(path, { readOnly: true });
    const results = await Promise.allSettled([file.write(Buffer.alloc(512), 0), file.write(Buffer.alloc(512), 4096)]);
    expect(calls.list).toEqual([2]);
    for (const r of results) {
      expect(r.status).toBe('rejected');
      const err = (r as PromiseRejectedResult).reason as InstanceType<typeof NativeError>;
      expect(err).toBeInstanceOf(NativeError);
      expect(err).toMatchObject({ code: 'EBADF', syscall: 'pwrite' });
      expect(err.message).toMatch(/^EBADF: bad file descriptor, pwrite$/);
    }
    await file.close();
  });

  it('does not gather writes to an O_DIRECT file: each keeps its own place in the disk queue', async () => {
    const path = join(dir, 'h');
    writeFileSync(path, Buffer.alloc(65536));
    const file = await posixStorage.open(path, { direct: true });
    const { alignedBuffer } = await import('../../src/native/io.js');
    const buf = alignedBuffer(8192);
    await Promise.all([file.write(buf.subarray(0, 4096), 0), file.write(buf.subarray(4096), 4096)]);
    expect(calls.list).toEqual([]);
    expect(calls.single).toBe(2);
    await file.close();
  });
});

describe('posixStorage reads and writes done now (readNow, writeNow)', () => {
  it('writeNow writes small buffered writes on the calling thread; large ones, O_DIRECT files and failures are declined, never thrown', async () => {
    const path = join(dir, 'n');
    const file = await posixStorage.open(path, { create: true });
    await file.allocate(1 << 20);
    const data = randomBytes(1 << 20);
    // Every write seen to take no time: on a loaded machine one took over 1 ms and the next was
    // declined by the backoff (the cc10 clean-clone run), which the next test covers on its own.
    const now = vi.spyOn(performance, 'now').mockReturnValue(1000);
    try {
      expect(file.writeNow!(data.subarray(0, 4096), 8192)).toBe(true);
      expect(file.writeNow!(data.subarray(0, 64 * 1024), 65536)).toBe(true);
    } finally {
      now.mockRestore();
    }
    // Over 64 KiB: the threadpool's.
    expect(file.writeNow!(data.subarray(0, 64 * 1024 + 1), 262144)).toBe(false);
    expect(file.writeNow!(Buffer.alloc(0), 0)).toBe(false);
    expect(calls.list).toEqual([]);
    expect(calls.single).toBe(0);
    const back = readFileSync(path);
    expect(back.subarray(8192, 12288).equals(data.subarray(0, 4096))).toBe(true);
    expect(back.subarray(65536, 131072).equals(data.subarray(0, 65536))).toBe(true);
    expect(back.subarray(262144, 262145)[0]).toBe(0);
    // readNow: what the page cache holds (all of it, just written).
    const got = Buffer.alloc(4096);
    expect(file.readNow!(got, 8192)).toBe(true);
    expect(got.equals(data.subarray(0, 4096))).toBe(true);
    // Past the end of the file: short, declined.
    expect(file.readNow!(got, (1 << 20) - 100)).toBe(false);
    await file.close();

    // A read-only file: the pwrite fails (EBADF); declined, for write() to report.
    const ro = await posixStorage.open(path, { readOnly: true });
    expect(ro.writeNow!(Buffer.alloc(512), 0)).toBe(false);
    await ro.close();
    const direct = await posixStorage.open(path, { direct: true });
    const { alignedBuffer } = await import('../../src/native/io.js');
    const buf = alignedBuffer(4096);
    expect(direct.writeNow!(buf, 0)).toBe(false);
    expect(direct.readNow!(buf, 0)).toBe(false);
    await direct.close();
  });

  it('a writeNow that held the thread over 1 ms makes it decline for 20 ms, doubling while writes stay slow; a fast one resets it', async () => {
    const path = join(dir, 's');
    const file = await posixStorage.open(path, { create: true });
    await file.allocate(65536);
    /** What performance.now() says next: the start and the end of a write. */
    let clock: number[] = [];
    const now = vi.spyOn(performance, 'now').mockImplementation(() => clock.shift() ?? NaN);
    /** writeNow at time `at`, seen to take `took` ms. */
    const write = (at: number, took: number, fill: number) => {
      clock = [at, at + took];
      return file.writeNow!(Buffer.alloc(4096, fill), 0);
    };
    try {
      expect(write(1000, 0.5, 1)).toBe(true);
      // 2 ms (a throttled page cache, a journal commit, a preemption): 20 ms off the thread.
      expect(write(2000, 2, 2)).toBe(true);
      expect(write(2021, 0, 3)).toBe(false);
      // Slow again: 40 ms, then 80.
      expect(write(2023, 2, 4)).toBe(true);
      expect(write(2064, 0, 5)).toBe(false);
      expect(write(2066, 2, 6)).toBe(true);
      expect(write(2146, 0, 7)).toBe(false);
      // Fast once more: back to 20 ms after the next slow one.
      expect(write(2149, 0.1, 8)).toBe(true);
      expect(write(3000, 2, 9)).toBe(true);
      expect(write(3021, 0, 10)).toBe(false);
      expect(write(3023, 0.1, 11)).toBe(true);
      // Never off for more than 2 s, however long it stays slow.
      let at = 4000;
      for (let i = 0; i < 12; i++) {
        expect(write(at, 2, 12)).toBe(true);
        at += 2 + Math.min(2000, 20 * 2 ** i) + 0.5;
      }
      expect(write(at - 1, 0, 13)).toBe(false);
    } finally {
      now.mockRestore();
    }
    expect(readFileSync(path)[0]).toBe(12);
    await file.close();
  });
});

describe('posixStorage reads', () => {
  it('copies cached reads of up to 128 KiB on the calling thread; longer ones, cached or not, go to the threadpool', async () => {
    const path = join(dir, 'r');
    const data = randomBytes(1 << 20);
    writeFileSync(path, data);
    const file = await posixStorage.open(path);
    readFileSync(path); // in the page cache
    const small = Buffer.alloc(128 * 1024);
    expect(await file.read(small, 4096)).toBe(small.byteLength);
    expect(small.equals(data.subarray(4096, 4096 + small.byteLength))).toBe(true);
    expect(file.readNow!(small, 8192)).toBe(true);
    expect(calls.preads).toBe(0);
    const large = Buffer.alloc(128 * 1024 + 512);
    expect(file.readNow!(large, 0)).toBe(false);
    expect(await file.read(large, 512)).toBe(large.byteLength);
    expect(large.equals(data.subarray(512, 512 + large.byteLength))).toBe(true);
    expect(calls.preads).toBe(1);
    await file.close();
  });
});
