// The copy-on-write of a flush epoch beyond its memory budget (src/cache/epoch.ts): saved block
// versions go to a spill file. Writes to different blocks save them concurrently; each must keep
// its own slot of one spill file. Found by writeback-image.test once its racing overwrites (96 MiB,
// over the 64 MiB budget, from two dd writers) ran before the flush's copy every time: the backing
// file differed from the epoch's image. Two saves that both found no spill file open each opened
// it ('w+' truncates) and each took slot 0, so one block's epoch version was the other's.
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { Bitmap } from '../../src/cache/bitmap.js';
import { FlushEpoch } from '../../src/cache/epoch.js';
import { Geometry } from '../../src/cache/layout.js';

const BS = 4096;
const BLOCKS = 16;
let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join('/dev/shm', 'ulob-epoch-spill-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

it('saves of different blocks made at once, beyond the memory budget, each read back their own epoch version', async () => {
  const g = new Geometry(BLOCKS * BS, BS);
  // The cache file: block b holds the byte b at the snapshot.
  const cache = Buffer.alloc(BLOCKS * BS);
  for (let b = 0; b < BLOCKS; b++) cache.fill(b, b * BS, (b + 1) * BS);
  const flushing = new Bitmap(BLOCKS);
  flushing.setRange(0, BLOCKS);
  const epoch = new FlushEpoch(1, flushing, new Bitmap(BLOCKS), {
    geometry: g,
    readCache: async (buf, position) => {
      // A real read takes a turn of the event loop, as the file's does.
      await new Promise((r) => setImmediate(r));
      cache.copy(buf, 0, position, position + buf.length);
    },
    memoryBytes: BS, // one block in memory, the rest spills
    spillPath: join(dir, 'cache.cow'),
  });
  // Writes to every block, all at once: each saves its block first, then overwrites it.
  const saves = [];
  for (let b = 0; b < BLOCKS; b++) saves.push(...epoch.copyBeforeWrite(b, b + 1));
  await Promise.all(saves);
  cache.fill(0xee);
  expect(epoch.failed).toBeNull();
  for (let b = 0; b < BLOCKS; b++) {
    const v = await epoch.read(b, 1);
    expect(v.equals(Buffer.alloc(BS, b)), `block ${b}: the epoch's version (byte ${b}), got byte ${v[0]}`).toBe(true);
  }
  await epoch.release();
});
