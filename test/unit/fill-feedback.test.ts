// NeighbourFeedback (src/cache/fill-feedback.ts): the evidence for filling a miss's granule.
import { describe, expect, it } from 'vitest';
import { NeighbourFeedback, RING, USEFUL_SHARE } from '../../src/cache/fill-feedback.js';

describe('NeighbourFeedback', () => {
  it('wants the granule until there is evidence; watched blocks pushed out unread turn it off', () => {
    const f = new NeighbourFeedback();
    expect(f.wantGranule()).toBe(true);
    // RING watched blocks, none read: nothing counted yet (still in the ring).
    f.watch(0, RING);
    expect(f.counts()).toEqual({ useful: 0, wasted: 0 });
    expect(f.wantGranule()).toBe(true);
    // The next one pushes block 0 out unread.
    f.watch(RING, RING + 1);
    expect(f.counts()).toEqual({ useful: 0, wasted: 1 });
    expect(f.wantGranule()).toBe(false);
  });

  it('a watched block read while in the ring is useful, once; a block never watched counts nothing', () => {
    const f = new NeighbourFeedback();
    f.watch(100, 104);
    f.read(101, 103); // two watched blocks
    f.read(101, 102); // read again: already counted
    f.read(5000, 5001); // never watched
    expect(f.counts()).toEqual({ useful: 2, wasted: 0 });
    // Pushing the ring round: 100 and 103 go out unread, 101 and 102 count nothing more.
    f.watch(1_000_000, 1_000_000 + RING);
    expect(f.counts()).toEqual({ useful: 2, wasted: 2 });
  });

  it('a block read and watched again waits its full turn: the older slot that held it counts nothing (review11 B-1)', () => {
    const f = new NeighbourFeedback();
    f.watch(42, 43); // slot 0
    f.read(42, 43); // useful
    f.watch(1000, 1000 + RING - 1); // slots 1..RING-1
    f.watch(42, 43); // slot 0 again? no: the ring wrapped, so this overwrites slot 0 itself
    expect(f.counts()).toEqual({ useful: 1, wasted: 0 });
    const g = new NeighbourFeedback();
    g.watch(42, 43); // slot 0
    g.read(42, 43); // useful
    g.watch(42, 43); // slot 1: watched again
    g.watch(1000, 1000 + RING - 2); // slots 2..RING-1
    g.watch(2000, 2001); // overwrites slot 0, which held 42's older watch: nothing counted
    expect(g.counts()).toEqual({ useful: 1, wasted: 0 });
    g.read(42, 43); // the newer watch is still pending: useful
    expect(g.counts()).toEqual({ useful: 2, wasted: 0 });
  });

  it('a long read over few watched blocks looks them up, not every block of the read', () => {
    const f = new NeighbourFeedback();
    f.watch(7, 8);
    f.watch(1 << 30, (1 << 30) + 1);
    f.read(0, 2 ** 40); // 2^40 blocks: only finishes if it walks the 2 watched ones
    expect(f.counts()).toEqual({ useful: 2, wasted: 0 });
  });

  it('turns on at the useful share, and old evidence fades', () => {
    const f = new NeighbourFeedback();
    // 7 wasted for each useful: just under 1/8 useful... then one more useful passes it.
    let b = 0;
    const round = (useful: number, wasted: number) => {
      for (let i = 0; i < useful; i++) {
        f.watch(b, b + 1);
        f.read(b, b + 1);
        b++;
      }
      // wasted: watched now, pushed out unread by RING more watched (and read, so those count useful)
      f.watch(b, b + wasted);
      b += wasted;
    };
    round(1, 9);
    f.watch(b, b + RING); // push the 9 out unread; these RING stay pending
    b += RING;
    const c = f.counts();
    expect(c.wasted).toBe(9);
    expect(c.useful).toBe(1);
    expect(f.wantGranule()).toBe(c.useful >= USEFUL_SHARE * (c.useful + c.wasted));
    expect(f.wantGranule()).toBe(false);
    // Useful reads of the pending ones: the share passes 1/8.
    f.read(b - RING, b - RING + 1);
    expect(f.wantGranule()).toBe(true);
    // Thousands of wasted ones later the counts stay bounded (halved past 1024).
    for (let i = 0; i < 4; i++) {
      f.watch(b, b + 1000);
      b += 1000;
    }
    const after = f.counts();
    expect(after.useful + after.wasted).toBeLessThanOrEqual(1024);
    expect(f.wantGranule()).toBe(false);
  });
});
