// FileSource.streamInto (hydration's one reading stream, native copyStream): a disk that ends before
// the stream does (a disk that shrank, an image truncated under the daemon) fails the stream with
// a short-read error naming the disk, so the engine leaves the whole chunk missing (invariant 1: a
// chunk with a hole in it is never marked present). Review7 P9: nothing tested that the short
// count is refused.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FileSource } from '../../src/source/file-source.js';
import { posixStorage } from '../../src/storage/posix-storage.js';

const MiB = 1 << 20;
let dir: string;
beforeEach(() => {
  dir = mkdtempSync('/var/tmp/ulob-stream-');
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

async function rig(diskBytes: Buffer, claimedSize: number) {
  writeFileSync(join(dir, 'disk'), diskBytes);
  const source = new FileSource(await posixStorage.open(join(dir, 'disk')), { id: 'disk', size: claimedSize, description: 'test disk' });
  const cache = await posixStorage.open(join(dir, 'cache'), { create: true });
  await cache.allocate(claimedSize);
  return { source, cache };
}

describe('FileSource.streamInto', () => {
  it('copies a whole stream in pieces of the buffer (positive control)', async () => {
    const disk = randomBytes(4 * MiB);
    const { source, cache } = await rig(disk, 4 * MiB);
    expect(source.streamInto).toBeDefined();
    await source.streamInto!(cache, Buffer.alloc(MiB), MiB, MiB, 3 * MiB);
    await cache.close();
    const copied = readFileSync(join(dir, 'cache'));
    expect(copied.subarray(MiB, 4 * MiB).equals(disk.subarray(MiB, 4 * MiB))).toBe(true);
    expect(copied.subarray(0, MiB).equals(Buffer.alloc(MiB))).toBe(true);
  });

  it('fails a stream the disk ends inside with a short read naming the disk, and writes nothing past the end', async () => {
    // The disk holds 2.5 MiB; the stream asks for 4 MiB from 0 in 1 MiB pieces.
    const disk = randomBytes(2.5 * MiB);
    const { source, cache } = await rig(disk, 4 * MiB);
    await expect(source.streamInto!(cache, Buffer.alloc(MiB), 0, 0, 4 * MiB)).rejects.toThrow(/short read from test disk at 0: 2097152 of 4194304 bytes/);
    await cache.close();
    // The short third piece was not written: the cache holds zeros from 2 MiB on.
    const copied = readFileSync(join(dir, 'cache'));
    expect(copied.subarray(2 * MiB).equals(Buffer.alloc(2 * MiB))).toBe(true);
  });
});
