// Disks past 8 TiB, end to end on /dev/loopN: a 16 TiB disk of 4 KiB blocks (block numbers up to
// 2^32 - 1, past the 2^31 where 32-bit arithmetic on block numbers breaks) and a 64 TiB disk of
// 64 KiB blocks (byte offsets past 2^45). Both disks and caches are sparse or unwritten extents on
// a thin XFS (test/support/thin-xfs.ts). Each: a block read into the cache past 8 TiB, then a
// 512-byte write into that cached clean block (this hung the daemon at 100 % CPU), writes to the
// last sector and in between, all read back through the device, counted in status, flushed to the
// disk at the right offsets, and read back again after a detach and re-attach. The daemon's peak
// memory is printed (docs/reference.md, "Memory").
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, fsyncSync, openSync, readFileSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { attachFreeLoop, killStrays, mustSh, prepareCliTests, scratch, sh, ulobdev } from '../support/cli.js';
import { thinXfs } from '../support/thin-xfs.js';

const TiB = 2 ** 40;
let s: ReturnType<typeof scratch>;
const undo: Array<() => Promise<unknown> | unknown> = [];

beforeAll(() => {
  prepareCliTests();
}, 900_000);

afterEach(async () => {
  for (const step of undo.splice(0).reverse()) await step();
  s?.cleanup();
});

function pread(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    expect(readSync(fd, buf, 0, length, offset)).toBe(length);
    return buf;
  } finally {
    closeSync(fd);
  }
}

function pwrite(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, data, 0, data.byteLength, offset);
  } finally {
    closeSync(fd);
  }
}

/** dd through the cached device with O_DIRECT; a hung daemon fails it after `timeout` s instead of hanging the test. */
function ddWrite(dev: string, offset: number, file: string, length: number): void {
  const r = sh('timeout', ['30', 'dd', `if=${file}`, `of=${dev}`, `bs=${length}`, 'count=1', `seek=${offset}`, 'oflag=direct,seek_bytes', 'status=none']);
  expect(r.status, `write of ${length} bytes at ${offset}: ${r.stderr}`).toBe(0);
}

function ddRead(dev: string, offset: number, length: number): Buffer {
  const r = spawnSync('timeout', ['30', 'dd', `if=${dev}`, `bs=${length}`, 'count=1', `skip=${offset}`, 'iflag=direct,skip_bytes', 'status=none']);
  expect(r.status, `read of ${length} bytes at ${offset}: ${r.stderr}`).toBe(0);
  return r.stdout;
}

function fsyncDevice(dev: string): void {
  const fd = openSync(dev, 'r+');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function peakRssMiB(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Math.round(Number(m![1]) / 1024);
}

describe('disks past 8 TiB', () => {
  it.each([
    { size: 16 * TiB - 4096, blockSize: 4096, label: '16 TiB of 4 KiB blocks' },
    { size: 64 * TiB, blockSize: 65536, label: '64 TiB of 64 KiB blocks' },
  ])('serves, flushes and re-attaches $label', async ({ size, blockSize }) => {
    s = scratch('ulob-large-');
    const big = thinXfs(s.dir, 160 * TiB);
    undo.push(() => big.cleanup());
    const diskFile = join(big.dir, 'disk.img');
    mustSh('truncate', ['-s', String(size), diskFile]);
    const backing = mustSh('losetup', ['-f', '--show', diskFile]).trim();
    undo.push(() => sh('losetup', ['-d', backing]));

    // A cached clean block past 8 TiB (block 2^31 + 5 at 4 KiB), the last sector, and one between.
    const cachedAt = 8 * TiB + 5 * blockSize;
    const old = randomBytes(blockSize);
    pwrite(diskFile, cachedAt, old);
    const writes = [
      { offset: cachedAt + 512, data: randomBytes(512) },
      { offset: size - 512, data: randomBytes(512) },
      { offset: Math.floor(size / 3 / 512) * 512, data: randomBytes(512) },
    ];
    const args = ['--writeback', '-c', join(big.dir, 'c.cache'), '-b', join(big.dir, 'c.bitmap'), '--block-size', String(blockSize), '--run-dir', s.runDir];
    const attach = async () => {
      const { loop: dev } = await attachFreeLoop((loop) => ulobdev([...args, '--daemon', loop, backing], { timeoutMs: 120_000 }));
      undo.push(async () => {
        const d = await ulobdev(['detach', dev, '--run-dir', s.runDir], { timeoutMs: 20_000 });
        // A daemon that hangs cannot detach: do not leave it running.
        if (d.code !== 0) killStrays(s.dir, s.runDir);
      });
      return dev;
    };
    const dev = await attach();
    expect(mustSh('blockdev', ['--getsize64', dev]).trim()).toBe(String(size));

    // The partition scan at attach (the kernel's, then partx) read the blocks where a table would
    // be: the first and the last. Nothing else is cached yet.
    const probed = JSON.parse((await ulobdev(['status', dev, '--json', '--run-dir', s.runDir])).stdout).cachedBytes as number;
    expect(probed).toBeLessThanOrEqual(8 * blockSize);
    // Into the cache, then committed by a FLUSH (fsync of the device): present and clean.
    expect(ddRead(dev, cachedAt, blockSize).equals(old)).toBe(true);
    fsyncDevice(dev);
    const before = JSON.parse((await ulobdev(['status', dev, '--json', '--run-dir', s.runDir])).stdout);
    expect(before).toMatchObject({ cachedBytes: probed + blockSize, dirtyBytes: 0 });
    const file = join(s.dir, 'piece');
    for (const w of writes) {
      writeFileSync(file, w.data);
      ddWrite(dev, w.offset, file, w.data.byteLength);
    }
    for (const w of writes) expect(ddRead(dev, w.offset, 512).equals(w.data), `at ${w.offset}`).toBe(true);
    // The rest of the cached block kept its old bytes.
    const block = ddRead(dev, cachedAt, blockSize);
    expect(block.subarray(0, 512).equals(old.subarray(0, 512))).toBe(true);
    expect(block.subarray(1024).equals(old.subarray(1024))).toBe(true);

    // Writes into blocks not yet cached are staged and recorded dirty at the next commit (a FLUSH,
    // or the engine's timer within a second): status counts them from then on.
    fsyncDevice(dev);
    const st = JSON.parse((await ulobdev(['status', dev, '--json', '--run-dir', s.runDir])).stdout);
    expect(st).toMatchObject({ size, blockSize, dirtyBytes: 3 * blockSize });
    const flushed = await ulobdev(['flush', dev, '--wait', '--json', '--run-dir', s.runDir], { timeoutMs: 120_000 });
    expect(flushed.code, flushed.stderr).toBe(0);
    expect(JSON.parse(flushed.stdout)).toMatchObject({ blocks: 3, cleaned: 3, kept: 0 });
    for (const w of writes) expect(pread(diskFile, w.offset, 512).equals(w.data), `disk at ${w.offset}`).toBe(true);
    console.log(`${(size / TiB).toFixed(1)} TiB, ${blockSize / 1024} KiB blocks: daemon peak RSS ${peakRssMiB(st.pid)} MiB`);

    const d = await ulobdev(['detach', dev, '--run-dir', s.runDir]);
    expect(d.code, d.stderr).toBe(0);
    undo.pop();
    const again = await attach();
    for (const w of writes) expect(ddRead(again, w.offset, 512).equals(w.data), `after re-attach at ${w.offset}`).toBe(true);
  }, 300_000);
});
