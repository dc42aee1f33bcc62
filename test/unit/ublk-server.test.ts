// The ublk server's block state without a device (no ublk_drv on the host): the store's bitmaps
// in and out word by word (memcpy on little-endian; a disk whose block count is no multiple of 64),
// the running present/dirty counts status reads, and an epoch's begin and commit.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { UblkServer } from '../../src/native/ublk.js';

const dir = mkdtempSync(join(tmpdir(), 'ublk-server-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A server over a sparse cache file of `blocks` 4 KiB blocks with the given bits set. */
function server(blocks: number, present: number[], dirty: number[]): UblkServer {
  const cachePath = join(dir, `c${blocks}`);
  writeFileSync(cachePath, '');
  const bytes = Math.ceil(blocks / 8);
  const p = new Uint8Array(bytes);
  const d = new Uint8Array(bytes);
  for (const b of present) p[b >> 3]! |= 1 << (b & 7);
  for (const b of dirty) d[b >> 3]! |= 1 << (b & 7);
  return new UblkServer({ cachePath, size: blocks * 4096, blockSize: 4096, logical: 512, physical: 4096, queues: 2, depth: 4, bufBytes: 65536, readOnly: false }, p, d, () => undefined);
}
const bits = (a: Uint8Array) => [...a.keys()].flatMap((i) => [0, 1, 2, 3, 4, 5, 6, 7].filter((k) => (a[i]! >> k) & 1).map((k) => i * 8 + k));

describe('ublk server block state', () => {
  it('counts present (dirty included) and dirty blocks at create, with no bits past the last block', () => {
    const blocks = 200; // 3 words and 8 blocks
    const s = server(blocks, [0, 63, 64, 199], [5, 64, 130]);
    const q = s.query();
    expect(q.presentBlocks).toBe(6); // 0 5 63 64 130 199
    expect(q.dirtyBlocks).toBe(3);
    expect(q.running).toBe(false);
    expect(q.queueRequests).toEqual([]);
  });

  it('an epoch hands out the dirty set and its commit clears exactly the flushed blocks', () => {
    const blocks = 200;
    const s = server(blocks, [], [1, 64, 100, 199]);
    const out = new Uint8Array(Math.ceil(blocks / 8)).fill(0xff);
    const ep = s.epochBegin(out);
    expect(bits(out)).toEqual([1, 64, 100, 199]);
    const flushed = new Uint8Array(out.length);
    for (const b of [1, 100, 150]) flushed[b >> 3]! |= 1 << (b & 7); // 150 was never dirty
    expect(s.epochCommit(ep, flushed)).toBe(2);
    expect(bits(flushed)).toEqual([1, 100]);
    expect(s.query().dirtyBlocks).toBe(2);
    expect(() => s.epochCommit(ep, flushed)).toThrow(expect.objectContaining({ errno: 116 })); // ESTALE (libuv has no name for it);
    // the next epoch sees what is left
    const out2 = new Uint8Array(out.length);
    const ep2 = s.epochBegin(out2);
    expect(ep2).toBe(ep + 1);
    expect(bits(out2)).toEqual([64, 199]);
  });

  it('a commit over more than one slice (1 Mi blocks each) clears every flushed block', () => {
    const blocks = (3 << 20) + 5;
    const dirty = [0, 1 << 20, (1 << 20) + 1, 2 << 20, blocks - 1];
    const s = server(blocks, [], dirty);
    const out = new Uint8Array(Math.ceil(blocks / 8));
    const ep = s.epochBegin(out);
    expect(bits(out)).toEqual(dirty);
    expect(s.epochCommit(ep, out)).toBe(dirty.length);
    expect(s.query().dirtyBlocks).toBe(0);
  });

  // review-ublk4 finding 1: "written since the begin" must not take a block out of the snapshot
  // unless its epoch version was kept (a PRESERVE) or it became dirty only after the begin.
  it('an INTENT answered after the begin leaves the blocks that were dirty at the begin in the snapshot', () => {
    const s = server(64, [], [5]);
    const out = new Uint8Array(8);
    s.epochBegin(out);
    expect(s.testHook('needs-preserve', 5, 6)).toBe(true);
    s.testHook('dirty', 5, 7); // a write over [5, 7): 6 was clean, its INTENT answered now
    expect(s.testHook('needs-preserve', 5, 6)).toBe(true);
    expect(s.testHook('needs-preserve', 6, 7)).toBe(false); // dirty only since the begin
  });

  it('a write in flight at the begin leaves its blocks in the snapshot, and the commit keeps them dirty', () => {
    const s = server(64, [], [5]);
    s.testHook('write-begin', 5, 6);
    const out = new Uint8Array(8);
    const ep = s.epochBegin(out);
    s.testHook('write-end', 5, 6);
    expect(s.testHook('needs-preserve', 5, 6)).toBe(true); // a second write keeps the epoch's version first
    const flushed = Uint8Array.from(out);
    expect(s.epochCommit(ep, flushed)).toBe(0); // written since the begin: stays dirty
    expect(s.query().dirtyBlocks).toBe(1);
  });

  // review-ublk4 finding 2: the blocks an INTENT makes dirty during the begin's copy come out of the
  // copy, and only those.
  it('an INTENT answered during the begin\'s copy takes out only the blocks it made dirty', () => {
    const s = server(64, [], [5]);
    s.testHook('dirty-mid-copy', 5, 7);
    const out = new Uint8Array(8);
    s.epochBegin(out);
    expect(bits(out)).toEqual([5]);
    expect(s.query().dirtyBlocks).toBe(2);
  });
});
