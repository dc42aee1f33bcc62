// kernelCredit and kernelEpochs' evict (src/bdev/uloop.ts). kernelCredit is the budget's policy for the kernel's unasked whole-block
// writes, against a fake CREDIT/QUERY that raises its limit on a ROOM answer as uloop.ko does
// (uloop_reply: by the grant less the request's earlier grant).
import { describe, expect, it } from 'vitest';
import { kernelCredit, kernelEpochs } from '../../src/bdev/uloop.js';
import { ULOOP_MAX_RANGE_BLOCKS } from '../../src/native/uloop.js';
import type { CacheEngine } from '../../src/cache/engine.js';

function fakes(unit: number, budget: number, blocks: number) {
  const store = { unitBlocks: unit, budgetBlocks: budget, usedBlocks: 0, outsideBlocks: 0, release: () => undefined };
  const engine = { store, geometry: { blockCount: blocks }, reserveSpace: async () => undefined } as unknown as CacheEngine;
  const kernel = {
    limit: -1,
    unasked: 0,
    /** Every limit a CREDIT call set, in order. */
    sets: [] as number[],
    /** A ROOM of `n` blocks answered for a request that held `old` of an earlier grant. */
    answer(n: number, old: number) {
      this.limit = Math.min(this.limit + (n - old), blocks);
      this.unasked += n - old;
    },
  };
  const credit = kernelCredit(engine, {
    credit: (limit) => {
      kernel.limit = limit;
      kernel.sets.push(limit);
      return { limit, unasked: kernel.unasked };
    },
    limit: () => kernel.limit,
    gone: () => false,
  });
  return { store, kernel, credit };
}

describe('kernelCredit', () => {
  // review9 K-E: a request's second ROOM (its missing count grew past its first grant) raises the
  // kernel's limit by n less the first grant; the daemon's copy rose by n, and the next look
  // wrote that copy back, raising the kernel's limit past what it had granted.
  // Planted (update() without mirror(): the copy written back): 'expected 12 to be less than or equal to 9'.
  it("a second ROOM of one request never makes a CREDIT call raise the kernel's limit past its own", async () => {
    const { kernel, credit } = fakes(4, 100, 1000);
    credit.update();
    expect(kernel.limit).toBe(4);
    await credit.room(3);
    kernel.answer(3, 0); // limit 7
    await credit.room(5);
    kernel.answer(5, 3); // limit 9: raised by 2
    expect(kernel.limit).toBe(9);
    kernel.sets.length = 0;
    credit.update();
    for (const l of kernel.sets) expect(l).toBeLessThanOrEqual(9);
    // And back down to max(one unit, unasked) = 5.
    expect(kernel.limit).toBe(5);
    expect(credit.limit()).toBe(5);
  });

  // Planted (the same): 'expected [ 10 ] to deeply equal [ 7 ]'.
  it("a barrier lowers the limit from the kernel's own value", async () => {
    const { kernel, credit } = fakes(4, 100, 1000);
    credit.update();
    await credit.room(3);
    kernel.answer(3, 0);
    await credit.room(5);
    kernel.answer(5, 3); // kernel 9, the copy 12 without the fix
    kernel.sets.length = 0;
    credit.handedOver(2);
    expect(kernel.sets).toEqual([7]);
  });
});

// review9 K-A2: kernelEpochs' evict holds each EVICT range as a claim (ULOOP_EVICT_F_HOLD) until
// the punch, and the kernel refuses a 65th claim with EAGAIN. One call stops at 32 held ranges
// (the rest of the victims stay, and the engine picks other units), so no piece of a batch
// spread over a disk larger than 16 GiB is refused. Planted (no cap): the 6 pieces past 64 refused EAGAIN ("EVICT of blocks 4194304..4194319 failed (EAGAIN)").
describe('kernelEpochs evict', () => {
  it('holds at most 32 ranges per call, so the kernel never refuses a piece for its 64 claims', () => {
    const max = ULOOP_MAX_RANGE_BLOCKS;
    const blocks = 100 * max;
    const engine = { geometry: { blockCount: blocks }, store: { clock: { units: blocks / 64 } } } as unknown as CacheEngine;
    let claims = 0;
    let nextId = 1;
    const refused: string[] = [];
    const epochs = kernelEpochs(
      engine,
      {
        begin: () => 1,
        commit: () => undefined,
        dirtyBlocks: () => 0,
        gone: () => false,
        device: '/dev/uloop9',
        evict: () => 0,
        accessed: () => 0,
        evictHeld: (_first, count, bits) => {
          if (claims >= 64) throw Object.assign(new Error('EAGAIN'), { code: 'EAGAIN' });
          claims++;
          let n = 0;
          for (let i = 0; i < count; i++) if (bits[i >> 3]! & (1 << (i & 7))) n++;
          return { done: n, id: nextId++ };
        },
        claim: () => 0,
        letGo: () => {
          claims--;
        },
      },
      (line) => refused.push(line),
    );
    // One 16-block victim in each of 70 ranges.
    const victims = Array.from({ length: 70 }, (_, i) => ({ start: i * max, count: 16 }));
    const gone = epochs.external.evict!(victims);
    expect(refused).toEqual([]);
    expect(gone.reduce((n, e) => n + e.count, 0)).toBe(32 * 16);
    epochs.external.evicted!([]);
    expect(claims).toBe(0);
  });
});
