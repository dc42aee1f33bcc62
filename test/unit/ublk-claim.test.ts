// The ublk server's CLAIM/FILLED (the unit fill, issue 12 power; src/bdev/unit-fill.ts) without a
// device: a claim takes only blocks nobody else holds (not present, dirty, held by a request,
// written or evicting), keeps them from requests (they park) and from evictions until FILLED, and
// FILLED makes present exactly the claimed blocks it names and lets the rest go.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { UBLK_MAX_CLAIM_BLOCKS, UblkServer } from '../../src/native/ublk.js';

const dir = mkdtempSync(join(tmpdir(), 'ublk-claim-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A server over a sparse cache file of `blocks` 4 KiB blocks with the given bits set (units of 2^unitShift blocks). */
function server(blocks: number, present: number[], dirty: number[], unitShift?: number): UblkServer {
  const cachePath = join(dir, `c${blocks}-${Math.random()}`);
  writeFileSync(cachePath, '');
  const bytes = Math.ceil(blocks / 8);
  const p = new Uint8Array(bytes);
  const d = new Uint8Array(bytes);
  for (const b of present) p[b >> 3]! |= 1 << (b & 7);
  for (const b of dirty) d[b >> 3]! |= 1 << (b & 7);
  return new UblkServer({ cachePath, size: blocks * 4096, blockSize: 4096, logical: 512, physical: 4096, queues: 1, depth: 4, bufBytes: 65536, readOnly: false, unitShift }, p, d, () => undefined);
}
const bits = (a: Uint8Array) => [...a.keys()].flatMap((i) => [0, 1, 2, 3, 4, 5, 6, 7].filter((k) => (a[i]! >> k) & 1).map((k) => i * 8 + k));
const set = (count: number, list: number[]) => {
  const a = new Uint8Array(Math.ceil(count / 8));
  for (const i of list) a[i >> 3]! |= 1 << (i & 7);
  return a;
};

describe('ublk server claims (the unit fill)', () => {
  it('claims only missing, clean, idle blocks, and holds them from requests and evictions until FILLED', () => {
    // 0-15: 1 present, 2 dirty, 3 held by a request (a miss being filled), 4 written (a native
    // write in flight), 5 evicted and not yet punched; the rest missing and idle.
    const s = server(64, [1, 5], [], 4);
    // 'dirty' marks dirty alone (the server's dirty blocks are always present too: the check on
    // dirty is a second line, tested on its own here)
    s.testHook('dirty', 2, 3);
    s.testHook('hold', 3, 4);
    s.testHook('write-begin', 4, 5);
    expect(s.evict(5, 1, set(1, [0]))).toBe(1);
    const got = new Uint8Array(2);
    const id = s.claim(0, 16, got);
    expect(id).toBeGreaterThan(0);
    expect(bits(got)).toEqual([0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
    expect(s.query().claimedBlocks).toBe(11);
    // nothing is claimed twice
    const again = new Uint8Array(2);
    expect(s.claim(0, 16, again)).toBe(0);
    expect(bits(again)).toEqual([]);
    // a request touching a claimed block waits; one on blocks outside the claim does not
    expect(s.testHook('parks', 6, 7)).toBe(true);
    expect(s.testHook('parks', 0, 2)).toBe(true);
    expect(s.testHook('parks', 1, 2)).toBe(false);
    expect(s.testHook('parks', 16, 20)).toBe(false);
    // an eviction refuses claimed blocks (their data is on its way)
    const ev = set(16, [0, 6, 1]);
    expect(s.evict(0, 16, ev)).toBe(1);
    expect(bits(ev)).toEqual([1]);
    s.evictDone(0, 16);
    const before = s.query().presentBlocks;
    // FILLED: 0 and 6-9 filled, the rest let go still missing
    s.filled(id, 0, 16, set(16, [0, 6, 7, 8, 9]));
    expect(s.query().presentBlocks).toBe(before + 5);
    expect(s.testHook('parks', 6, 16)).toBe(false);
    expect(s.query().claimedBlocks).toBe(0);
    expect(s.testHook('hit', 6, 10)).toBe(true);
    expect(s.testHook('hit', 10, 11)).toBe(false);
    // what was let go can be claimed again (and 1 and 5, evicted and punched now); what was filled cannot
    const third = new Uint8Array(2);
    expect(s.claim(0, 16, third)).toBeGreaterThan(0);
    expect(bits(third)).toEqual([1, 5, 10, 11, 12, 13, 14, 15]);
  });

  it('FILLED refuses another range, unclaimed blocks and unknown ids, changing nothing', () => {
    const s = server(64, [], [], 4);
    s.testHook('hold', 2, 3);
    const got = new Uint8Array(1);
    const id = s.claim(0, 8, got);
    expect(bits(got)).toEqual([0, 1, 3, 4, 5, 6, 7]);
    expect(() => s.filled(id, 0, 7, set(8, [0]))).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    // block 2 is held by a request: a fill must never make it present
    expect(() => s.filled(id, 0, 8, set(8, [0, 2]))).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    expect(() => s.filled(id + 1, 0, 8, set(8, [0]))).toThrow(expect.objectContaining({ code: 'ENOENT' }));
    expect(s.query().presentBlocks).toBe(0);
    expect(s.testHook('parks', 0, 1)).toBe(true);
    s.filled(id, 0, 8, new Uint8Array(1)); // none filled: all let go
    expect(s.query().presentBlocks).toBe(0);
    expect(s.testHook('parks', 0, 1)).toBe(false);
    expect(() => s.filled(id, 0, 8, new Uint8Array(1))).toThrow(expect.objectContaining({ code: 'ENOENT' }));
  });

  it('64 claims at most, ranges up to UBLK_MAX_CLAIM_BLOCKS, and none without a budget', () => {
    const s = server(128, [], [], 0);
    const ids: number[] = [];
    for (let b = 0; b < 64; b++) ids.push(s.claim(b, 1, new Uint8Array(1)));
    expect(new Set(ids).size).toBe(64);
    expect(() => s.claim(64, 1, new Uint8Array(1))).toThrow(expect.objectContaining({ code: 'EAGAIN' }));
    s.filled(ids[0]!, 0, 1, new Uint8Array(1));
    expect(s.claim(64, 1, new Uint8Array(1))).toBeGreaterThan(0);
    expect(() => s.claim(0, UBLK_MAX_CLAIM_BLOCKS + 1, new Uint8Array(UBLK_MAX_CLAIM_BLOCKS))).toThrow(RangeError);
    expect(() => s.claim(120, 9, new Uint8Array(2))).toThrow(RangeError); // past the last block
    const plain = server(64, [], []);
    expect(() => plain.claim(0, 8, new Uint8Array(1))).toThrow(expect.objectContaining({ errno: 95 }));
  });
});
