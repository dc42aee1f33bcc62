// Model-based crash test of the uloop protocol (test/support/uloop-model.ts): a model of the
// kernel's block state drives the real upcall handler, epoch wiring, engine and store, with power
// losses and daemon kills at every persistence point, barrier and epoch transactions included.
// 1,000 sequences in full (make test-long); make test runs ULOB_TEST_SCALE's share (test/support/scale.ts).
import { describe, it } from 'vitest';
import { assertUloopModel, runUloopModel, type UloopModelCase } from '../support/uloop-model.js';
import { scaledRuns } from '../support/scale.js';

const RUNS = scaledRuns(1000);
const CONFIG = { blockSize: 4096, blocks: 6, tail: 0 };

// Shrunk counterexamples the property found with a bug planted, kept as regression cases.
const CASES: Record<string, UloopModelCase> = {
  // PRESERVE answered without keeping the epoch's version: the racing write reached the disk.
  'a write racing a flush does not reach the disk (PRESERVE keeps the epoch version)': {
    seed: 256871912,
    steps: [
      { op: { kind: 'writeback-racing', sector: 0, count: 1, split: 0 } },
      { op: { kind: 'write', sector: 40, count: 1, fua: false } },
      { crash: 'power', after: 5, op: { kind: 'writeback-racing', sector: 40, count: 1, split: 0 } },
    ],
  },
  // An INTENT for a block whose fill the store had not synced made it durably dirty over a hole.
  'an intent after a fill the store has not committed syncs the fill first': {
    seed: 8,
    steps: [{ crash: 'power', after: 2, op: { kind: 'write', sector: 0, count: 1, fua: false } }],
  },
};

describe('uloop protocol model: 6 x 4096 B blocks', () => {
  for (const [name, c] of Object.entries(CASES)) it(name, () => runUloopModel(CONFIG, c), 60_000);

  it('keeps invariants 1-4 and 7 through power losses and daemon kills', () => assertUloopModel(CONFIG, RUNS), 900_000);
});

// ULOOP_F_ZERO: ZERO upcalls (DISCARD, WRITE_ZEROES, and the zeros of partial blocks) and misses
// on zeroed blocks, with power losses and daemon kills at every persistence point; after every
// step no block present in the store or the kernel lies over a hole.
const ZERO_CONFIG = { blockSize: 4096, blocks: 8, tail: 0, zero: true };

describe('uloop protocol model with ULOOP_F_ZERO: 8 x 4096 B blocks', () => {
  it('keeps invariants 1-4 and 7, and no present bit over a hole, through power losses and daemon kills', () => assertUloopModel(ZERO_CONFIG, RUNS), 900_000);
});

// A cache budget of 4 blocks (ULOOP_F_ACCESSED, EVICT, budget flushes): evictions interleaved
// with misses, writes, flushes and crashes; no present bit over a hole, and no miss fails for want
// of room (the budget never fills with dirty blocks no flush takes). Without ZERO: with it the
// property also finds the open bug of the last case below.
const BUDGET_CONFIG = { blockSize: 4096, blocks: 8, tail: 0, budgetBlocks: 4, unitBlocks: 1 };
const BUDGET_ZERO_CONFIG = { ...BUDGET_CONFIG, zero: true };

// Shrunk counterexamples of the budget configuration.
const BUDGET_CASES: Record<string, UloopModelCase> = {
  // The daemon killed between the kernel's EPOCH_COMMIT and the store's clearFlushed: blocks stayed
  // dirty in the store and clean in the kernel; no later epoch took them (an epoch takes blocks
  // dirty on both sides), nothing evicted them, and a miss failed with EIO ('cache full').
  'a daemon killed between the kernel\'s epoch commit and the store\'s leaves no block dirty on one side only': {
    seed: 1,
    steps: [
      { op: { kind: 'write', sector: 10, count: 15, fua: false } },
      { op: { kind: 'write', sector: 40, count: 1, fua: false } },
      { op: { kind: 'flush' } },
      { crash: 'daemon', after: 6, op: { kind: 'writeback-racing', sector: 0, count: 8, split: 0 } },
    ],
  },
};

// Open bug, found with the fix above in place and failing on main b2c7de2 too (no daemon kill, no
// flush: not that bug): with ZERO and a budget, after a power loss a read over a missing block,
// zeroed blocks and a dirty one fails with EIO. it.fails until it is fixed (then make it an it).
const BUDGET_ZERO_OPEN: Record<string, UloopModelCase> = {
  'zeroed blocks and a power loss: a read over them is served': {
    seed: 1,
    steps: [
      { op: { kind: 'zero', sector: 20, count: 21 } },
      { op: { kind: 'read', sector: 33, count: 23 } },
      { op: { kind: 'zero', sector: 43, count: 22 } },
      { crash: 'power', after: 2, op: { kind: 'write', sector: 9, count: 15, fua: false } },
      { op: { kind: 'read', sector: 15, count: 23 } },
    ],
  },
};

// Open bug, failing on main b2c7de2 too: this run never ends (the model's I/O is all in memory, so
// a loop of upcalls that never waits starves the event loop and even the test's timeout). Until
// it is found, the budget property below runs only with ULOB_MODEL_BUDGET=1: it finds this case
// within about 100 runs and would hang \`make test\`.
const BUDGET_HANG: UloopModelCase = {"seed": 25, "steps": [{"op": {"kind": "writeback"}}, {"crash": "power", "after": 12, "op": {"kind": "read", "sector": 29, "count": 22}}, {"op": {"kind": "writeback-racing", "sector": 3, "count": 9, "split": 8}}, {"op": {"kind": "write", "sector": 34, "count": 20, "fua": true}}, {"op": {"kind": "writeback"}}, {"crash": "daemon", "after": 1, "op": {"kind": "writeback-racing", "sector": 37, "count": 23, "split": 2}}, {"op": {"kind": "evict", "blocks": 1}}, {"op": {"kind": "writeback"}}, {"op": {"kind": "flush"}}]};

describe('uloop protocol model with a cache budget: 8 x 4096 B blocks, budget 4', () => {
  for (const [name, c] of Object.entries(BUDGET_CASES)) it(name, () => runUloopModel(BUDGET_CONFIG, c), 60_000);
  for (const [name, c] of Object.entries(BUDGET_ZERO_OPEN)) it.fails(`${name} (open bug: EIO)`, () => runUloopModel(BUDGET_ZERO_CONFIG, c), 60_000);

  it.skip('a daemon kill during a racing flush, then an eviction and a flush (open bug: never ends)', () => runUloopModel(BUDGET_CONFIG, BUDGET_HANG), 60_000);
  it.runIf(process.env.ULOB_MODEL_BUDGET === '1')('keeps invariants 1-4 and 7, no present bit over a hole, and misses served, through evictions, power losses and daemon kills', () => assertUloopModel(BUDGET_CONFIG, RUNS), 900_000);
});
