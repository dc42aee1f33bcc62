import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import fc from 'fast-check';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { NativeError } from '../../src/native/addon.js';
import { bitClearRange, bitCount, bitFindNextClear, bitFindNextSet, bitSetRange } from '../../src/native/bitmap.js';
import { blkFlsBuf, blkGetSize64, blkPhysicalSectorSize, blkSectorSize } from '../../src/native/blkdev.js';
import { alignedBuffer, copyRange, copyRanges, copyStream, fallocate, fdatasync, isAligned, pread, preadNowait, pwrite, pwriteList } from '../../src/native/io.js';
import {
  ULOOP_ABI_VERSION,
  ULOOP_CONTROL,
  ULOOP_F_WRITEBACK,
  ULOOP_MSG_BARRIER,
  ULOOP_MSG_INTENT,
  ULOOP_MSG_MISS,
  ULOOP_MSG_PRESERVE,
  UloopWatch,
  uloopReply,
  type UloopMessage,
} from '../../src/native/uloop.js';

const GiB = 2 ** 30;
const { errno } = os.constants;

/** Asserts `fn` throws (synchronously) a NativeError with the given code and syscall. */
function expectNativeSync(fn: () => unknown, code: string, syscall: string): NativeError {
  try {
    fn();
  } catch (e) {
    expectNativeError(e, code, syscall);
    return e as NativeError;
  }
  throw new Error(`expected ${code} from ${syscall}, nothing was thrown`);
}

function expectNativeError(e: unknown, code: string, syscall: string): void {
  expect(e).toBeInstanceOf(NativeError);
  expect(e).toBeInstanceOf(Error);
  const err = e as NativeError;
  expect(err.name).toBe('NativeError');
  expect(err.code).toBe(code);
  expect(err.errno).toBe((errno as Record<string, number>)[code]);
  expect(err.syscall).toBe(syscall);
  expect(err.message.startsWith(`${code}: `)).toBe(true);
  expect(err.message.endsWith(`, ${syscall}`)).toBe(true);
}

async function expectNativeReject(p: Promise<unknown>, code: string, syscall: string): Promise<void> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  if (e === undefined) throw new Error(`expected ${code} from ${syscall}, the promise resolved`);
  expectNativeError(e, code, syscall);
}

/** Asserts `fn` throws synchronously a validation error (never reaches C++). */
function expectInvalid(fn: () => unknown, ctor: typeof TypeError | typeof RangeError, code: string, name: string): void {
  let thrown: unknown;
  try {
    fn();
  } catch (e) {
    thrown = e;
  }
  expect(thrown).toBeInstanceOf(ctor);
  expect(thrown).not.toBeInstanceOf(NativeError);
  expect((thrown as { code?: string }).code).toBe(code);
  expect((thrown as Error).message).toContain(`"${name}"`);
}

