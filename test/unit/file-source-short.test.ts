// FileSource's fills in one request (copyInto) and as one stream (streamInto) over a disk that ends
// before its recorded size (a shrunk disk or image): the native copy reports fewer bytes than asked,
// and FileSource must turn that count into IOFailedError (the engine then leaves the blocks
// missing) rather than resolve as if the whole range were copied (invariant 1: a block is present
// only with the disk's bytes in the cache).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { IOFailedError } from '../../src/errors.js';
import { FileSource } from '../../src/source/file-source.js';
import { posixStorage } from '../../src/storage/posix-storage.js';

const KiB = 1024;
let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ulob-short-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

/** A 64 KiB disk whose image file holds only its first `actual` bytes, and an empty cache file. */
async function shrunk(actual: number) {
  writeFileSync(join(dir, 'disk'), Buffer.alloc(actual, 0xab));
  const file = await posixStorage.open(join(dir, 'disk'));
  const source = new FileSource(file, { id: 'shrunk', size: 64 * KiB, description: 'shrunk disk' });
  const cache = await posixStorage.open(join(dir, 'cache'), { create: true });
  return { source, cache, close: async () => Promise.all([file.close(), cache.close()]) };
}

describe('a disk that ends before its size', () => {
  it('streamInto of 8 pieces, the disk cut inside piece 5: IOFailedError, not a whole stream', async () => {
    const { source, cache, close } = await shrunk(4 * 4 * KiB + 1000);
    try {
      expect(cache.copyStreamFrom).toBeDefined();
      const err = await source.streamInto(cache, Buffer.alloc(4 * KiB), 0, 0, 32 * KiB).then(() => null, (e: unknown) => e);
      expect(err).toBeInstanceOf(IOFailedError);
      expect((err as Error).message).toMatch(/^short read from shrunk disk at 0: 16384 of 32768 bytes/);
    } finally {
      await close();
    }
  });

  it('copyInto of one piece past the end: IOFailedError', async () => {
    const { source, cache, close } = await shrunk(4 * KiB + 1000);
    try {
      expect(cache.copyFrom).toBeDefined();
      const err = await source.copyInto(cache, Buffer.alloc(8 * KiB), 0, 0).then(() => null, (e: unknown) => e);
      expect(err).toBeInstanceOf(IOFailedError);
      expect((err as Error).message).toMatch(/^short read from shrunk disk at 0: \d+ of 8192 bytes/);
    } finally {
      await close();
    }
  });
});
