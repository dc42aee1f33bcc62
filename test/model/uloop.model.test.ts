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

// A cache budget (--cache-size) on /dev/uloopN: 4 blocks of budget in units of 1 over an 8-block
// disk, with ULOOP_F_ZERO, ULOOP_F_ACCESSED and EVICT, evictions interleaved with everything else,
// power losses and daemon kills at every persistence point. After every step: no present bit over
// a hole, and no block dirty in the store and clean in the kernel (expectStoreDirtyInKernel).
const BUDGET_CONFIG = { blockSize: 4096, blocks: 8, tail: 0, zero: true, budgetBlocks: 4, unitBlocks: 1 };

const BUDGET_CASES: Record<string, UloopModelCase> = {
  // A daemon killed between the kernel's epoch commit and the store's left blocks dirty in the
  // store and clean in the kernel: no flush took them again, and once they filled the budget every
  // miss failed with EIO ('cache full'). The re-attach reconciles them (ExternalEpochs.reconcile).
  'a daemon killed between the kernel\'s epoch commit and the store\'s leaves no block dirty only in the store': {
    seed: 1,
    steps: [
      { op: { kind: 'write', sector: 10, count: 15, fua: false } },
      { op: { kind: 'write', sector: 40, count: 1, fua: false } },
      { op: { kind: 'flush' } },
      { crash: 'daemon', after: 6, op: { kind: 'writeback-racing', sector: 0, count: 8, split: 0 } },
    ],
  },
};

describe('uloop protocol model with a cache budget: 4 of 8 x 4096 B blocks', () => {
  for (const [name, c] of Object.entries(BUDGET_CASES)) it(name, () => runUloopModel(BUDGET_CONFIG, c), 60_000);

  // No property test here yet: the budget property (assertUloopModel(BUDGET_CONFIG, RUNS)) hangs
  // (the event loop stays busy, so no timeout fires) within its first runs on a case that hangs the same way without this branch's changes (ubudget7, 07:17; also
  // with the old refusal of a budget below the dirty data): the run below. It hangs in its 6th step,
  // a read of blocks 2..5 (the whole budget of 4) with blocks 0..2 dirty: the model kernel's
  // prepare loop fills one block, the fill of the next evicts it, and so on (a request is not in
  // flight, so not safe from EVICT, until its last pass), all in microtasks. The real kernel's
  // uloop_prepare has the same loop: a request needing more blocks than the budget less the dirty
  // data can livelock until a flush cleans some. Add the property once that is settled (the budget
  // on /dev/uloopN stays refused until then: docs/design.md).
  //   {"seed": 994401209, "steps": [{"op": {"kind": "flush"}}, {"crash": "power", "after": 6, "op": {"kind": "write", "sector": 28, "count": 16, "fua": true}}, {"op": {"kind": "write", "sector": 2, "count": 20, "fua": false}}, {"crash": "daemon", "after": 1, "op": {"kind": "read", "sector": 29, "count": 4}}, {"op": {"kind": "read", "sector": 21, "count": 9}}, {"op": {"kind": "read", "sector": 21, "count": 24}}, {"op": {"kind": "flush"}}, {"op": {"kind": "zero", "sector": 4, "count": 16}}, {"op": {"kind": "read", "sector": 3, "count": 12}}, {"crash": "daemon", "after": 6, "op": {"kind": "write", "sector": 56, "count": 22, "fua": true}}]}
});