describe('positioned I/O on a regular file', () => {
  let dir: string;
  let file: string;
  let fd: number;

  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ulob-native-'));
    file = path.join(dir, 'data');
    fd = fs.openSync(file, 'w+');
  });

  afterAll(() => {
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('round-trips bytes, agreeing with node fs on where they land', async () => {
    const data = randomBytes(10_000);
    await pwrite(fd, data, 0, data.length, 123);
    const viaFs = Buffer.alloc(data.length);
    expect(fs.readSync(fd, viaFs, 0, viaFs.length, 123)).toBe(data.length);
    expect(viaFs.equals(data)).toBe(true);

    const back = Buffer.alloc(data.length);
    expect(await pread(fd, back, 0, back.length, 123)).toBe(data.length);
    expect(back.equals(data)).toBe(true);
  });

  it('works at positions above 4 GiB and 1 TiB (sparse)', async () => {
    for (const position of [5 * GiB + 7, 2 ** 40 + 3]) {
      const data = randomBytes(3000);
      await pwrite(fd, data, 0, data.length, position);
      const viaFs = Buffer.alloc(data.length);
      fs.readSync(fd, viaFs, 0, viaFs.length, position);
      expect(viaFs.equals(data)).toBe(true);

      fs.writeSync(fd, Buffer.from('marker'), 0, 6, position + 5000);
      const back = Buffer.alloc(6);
      expect(await pread(fd, back, 0, 6, position + 5000)).toBe(6);
      expect(back.toString()).toBe('marker');
    }
    expect(fs.fstatSync(fd).size).toBe(2 ** 40 + 3 + 5006);
    // A position near 2^53 is passed through intact: ext4 reports EOF there, not EINVAL.
    expect(await pread(fd, Buffer.alloc(8), 0, 8, Number.MAX_SAFE_INTEGER - 8)).toBe(0);
  });

  it('honours bufOffset and the byteOffset of Uint8Array subarrays', async () => {
    const backing = new Uint8Array(64).fill(0xee);
    const view = backing.subarray(5, 45); // starts at an odd address
    const payload = randomBytes(20);
    view.set(payload, 3);
    await pwrite(fd, view, 3, 20, 1000);
    const viaFs = Buffer.alloc(20);
    fs.readSync(fd, viaFs, 0, 20, 1000);
    expect(viaFs.equals(payload)).toBe(true);

    const into = new Uint8Array(64).fill(0x11);
    const intoView = into.subarray(7, 40);
    expect(await pread(fd, intoView, 2, 20, 1000)).toBe(20);
    expect(Buffer.from(into.subarray(9, 29)).equals(payload)).toBe(true);
    // Bytes outside the requested slice are untouched.
    expect([...into.subarray(0, 9)].every((b) => b === 0x11)).toBe(true);
    expect([...into.subarray(29)].every((b) => b === 0x11)).toBe(true);
  });

  it('returns a short count at end of file and 0 past it', async () => {
    const small = path.join(dir, 'small');
    fs.writeFileSync(small, randomBytes(100));
    const sfd = fs.openSync(small, 'r');
    try {
      const buf = Buffer.alloc(4096, 0xaa);
      expect(await pread(sfd, buf, 0, 4096, 50)).toBe(50);
      expect(buf.subarray(0, 50).equals(fs.readFileSync(small).subarray(50))).toBe(true);
      expect(buf[50]).toBe(0xaa);
      expect(await pread(sfd, buf, 0, 4096, 100)).toBe(0);
      expect(await pread(sfd, buf, 0, 4096, 10_000)).toBe(0);
    } finally {
      fs.closeSync(sfd);
    }
  });

  it('runs many requests concurrently on the threadpool', async () => {
    const blocks = Array.from({ length: 64 }, () => randomBytes(4096));
    await Promise.all(blocks.map((b, i) => pwrite(fd, b, 0, b.length, 1_000_000 + i * 4096)));
    const backs = blocks.map(() => Buffer.alloc(4096));
    const counts = await Promise.all(backs.map((b, i) => pread(fd, b, 0, 4096, 1_000_000 + i * 4096)));
    expect(counts.every((n) => n === 4096)).toBe(true);
    backs.forEach((b, i) => expect(b.equals(blocks[i]!)).toBe(true));
  });

  it('zero-length transfers resolve without touching the fd', async () => {
    expect(await pread(fd, Buffer.alloc(0), 0, 0, 0)).toBe(0);
    await expect(pwrite(fd, Buffer.alloc(4), 4, 0, 0)).resolves.toBeUndefined();
  });

  it('pwriteList writes each buffer at its position, in order, and reports each result', async () => {
    const buf = randomBytes(3 * 4096);
    const at = 1 << 20;
    // The third write overlaps the first: written later, it wins, as in order it must.
    const errnos = await pwriteList(fd, [buf.subarray(0, 4096), buf.subarray(4096, 4196), buf.subarray(8192)], Float64Array.of(at + 8192, at, at + 8192 + 1000));
    expect([...errnos]).toEqual([0, 0, 0]);
    const back = Buffer.alloc(8192 + 5096);
    fs.readSync(fd, back, 0, back.length, at);
    expect(back.subarray(0, 100).equals(buf.subarray(4096, 4196))).toBe(true);
    expect(back.subarray(8192, 8192 + 1000).equals(buf.subarray(0, 1000))).toBe(true);
    expect(back.subarray(8192 + 1000).equals(buf.subarray(8192))).toBe(true);
    expect((await pwriteList(fd, [], new Float64Array(0))).length).toBe(0);
  });

  it('pwriteList on a read-only fd fails each write with EBADF, not the call', async () => {
    const ro = fs.openSync(file, 'r');
    try {
      const errnos = await pwriteList(ro, [Buffer.alloc(10), Buffer.alloc(20)], Float64Array.of(0, 100));
      expect([...errnos]).toEqual([os.constants.errno.EBADF, os.constants.errno.EBADF]);
    } finally {
      fs.closeSync(ro);
    }
  });

  it('copyRange reads one file and writes what it read to another in one job; short at EOF, each side named on failure', async () => {
    const src = path.join(dir, 'copy-src');
    const dst = path.join(dir, 'copy-dst');
    const data = randomBytes(3 * 4096 + 100);
    fs.writeFileSync(src, data);
    fs.writeFileSync(dst, Buffer.alloc(64 * 1024, 0xee));
    const s = fs.openSync(src, 'r');
    const d = fs.openSync(dst, 'r+');
    try {
      const buf = Buffer.alloc(8192 + 10);
      // From src 4096 into dst 40000, through buf[10..].
      expect(await copyRange(s, 4096, d, 40_000, buf, 10, 8192)).toBe(8192);
      const back = fs.readFileSync(dst);
      expect(back.subarray(40_000, 48_192).equals(data.subarray(4096, 12_288))).toBe(true);
      expect(back[39_999]).toBe(0xee);
      expect(back[48_192]).toBe(0xee);
      // At the end of src: the count says short, and a partial copy writes nothing.
      expect(await copyRange(s, 3 * 4096, d, 0, buf, 0, 4096)).toBe(100);
      expect(fs.readFileSync(dst).subarray(0, 4096).equals(Buffer.alloc(4096, 0xee))).toBe(true);
      // copyRanges stops at the first short range: nothing of the batch is written, not the ranges
      // read before it, not the short one, not the ones after.
      const two = Buffer.alloc(3 * 4096);
      const ranges = Float64Array.from([0, 4096, 0, 0, 4096, 4096, 3 * 4096, 4096, 8192, 4096, 4096, 8192]);
      expect(await copyRanges(s, d, two, ranges)).toBe(4096 + 100);
      expect(fs.readFileSync(dst).subarray(0, 3 * 4096).equals(Buffer.alloc(3 * 4096, 0xee))).toBe(true);
      // A destination that cannot be written fails as pwrite, a source that cannot be read as pread.
      const ro = fs.openSync(dst, 'r');
      const wo = fs.openSync(src, 'a');
      try {
        await expect(copyRange(s, 0, ro, 0, buf, 0, 4096)).rejects.toMatchObject({ code: 'EBADF', syscall: 'pwrite' });
        await expect(copyRange(wo, 0, d, 0, buf, 0, 4096)).rejects.toMatchObject({ code: 'EBADF', syscall: 'pread' });
      } finally {
        fs.closeSync(ro);
        fs.closeSync(wo);
      }
      expect(() => copyRange(s, 0, d, 0, buf, 1, buf.length)).toThrow(RangeError);
    } finally {
      fs.closeSync(s);
      fs.closeSync(d);
    }
  });

  it('copyStream copies a long range through a smaller buffer in one job; a short piece and what follows are not written; EIO and EBADF name their side', async () => {
    const src = path.join(dir, 'stream-src');
    const dst = path.join(dir, 'stream-dst');
    const data = randomBytes(5 * 4096 + 100);
    fs.writeFileSync(src, data);
    fs.writeFileSync(dst, Buffer.alloc(64 * 1024, 0xee));
    const s = fs.openSync(src, 'r');
    const d = fs.openSync(dst, 'r+');
    try {
      // 5 pieces of 4096 bytes and one of 100 through buf[7..4103), from src 0 to dst 8192, with the
      // sequential advice on.
      const buf = Buffer.alloc(4096 + 7);
      expect(await copyStream(s, 0, d, 8192, buf, 7, 4096, data.length, true)).toBe(data.length);
      let back = fs.readFileSync(dst);
      expect(back.subarray(8192, 8192 + data.length).equals(data)).toBe(true);
      expect(back[8191]).toBe(0xee);
      expect(back[8192 + data.length]).toBe(0xee);
      // The last piece went through the buffer last; the 7 bytes before the slice were never touched.
      expect(buf.subarray(7, 107).equals(data.subarray(5 * 4096))).toBe(true);
      expect(buf.subarray(0, 7).equals(Buffer.alloc(7))).toBe(true);
      // A zero length copies nothing.
      expect(await copyStream(s, 0, d, 0, buf, 0, 4096, 0)).toBe(0);
      // Src ends inside the fifth piece: the four whole pieces before it are copied, the short
      // one is not written (dst keeps 0xee there), and the count says how far the copy got.
      fs.writeFileSync(dst, Buffer.alloc(64 * 1024, 0xee));
      expect(await copyStream(s, 4096, d, 0, buf, 0, 4096, 5 * 4096)).toBe(4 * 4096);
      back = fs.readFileSync(dst);
      expect(back.subarray(0, 4 * 4096).equals(data.subarray(4096, 5 * 4096))).toBe(true);
      expect(back.subarray(4 * 4096, 5 * 4096).equals(Buffer.alloc(4096, 0xee))).toBe(true);
      // A read that fails with EIO (this process's memory at address 0, which is never mapped)
      // fails the copy as pread, and nothing is written.
      fs.writeFileSync(dst, Buffer.alloc(64 * 1024, 0xee));
      const mem = fs.openSync('/proc/self/mem', 'r');
      try {
        await expectNativeReject(copyStream(mem, 0, d, 0, buf, 0, 4096, 8192), 'EIO', 'pread');
      } finally {
        fs.closeSync(mem);
      }
      expect(fs.readFileSync(dst).equals(Buffer.alloc(64 * 1024, 0xee))).toBe(true);
      // A destination that cannot be written fails as pwrite, a source that cannot be read as pread.
      const ro = fs.openSync(dst, 'r');
      const wo = fs.openSync(src, 'a');
      try {
        await expectNativeReject(copyStream(s, 0, ro, 0, buf, 0, 4096, 8192), 'EBADF', 'pwrite');
        await expectNativeReject(copyStream(wo, 0, d, 0, buf, 0, 4096, 8192), 'EBADF', 'pread');
      } finally {
        fs.closeSync(ro);
        fs.closeSync(wo);
      }
      // The piece must fit the buffer and hold at least a byte.
      expectInvalid(() => copyStream(s, 0, d, 0, buf, 8, 4096, 8192), RangeError, 'ERR_OUT_OF_RANGE', 'pieceLength');
      expectInvalid(() => copyStream(s, 0, d, 0, buf, 0, 0, 8192), RangeError, 'ERR_OUT_OF_RANGE', 'pieceLength');
    } finally {
      fs.closeSync(s);
      fs.closeSync(d);
    }
  });

  it('fdatasync resolves on a file', async () => {
    await expect(fdatasync(fd)).resolves.toBeUndefined();
  });

  it('fallocate allocates blocks and extends the size', async () => {
    const f = path.join(dir, 'alloc');
    const afd = fs.openSync(f, 'w+');
    try {
      await fallocate(afd, 0, 1 << 20);
      let st = fs.fstatSync(afd);
      expect(st.size).toBe(1 << 20);
      expect(st.blocks * 512).toBeGreaterThanOrEqual(1 << 20);

      await fallocate(afd, 5 * GiB, 65536);
      st = fs.fstatSync(afd);
      expect(st.size).toBe(5 * GiB + 65536);
      expect(st.blocks * 512).toBeGreaterThanOrEqual((1 << 20) + 65536);
      expect(st.blocks * 512).toBeLessThan(GiB); // still sparse in between
    } finally {
      fs.closeSync(afd);
    }
  });

  it('fallocate beyond the filesystem limit rejects with EFBIG', async () => {
    await expectNativeReject(fallocate(fd, 2 ** 50, 4096), 'EFBIG', 'fallocate');
  });
});

