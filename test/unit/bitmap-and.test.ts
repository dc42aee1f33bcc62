// Bitmap.and (the uloop frontend's EPOCH_BEGIN: the snapshot narrowed to the kernel's dirty set),
// a word at a time where the buffers allow it: the same bits as a byte loop for every length and
// alignment, the count recomputed, bytes past the mask left alone.
import { randomBytes } from 'node:crypto';
import { expect, it } from 'vitest';
import { Bitmap } from '../../src/cache/bitmap.js';

it('keeps exactly the bits also set in the mask, for every length and alignment', () => {
  for (const bytes of [1, 3, 4, 5, 7, 8, 9, 63, 64, 65, 4095, 4096, 4097]) {
    for (const [offThis, offMask] of [[0, 0], [0, 1], [1, 0], [4, 4], [2, 6]] as const) {
      // Views at an offset into larger allocations: the word path only where both are 4-aligned.
      const mine = Buffer.from(randomBytes(bytes + 8)).subarray(offThis, offThis + bytes);
      const mask = Buffer.from(randomBytes(bytes + 8)).subarray(offMask, offMask + bytes);
      const want = Buffer.from(mine);
      for (let i = 0; i < bytes; i++) want[i]! &= mask[i]!;
      const bitmap = new Bitmap(bytes * 8, mine);
      expect(bitmap.count()).toBeGreaterThanOrEqual(0); // a count cached before, stale after
      bitmap.and(mask);
      expect(Buffer.compare(mine, want), `${bytes} bytes at offsets ${offThis}/${offMask}`).toBe(0);
      let ones = 0;
      for (let b = 0; b < bytes * 8; b++) if (want[b >> 3]! & (1 << (b & 7))) ones++;
      expect(bitmap.count(), `${bytes} bytes: count`).toBe(ones);
    }
  }
  // A shorter mask: the bytes past it stay as they were.
  const mine = Buffer.alloc(12, 0xff);
  new Bitmap(96, mine).and(Buffer.alloc(5, 0x0f));
  expect([...mine]).toEqual([15, 15, 15, 15, 15, 255, 255, 255, 255, 255, 255, 255]);
});
