// The eviction clock (src/cache/clock.ts): GCLOCK over eviction units with new units on probation.
// Pure, so it runs against an array of units that hold data and may go.
import { describe, expect, it } from 'vitest';
import { Clock, MAX_COUNT } from '../../src/cache/clock.js';

/** A clock over `units` units of 4 blocks, all holding data and evictable unless said. */
function rig(units: number) {
  const clock = new Clock(units * 4, 4);
  const data = new Array<boolean>(units).fill(true);
  const evictable = new Array<boolean>(units).fill(true);
  const next = (u: number) => {
    while (u < units && !data[u]) u++;
    return u;
  };
  const pick = (want: number) => clock.pick(want, next, (u) => evictable[u]!);
  return { clock, data, evictable, pick };
}

describe('Clock', () => {
  it('evicts units nobody hit first, in hand order, and moves the hand past them', () => {
    const r = rig(8);
    r.clock.noteAccess(4, 8); // unit 1
    r.clock.noteAccess(12, 13); // unit 3
    expect(r.pick(3)).toEqual([0, 2, 4]);
    expect(r.clock.hand).toBe(5);
    // Units 1 and 3 were harvested into a count of 1: they survive one more pass.
    expect(r.pick(4)).toEqual([5, 6, 7, 0]);
  });

  it('gives a unit hit in several sweeps as many more passes (frequency), up to MAX_COUNT', () => {
    const r = rig(4);
    for (let sweep = 0; sweep < 10; sweep++) {
      r.clock.noteAccess(0, 1); // unit 0, hot
      r.pick(1);
    }
    expect(r.clock.counts[0]).toBe(MAX_COUNT);
    // With nothing hit any more, unit 0 outlives the others by its count.
    r.data.fill(true);
    const order: number[] = [];
    for (let i = 0; i < 4; i++) {
      const [u] = r.pick(1);
      order.push(u!);
      r.data[u!] = false;
    }
    expect(order[3]).toBe(0);
  });

  it('never picks a unit that may not go, nor one without data, and gives up after MAX_COUNT + 1 rounds', () => {
    const r = rig(6);
    r.evictable[1] = false;
    r.data[2] = false;
    for (let u = 0; u < 6; u++) r.clock.noteAccess(u * 4, u * 4 + 1);
    expect(r.pick(10).sort()).toEqual([0, 3, 4, 5]);
    r.evictable.fill(false);
    expect(r.pick(1)).toEqual([]);
    expect(new Clock(0, 4).pick(1, () => 0, () => true)).toEqual([]);
  });

  it('a unit evicted and filled again starts on probation; the state survives a save and restore', () => {
    const r = rig(4);
    r.clock.counts.set([1, 1, 1, 1]);
    r.clock.noteAccess(8, 9);
    r.clock.forget(2);
    expect(r.clock.accessed[0]).toBe(0);
    expect([...r.clock.counts]).toEqual([1, 1, 0, 1]);
    r.clock.noteAccess(4, 5);
    const saved = r.clock.state(1 << 16);
    // The unharvested accessed bit of unit 1 is folded into its count.
    expect([...saved.counts]).toEqual([1, 2, 0, 1]);
    const back = new Clock(16, 4);
    expect(back.restore(saved, 1 << 16)).toBe(true);
    expect([...back.counts]).toEqual([1, 2, 0, 1]);
    expect(back.hand).toBe(r.clock.hand);
    // Another geometry or unit size starts fresh.
    expect(new Clock(32, 4).restore(saved, 1 << 16)).toBe(false);
    expect(new Clock(16, 4).restore(saved, 1 << 17)).toBe(false);
  });

  it('takes the kernel\'s accessed bits, one per unit, from any first unit', () => {
    const clock = new Clock(64, 4);
    clock.mergeAccessed(Uint8Array.from([0b101]), 8);
    expect([...clock.accessed]).toEqual([0, 0b101]);
  });
});