describe('preadNowait (preadv2 RWF_NOWAIT)', () => {
  it('returns page-cached bytes synchronously, 0 at EOF, and short counts at EOF', () => {
    const dir = fs.mkdtempSync(path.join('/var/tmp', 'ulob-nowait-'));
    try {
      const file = path.join(dir, 'data');
      const data = randomBytes(64 * 1024);
      fs.writeFileSync(file, data);
      const fd = fs.openSync(file, 'r');
      try {
        // Just written: in the page cache.
        const buf = Buffer.alloc(8192);
        expect(preadNowait(fd, buf, 0, 8192, 4096)).toBe(8192);
        expect(buf.equals(data.subarray(4096, 4096 + 8192))).toBe(true);
        expect(preadNowait(fd, buf, 0, 8192, data.length - 100)).toBe(100);
        expect(preadNowait(fd, buf, 0, 8192, data.length)).toBe(0);
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('answers -1 instead of waiting for a page that is not cached', () => {
    const dir = fs.mkdtempSync(path.join('/var/tmp', 'ulob-nowait-'));
    try {
      const file = path.join(dir, 'data');
      fs.writeFileSync(file, randomBytes(1 << 20));
      execFileSync('sync', [file]);
      const fd = fs.openSync(file, 'r');
      try {
        // Drop this file's clean pages from the page cache. POSIX_FADV_DONTNEED drains only this
        // CPU's LRU batch: a page still in another CPU's batch survives one drop (seen once in a
        // loaded host lane), so drop up to 5 times; a preadNowait that never answers -1 still fails.
        fs.fdatasyncSync(fd);
        const buf = Buffer.alloc(4096);
        const answers: number[] = [];
        for (let i = 0; i < 5 && answers.at(-1) !== -1; i++) {
          execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
          answers.push(preadNowait(fd, buf, 0, 4096, 512 * 1024));
        }
        expect(answers.at(-1), `answers after each drop: ${answers.join(', ')}`).toBe(-1);
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('throws NativeError for a bad fd', () => {
    expectNativeSync(() => preadNowait(987654, Buffer.alloc(16), 0, 16, 0), 'EBADF', 'preadv2');
  });
});

describe('O_DIRECT with alignedBuffer', () => {
  // /var/tmp is disk-backed here (tmpfs in os.tmpdir() may refuse O_DIRECT).
  let dir: string;
  let fd: number;

  beforeAll(() => {
    dir = fs.mkdtempSync('/var/tmp/ulob-native-direct-');
    fd = fs.openSync(
      path.join(dir, 'direct'),
      fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_DIRECT,
      0o600,
    );
  });

  afterAll(() => {
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('allocates zero-filled buffers of the requested size', () => {
    const b = alignedBuffer(12345);
    expect(Buffer.isBuffer(b)).toBe(true);
    expect(b.length).toBe(12345);
    expect(b.every((x) => x === 0)).toBe(true);
    expect(alignedBuffer(0).length).toBe(0);
    expect(alignedBuffer(4096, 65536).length).toBe(4096);
  });

  it('does O_DIRECT writes and reads with aligned memory', async () => {
    const out = alignedBuffer(8192);
    randomBytes(8192).copy(out);
    await pwrite(fd, out, 0, 8192, 4096);
    const back = alignedBuffer(8192, 512);
    expect(await pread(fd, back, 0, 8192, 4096)).toBe(8192);
    expect(back.equals(out)).toBe(true);
    // Aligned sub-slices stay aligned: 4096 bytes in.
    const half = alignedBuffer(4096);
    expect(await pread(fd, half, 0, 4096, 8192)).toBe(4096);
    expect(half.equals(out.subarray(4096))).toBe(true);
    await fdatasync(fd);
  });

  it('the same call with misaligned memory fails with EINVAL, so alignment is what made it work', async () => {
    const big = alignedBuffer(8192);
    await expectNativeReject(pread(fd, big, 1, 4096, 4096), 'EINVAL', 'pread');
    await expectNativeReject(pwrite(fd, big.subarray(3), 0, 4096, 4096), 'EINVAL', 'pwrite');
  });

  it('isAligned knows alignedBuffer memory and its aligned slices, and nothing else', () => {
    const b = alignedBuffer(3 * 4096);
    expect(isAligned(b, 4096)).toBe(true);
    expect(isAligned(b.subarray(4096), 4096)).toBe(true);
    expect(isAligned(b.subarray(512), 4096)).toBe(false);
    expect(isAligned(b.subarray(512), 512)).toBe(true);
    expect(isAligned(alignedBuffer(4096, 512), 4096)).toBe(false);
    expect(isAligned(Buffer.alloc(65536), 512)).toBe(false);
  });

  it('survives many short-lived buffers (finalizer frees them)', () => {
    for (let i = 0; i < 2000; i++) alignedBuffer(64 * 1024)[0] = 1;
    expect(alignedBuffer(16)[0]).toBe(0);
  });
});

describe('errors from C++ are NativeError', () => {
  let dir: string;
  let file: string;

  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ulob-native-err-'));
    file = path.join(dir, 'f');
    fs.writeFileSync(file, 'hello');
  });

  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('pread/pwrite/fdatasync/fallocate on a closed fd reject with EBADF', async () => {
    const fd = fs.openSync(file, 'r+');
    fs.closeSync(fd);
    await expectNativeReject(pread(fd, Buffer.alloc(4), 0, 4, 0), 'EBADF', 'pread');
    await expectNativeReject(pwrite(fd, Buffer.alloc(4), 0, 4, 0), 'EBADF', 'pwrite');
    await expectNativeReject(fdatasync(fd), 'EBADF', 'fdatasync');
    await expectNativeReject(fallocate(fd, 0, 4096), 'EBADF', 'fallocate');
  });

  it('writing a read-only fd is EBADF, reading a directory is EISDIR', async () => {
    const ro = fs.openSync(file, 'r');
    const d = fs.openSync(dir, 'r');
    try {
      await expectNativeReject(pwrite(ro, Buffer.from('x'), 0, 1, 0), 'EBADF', 'pwrite');
      await expectNativeReject(pread(d, Buffer.alloc(4), 0, 4, 0), 'EISDIR', 'pread');
    } finally {
      fs.closeSync(ro);
      fs.closeSync(d);
    }
  });

  it('block ioctls on a regular file throw ENOTTY synchronously', () => {
    const fd = fs.openSync(file, 'r');
    try {
      const e = expectNativeSync(() => blkGetSize64(fd), 'ENOTTY', 'ioctl(BLKGETSIZE64)');
      expect(e.message).toBe('ENOTTY: inappropriate ioctl for device, ioctl(BLKGETSIZE64)');
      expect(e.errno).toBe(25);
      expectNativeSync(() => blkSectorSize(fd), 'ENOTTY', 'ioctl(BLKSSZGET)');
      expectNativeSync(() => blkPhysicalSectorSize(fd), 'ENOTTY', 'ioctl(BLKPBSZGET)');
      expectNativeSync(() => blkFlsBuf(fd), 'ENOTTY', 'ioctl(BLKFLSBUF)');
    } finally {
      fs.closeSync(fd);
    }
  });

  it('has a Node-style message for async errors too', async () => {
    const fd = fs.openSync(file, 'r');
    fs.closeSync(fd);
    await expect(pread(fd, Buffer.alloc(1), 0, 1, 0)).rejects.toThrow('EBADF: bad file descriptor, pread');
  });
});

describe('argument validation happens in JS, synchronously', () => {
  const buf = Buffer.alloc(16);
  // fd 2**30 is not open; had validation passed, C++ would have answered EBADF.
  const fd = 2 ** 30;

  it('rejects bad fds', () => {
    expectInvalid(() => pread(-1, buf, 0, 1, 0), RangeError, 'ERR_OUT_OF_RANGE', 'fd');
    expectInvalid(() => pread(1.5, buf, 0, 1, 0), RangeError, 'ERR_OUT_OF_RANGE', 'fd');
    expectInvalid(() => pread(2 ** 31, buf, 0, 1, 0), RangeError, 'ERR_OUT_OF_RANGE', 'fd');
    expectInvalid(() => fdatasync('3' as unknown as number), TypeError, 'ERR_INVALID_ARG_TYPE', 'fd');
    expectInvalid(() => blkGetSize64(NaN), RangeError, 'ERR_OUT_OF_RANGE', 'fd');
    expectInvalid(() => blkSectorSize(-2), RangeError, 'ERR_OUT_OF_RANGE', 'fd');
    expectInvalid(() => blkPhysicalSectorSize(2 ** 31), RangeError, 'ERR_OUT_OF_RANGE', 'fd');
    expectInvalid(() => blkFlsBuf(undefined as unknown as number), TypeError, 'ERR_INVALID_ARG_TYPE', 'fd');
  });

  it('rejects buffers that are not Uint8Array', () => {
    for (const bad of [new Uint16Array(8), new DataView(new ArrayBuffer(8)), new ArrayBuffer(8), [1, 2], 'abc', null]) {
      expectInvalid(() => pread(fd, bad as unknown as Uint8Array, 0, 1, 0), TypeError, 'ERR_INVALID_ARG_TYPE', 'buf');
      expectInvalid(() => bitCount(bad as unknown as Uint8Array, 0, 0), TypeError, 'ERR_INVALID_ARG_TYPE', 'buf');
    }
  });

  it('rejects buffer slices outside the buffer', () => {
    expectInvalid(() => pread(fd, buf, 17, 0, 0), RangeError, 'ERR_OUT_OF_RANGE', 'bufOffset');
    expectInvalid(() => pread(fd, buf, 8, 9, 0), RangeError, 'ERR_OUT_OF_RANGE', 'length');
    expectInvalid(() => pwrite(fd, buf, 0, 17, 0), RangeError, 'ERR_OUT_OF_RANGE', 'length');
    expectInvalid(() => pwrite(fd, buf.subarray(4), 0, 13, 0), RangeError, 'ERR_OUT_OF_RANGE', 'length');
    expectInvalid(() => pwrite(fd, buf, -1, 1, 0), RangeError, 'ERR_OUT_OF_RANGE', 'bufOffset');
  });

  it('rejects pwriteList arguments that do not pair a buffer with a position', () => {
    const buf = Buffer.alloc(4096);
    expectInvalid(() => pwriteList(0, buf as unknown as Uint8Array[], Float64Array.of(0)), TypeError, 'ERR_INVALID_ARG_TYPE', 'buffers');
    expect(() => pwriteList(0, [buf], Float64Array.of(0, 1))).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
    expect(() => pwriteList(0, [buf], [0] as unknown as Float64Array)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
    expectInvalid(() => pwriteList(0, [new Uint16Array(2) as unknown as Uint8Array], Float64Array.of(0)), TypeError, 'ERR_INVALID_ARG_TYPE', 'buffers[i]');
    expectInvalid(() => pwriteList(0, [buf], Float64Array.of(-1)), RangeError, 'ERR_OUT_OF_RANGE', 'positions[i]');
    expectInvalid(() => pwriteList(0, [buf], Float64Array.of(0.5)), RangeError, 'ERR_OUT_OF_RANGE', 'positions[i]');
  });

  it('rejects bad positions and lengths', () => {
    expectInvalid(() => pread(fd, buf, 0, 1, -1), RangeError, 'ERR_OUT_OF_RANGE', 'position');
    expectInvalid(() => pread(fd, buf, 0, 1, 0.5), RangeError, 'ERR_OUT_OF_RANGE', 'position');
    expectInvalid(() => pread(fd, buf, 0, 1, 2 ** 53), RangeError, 'ERR_OUT_OF_RANGE', 'position');
    expectInvalid(() => pwrite(fd, buf, 0, 16, Number.MAX_SAFE_INTEGER - 8), RangeError, 'ERR_OUT_OF_RANGE', 'position');
    expectInvalid(() => pread(fd, buf, 0, 1, 1n as unknown as number), TypeError, 'ERR_INVALID_ARG_TYPE', 'position');
    expectInvalid(() => fallocate(fd, -4096, 4096), RangeError, 'ERR_OUT_OF_RANGE', 'offset');
    expectInvalid(() => fallocate(fd, 0, 0), RangeError, 'ERR_OUT_OF_RANGE', 'length');
    expectInvalid(() => fallocate(fd, 2 ** 52, 2 ** 52), RangeError, 'ERR_OUT_OF_RANGE', 'length');
  });

  it('rejects bad aligned buffer sizes and alignments', () => {
    expectInvalid(() => alignedBuffer(-1), RangeError, 'ERR_OUT_OF_RANGE', 'size');
    expectInvalid(() => alignedBuffer(2 ** 53), RangeError, 'ERR_OUT_OF_RANGE', 'size');
    expectInvalid(() => alignedBuffer(10, 256), RangeError, 'ERR_OUT_OF_RANGE', 'alignment');
    expectInvalid(() => alignedBuffer(10, 4095.5), RangeError, 'ERR_OUT_OF_RANGE', 'alignment');
    expect(() => alignedBuffer(10, 3000)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
    expect(() => alignedBuffer(10, 3000)).toThrow(TypeError);
  });

  it('rejects bit indexes outside the buffer or out of order', () => {
    const b = new Uint8Array(4);
    expectInvalid(() => bitFindNextSet(b, 33, 0), RangeError, 'ERR_OUT_OF_RANGE', 'nbits');
    expectInvalid(() => bitFindNextClear(b, 16, 17), RangeError, 'ERR_OUT_OF_RANGE', 'from');
    expectInvalid(() => bitFindNextSet(b, 16, -1), RangeError, 'ERR_OUT_OF_RANGE', 'from');
    expectInvalid(() => bitCount(b, 0, 33), RangeError, 'ERR_OUT_OF_RANGE', 'to');
    expectInvalid(() => bitCount(b, 5, 4), RangeError, 'ERR_OUT_OF_RANGE', 'from');
    expectInvalid(() => bitSetRange(b.subarray(1), 0, 25), RangeError, 'ERR_OUT_OF_RANGE', 'to');
    expectInvalid(() => bitClearRange(b, 1.5, 4), RangeError, 'ERR_OUT_OF_RANGE', 'from');
  });
});

describe('the raw binding', () => {
  // Only src/native/ should call it, but a direct call must still not touch memory it was not
  // given: C++ re-checks types and bounds.
  const raw = createRequire(import.meta.url)('../../build/Release/ulob_native.node') as Record<
    string,
    (...args: unknown[]) => unknown
  >;

  it('refuses out-of-range slices, bit ranges and bad types', () => {
    expect(() => raw.pread!(0, Buffer.alloc(4), 2, 3, 0)).toThrow(RangeError);
    expect(() => raw.pwrite!(0, new Uint8Array(8).subarray(4), 0, 5, 0)).toThrow(RangeError);
    expect(() => raw.pread!(0, new Uint16Array(4), 0, 1, 0)).toThrow(TypeError);
    expect(() => raw.pread!(-1, Buffer.alloc(4), 0, 1, 0)).toThrow(RangeError);
    expect(() => raw.pread!(0, Buffer.alloc(4), 0, 1, 0.5)).toThrow(RangeError);
    expect(() => raw.bitCount!(new Uint8Array(1), 0, 9)).toThrow(RangeError);
    expect(() => raw.bitSetRange!(new Uint8Array(1), 5, 4)).toThrow(RangeError);
    expect(() => raw.bitFindNextSet!(new Uint8Array(1), 8, 9)).toThrow(RangeError);
    expect(() => raw.alignedBuffer!(16, 3)).toThrow(RangeError);
    expect(() => raw.pwriteList!(0, [Buffer.alloc(8)], Float64Array.of(-1))).toThrow(RangeError);
    expect(() => raw.pwriteList!(0, [Buffer.alloc(8)], Float64Array.of(2 ** 53 - 4))).toThrow(RangeError);
    expect(() => raw.pwriteList!(0, [Buffer.alloc(8)], Float64Array.of(0, 1))).toThrow(TypeError);
    expect(() => raw.pwriteList!(0, [new Uint32Array(3)], Float64Array.of(0))).toThrow(TypeError);
    expect(() => raw.pwriteList!(0, Buffer.alloc(8), Float64Array.of(0))).toThrow(TypeError);
  });
});

// ---------------------------------------------------------------------------------------------
// Bitmaps against a bit-at-a-time reference.

const ref = {
  get: (b: Uint8Array, n: number) => (b[n >> 3]! >> (n & 7)) & 1,
  findNext(b: Uint8Array, nbits: number, from: number, want: number): number {
    for (let i = from; i < nbits; i++) if (ref.get(b, i) === want) return i;
    return nbits;
  },
  count(b: Uint8Array, from: number, to: number): number {
    let n = 0;
    for (let i = from; i < to; i++) n += ref.get(b, i);
    return n;
  },
  fill(b: Uint8Array, from: number, to: number, value: number): void {
    for (let i = from; i < to; i++) {
      if (value) b[i >> 3]! |= 1 << (i & 7);
      else b[i >> 3]! &= ~(1 << (i & 7));
    }
  },
};

// Bytes skewed towards 0x00 and 0xff so long runs (whole empty or full words) are common.
const byte = fc.oneof(fc.constant(0), fc.constant(0xff), fc.integer({ min: 0, max: 255 }));

/** A Uint8Array view at a random offset into a larger ArrayBuffer, with guard bytes around it. */
const bitmapCase = fc
  .record({
    head: fc.integer({ min: 0, max: 15 }),
    bytes: fc.array(byte, { minLength: 0, maxLength: 200 }),
    tail: fc.integer({ min: 0, max: 9 }),
    a: fc.nat(),
    b: fc.nat(),
    c: fc.nat(),
  })
  .map(({ head, bytes, tail, a, b, c }) => {
    const backing = new Uint8Array(head + bytes.length + tail);
    for (let i = 0; i < backing.length; i++) backing[i] = (i * 37 + 11) & 0xff;
    backing.set(bytes, head);
    const view = backing.subarray(head, head + bytes.length);
    const total = bytes.length * 8;
    // nbits not a multiple of 8 or 64 most of the time; from/to anywhere inside it.
    const nbits = total === 0 ? 0 : a % (total + 1);
    const x = nbits === 0 ? 0 : b % (nbits + 1);
    const y = nbits === 0 ? 0 : c % (nbits + 1);
    return { backing, view, nbits, lo: Math.min(x, y), hi: Math.max(x, y) };
  });

describe('bitmap scans match a bit-at-a-time reference', () => {
  const runs = { numRuns: 2000 };

  it('bitFindNextSet / bitFindNextClear', () => {
    fc.assert(
      fc.property(bitmapCase, ({ view, nbits, lo }) => {
        expect(bitFindNextSet(view, nbits, lo)).toBe(ref.findNext(view, nbits, lo, 1));
        expect(bitFindNextClear(view, nbits, lo)).toBe(ref.findNext(view, nbits, lo, 0));
      }),
      runs,
    );
  });

  it('bitCount', () => {
    fc.assert(
      fc.property(bitmapCase, ({ view, lo, hi }) => {
        expect(bitCount(view, lo, hi)).toBe(ref.count(view, lo, hi));
      }),
      runs,
    );
  });

  it('bitSetRange / bitClearRange change exactly [from, to)', () => {
    fc.assert(
      fc.property(bitmapCase, fc.boolean(), ({ backing, view, lo, hi }, set) => {
        const expected = backing.slice();
        const head = view.byteOffset - backing.byteOffset;
        ref.fill(expected.subarray(head, head + view.length), lo, hi, set ? 1 : 0);
        if (set) bitSetRange(view, lo, hi);
        else bitClearRange(view, lo, hi);
        // Compares the whole backing store: guard bytes around the view must be untouched.
        expect(Buffer.from(backing).equals(Buffer.from(expected))).toBe(true);
      }),
      runs,
    );
  });

  it('ignores set bits past nbits in the last byte and word', () => {
    const b = new Uint8Array(16).fill(0xff);
    b.fill(0, 0, 9); // bits 0..71 clear, 72.. set
    expect(bitFindNextSet(b, 70, 0)).toBe(70);
    expect(bitFindNextSet(b, 72, 65)).toBe(72);
    expect(bitFindNextSet(b, 73, 65)).toBe(72);
    expect(bitFindNextClear(b.fill(0xff), 67, 3)).toBe(67);
    expect(bitCount(b, 3, 67)).toBe(64);
  });

  it('handles a large bitmap with word-spanning ranges', () => {
    const b = new Uint8Array(1 << 20);
    const nbits = b.length * 8;
    bitSetRange(b, 1_000_003, 5_000_001);
    expect(bitCount(b, 0, nbits)).toBe(5_000_001 - 1_000_003);
    expect(bitFindNextSet(b, nbits, 0)).toBe(1_000_003);
    expect(bitFindNextClear(b, nbits, 1_000_003)).toBe(5_000_001);
    expect(bitFindNextSet(b, nbits, 5_000_001)).toBe(nbits);
    bitClearRange(b, 2_000_000, 2_000_064);
    expect(bitFindNextClear(b, nbits, 1_000_003)).toBe(2_000_000);
    expect(bitCount(b, 0, nbits)).toBe(5_000_001 - 1_000_003 - 64);
    expect(bitFindNextSet(b, 0, 0)).toBe(0);
    expect(bitCount(b, nbits, nbits)).toBe(0);
  });
});

// ---------------------------------------------------------------------------------------------
// Block device ioctls on a real loop device. Needs root and the loop driver (this project's
// test machines have both).

const canLoop = fs.existsSync('/dev/loop-control') && process.getuid?.() === 0;

describe.runIf(canLoop)('block device ioctls on a loop device', () => {
  const size = 8 * 1024 * 1024 + 3 * 4096;
  let dir: string;
  let image: string;
  let dev: string;
  let fd = -1;

  beforeAll(() => {
    dir = fs.mkdtempSync('/var/tmp/ulob-native-loop-');
    image = path.join(dir, 'image');
    fs.writeFileSync(image, Buffer.alloc(0));
    fs.truncateSync(image, size);
    // 4096-byte logical sectors, so a hard-coded 512 would be caught.
    dev = execFileSync('losetup', ['-f', '--show', '--sector-size', '4096', image], { encoding: 'utf8' }).trim();
    fd = fs.openSync(dev, fs.constants.O_RDWR | fs.constants.O_DIRECT);
  });

  afterAll(() => {
    if (fd >= 0) fs.closeSync(fd);
    if (dev) execFileSync('losetup', ['-d', dev]);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('reports size and logical and physical sector size', () => {
    expect(blkGetSize64(fd)).toBe(size);
    expect(blkSectorSize(fd)).toBe(4096);
    expect(blkPhysicalSectorSize(fd)).toBe(4096);
  });

  it('flushes buffers and does O_DIRECT I/O that reaches the backing file', async () => {
    const out = alignedBuffer(8192);
    randomBytes(8192).copy(out);
    await pwrite(fd, out, 0, 8192, size - 8192);
    await fdatasync(fd);
    blkFlsBuf(fd);
    const viaImage = Buffer.alloc(8192);
    const ifd = fs.openSync(image, 'r');
    try {
      fs.readSync(ifd, viaImage, 0, 8192, size - 8192);
    } finally {
      fs.closeSync(ifd);
    }
    expect(viaImage.equals(out)).toBe(true);
    const back = alignedBuffer(8192);
    expect(await pread(fd, back, 0, 8192, size - 4096)).toBe(4096); // end of device
    expect(back.subarray(0, 4096).equals(out.subarray(4096))).toBe(true);
  });
});

describe('the uloop request channel, on a FIFO (no module needed)', () => {
  let dir: string;
  let fifo: string;
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ulob-uloop-watch-'));
    fifo = path.join(dir, 'channel');
    execFileSync('mkfifo', [fifo]);
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  /** A struct uloop_msg as the kernel writes it (little-endian, 40 bytes: id, type, flags, offset, length, epoch). */
  const message = (id: number, type: number, offset: number, length: number, epoch = 0, flags = 0): Buffer => {
    const b = Buffer.alloc(40);
    b.writeBigUInt64LE(BigInt(id), 0);
    b.writeUInt32LE(type, 8);
    b.writeUInt32LE(flags, 12);
    b.writeBigUInt64LE(BigInt(offset), 16);
    b.writeBigUInt64LE(BigInt(length), 24);
    b.writeBigUInt64LE(BigInt(epoch), 32);
    return b;
  };
  const open = () => {
    const r = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    const w = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
    return { r, w, close: () => [r, w].forEach((fd) => fs.closeSync(fd)) };
  };
  const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

  it('takes the ABI constants from the header the addon was compiled with', () => {
    const header = fs.readFileSync(new URL('../../kernel/include/uapi/uloop.h', import.meta.url), 'utf8');
    const define = (name: string) => new RegExp(`^#define ${name}\\s+(\\S+)`, 'm').exec(header)?.[1];
    const member = (name: string) => Number(new RegExp(`\\b${name} = (\\d+)`).exec(header)?.[1]);
    expect(ULOOP_ABI_VERSION).toBe(Number(define('ULOOP_ABI_VERSION')));
    expect(ULOOP_CONTROL).toBe(`/dev/${JSON.parse(define('ULOOP_CONTROL_NAME')!)}`);
    expect(ULOOP_F_WRITEBACK).toBe(1);
    expect([ULOOP_MSG_MISS, ULOOP_MSG_INTENT, ULOOP_MSG_BARRIER]).toEqual([member('ULOOP_MSG_MISS'), member('ULOOP_MSG_INTENT'), member('ULOOP_MSG_BARRIER')]);
  });

  it('delivers whole messages on the event loop; close() stops it, once', async () => {
    const ch = open();
    const got: UloopMessage[] = [];
    const watch = new UloopWatch(ch.r, (err, msgs) => {
      expect(err).toBeNull();
      got.push(...msgs);
    });
    try {
      fs.writeSync(ch.w, Buffer.concat([message(7, ULOOP_MSG_MISS, 4096, 8192), message(2 ** 40, ULOOP_MSG_BARRIER, 0, 512), message(9, ULOOP_MSG_PRESERVE, 65536, 4096, 3, 0)]));
      for (let i = 0; i < 100 && got.length < 3; i++) await sleep(5);
      expect(got).toEqual([
        { id: 7, type: ULOOP_MSG_MISS, flags: 0, offset: 4096, length: 8192, epoch: 0 },
        { id: 2 ** 40, type: ULOOP_MSG_BARRIER, flags: 0, offset: 0, length: 512, epoch: 0 },
        { id: 9, type: ULOOP_MSG_PRESERVE, flags: 0, offset: 65536, length: 4096, epoch: 3 },
      ]);
      watch.close();
      watch.close();
      fs.writeSync(ch.w, message(8, ULOOP_MSG_INTENT, 0, 4096));
      await sleep(50);
      expect(got).toHaveLength(3);
    } finally {
      watch.close();
      ch.close();
    }
  });

  it('a watch dropped without close() is stopped by its finalizer', async () => {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    const ch = open();
    let calls = 0;
    // Made in a function of its own: nothing but the registry may know the watch afterwards.
    (() => void new UloopWatch(ch.r, () => void calls++))();
    try {
      let stopped = false;
      for (let round = 0; round < 50 && !stopped; round++) {
        gc();
        await sleep(10);
        const before = calls;
        fs.writeSync(ch.w, message(round + 1, ULOOP_MSG_MISS, 0, 4096));
        await sleep(30);
        stopped = calls === before;
      }
      expect(stopped).toBe(true);
    } finally {
      ch.close();
    }
  });
});

describe('the raw uloop and power bindings refuse bad input themselves (no module needed)', () => {
  // Called straight, without src/native's validation: what a bug in a caller would pass.
  const raw = createRequire(import.meta.url)('../../build/Release/ulob_native.node') as {
    uloopAdd(...args: unknown[]): number;
    uloopReply(fd: number, id: number, error: number): void;
    uloopBlocks(...args: unknown[]): unknown;
    uloopBarrier(...args: unknown[]): Promise<number>;
    hdioDriveCmd(fd: number, args: Uint8Array): Promise<void>;
  };
  const devNull = () => fs.openSync('/dev/null', 'r+');

  it('uloopAdd: a block size of 0 is refused before anything divides by it', () => {
    const fd = devNull();
    try {
      expect(() => raw.uloopAdd(fd, fd, 1 << 20, 0, 1, Buffer.alloc(64), Buffer.alloc(64), 0, 512, 0, 0)).toThrow(RangeError);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('uloopAdd: a bitmap one byte short of ceil(blocks / 8) is refused', () => {
    const fd = devNull();
    try {
      // 1 MiB + 4 KiB of 4 KiB blocks: 257 blocks, 33 bytes (the old check took 32 and read 33).
      const size = (1 << 20) + 4096;
      for (const [p, d] of [[32, 33], [33, 32]] as const) {
        expect(() => raw.uloopAdd(fd, fd, size, 4096, 1, Buffer.alloc(p), Buffer.alloc(d), 0, 512, 0, 0)).toThrow(/bitmap too small/);
      }
      // The exact length is accepted and reaches the ioctl (ENOTTY on /dev/null).
      expectNativeSync(() => raw.uloopAdd(fd, fd, size, 4096, 1, Buffer.alloc(33), Buffer.alloc(33), 0, 512, 0, 0), 'ENOTTY', 'ioctl(ULOOP_IOC_ADD)');
    } finally {
      fs.closeSync(fd);
    }
  });

  it('uloopBlocks: a bits buffer shorter than ceil(count / 8) is refused', () => {
    const fd = devNull();
    try {
      expect(() => raw.uloopBlocks(fd, 0, 0, 65, Buffer.alloc(8), 0)).toThrow(/bits too small/);
      expect(() => raw.uloopBlocks(fd, 9, 0, 8, Buffer.alloc(1), 0)).toThrow(/unknown block-range op/);
      expectNativeSync(() => raw.uloopBlocks(fd, 0, 0, 65, Buffer.alloc(9), 0), 'ENOTTY', 'ioctl(ULOOP_IOC_CLAIM)');
    } finally {
      fs.closeSync(fd);
    }
  });

  it('uloopBarrier: flags outside 32 bits are refused; the call runs off the event loop and rejects with the errno', async () => {
    const fd = devNull();
    try {
      expect(() => raw.uloopBarrier(fd, 2 ** 32)).toThrow(RangeError);
      expect(() => raw.uloopBarrier(fd, -1)).toThrow();
      // /dev/null has no such ioctl: the worker's ENOTTY comes back as a rejection, not a throw.
      await expect(raw.uloopBarrier(fd, 0)).rejects.toMatchObject({ code: 'ENOTTY', syscall: 'ioctl(ULOOP_IOC_BARRIER)' });
    } finally {
      fs.closeSync(fd);
    }
  });

  it('uloopReply: negative errnos go out as they are; positive or out-of-range ones are refused', () => {
    const [r, w] = (() => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ulob-reply-'));
      const fifo = path.join(dir, 'f');
      execFileSync('mkfifo', [fifo]);
      const rd = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
      const wr = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
      fs.rmSync(dir, { recursive: true });
      return [rd, wr];
    })();
    try {
      // The bug of issue 11: -5 was refused by the argument reader, inside a promise handler.
      raw.uloopReply(w, 42, -5);
      uloopReply(w, 43, -errno.ENOSPC);
      raw.uloopReply(w, 44, 0);
      const got = Buffer.alloc(64);
      expect(fs.readSync(r, got)).toBe(48);
      expect([got.readBigUInt64LE(0), got.readInt32LE(8)]).toEqual([42n, -5]);
      expect([got.readBigUInt64LE(16), got.readInt32LE(24)]).toEqual([43n, -errno.ENOSPC]);
      expect([got.readBigUInt64LE(32), got.readInt32LE(40)]).toEqual([44n, 0]);
      for (const bad of [5, -4096, -1.5, Number.NaN]) expect(() => raw.uloopReply(w, 1, bad)).toThrow(RangeError);
      expect(() => uloopReply(w, 1, 5)).toThrow(RangeError);
    } finally {
      fs.closeSync(r);
      fs.closeSync(w);
    }
  });

  it('hdioDriveCmd: a buffer shorter than 4 + 512 × args[3] is refused before the ioctl', async () => {
    const fd = devNull();
    try {
      const args = Buffer.from([0xec, 0, 0, 1]); // IDENTIFY with one sector of data: 516 bytes needed
      expect(() => raw.hdioDriveCmd(fd, args)).toThrow(RangeError);
      expect(() => raw.hdioDriveCmd(fd, Buffer.alloc(515, args))).toThrow(RangeError);
      const whole = Buffer.alloc(516);
      args.copy(whole);
      await expect(raw.hdioDriveCmd(fd, whole)).rejects.toMatchObject({ code: 'ENOTTY' });
    } finally {
      fs.closeSync(fd);
    }
  });
});
