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
// a hole, no block dirty in the store and clean in the kernel (expectStoreDirtyInKernel), and the
// cache file within the budget plus one unit (expectSpaceBound: the kernel's credit, ROOM).
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
  // A read of blocks 2..5 (the whole budget) with blocks 0..2 dirty (step 6): each fill evicted the
  // block the previous fill had made present for the same read, which was not yet in flight, and
  // the read asked again, for ever (the event loop busy, no timeout fired). EVICT now leaves the
  // blocks of a request still preparing (uloop_prepare; the model kernel the same), so the daemon
  // finds nothing to evict, flushes (budget), and evicts the cleaned blocks. Planted
  // (ULOB_MODEL_EVICT_PREPARING=1): hangs again.
  'a read as large as the budget less the dirty data flushes instead of evicting its own fills': {
    seed: 994401209,
    steps: [
      { op: { kind: 'flush' } },
      { crash: 'power', after: 6, op: { kind: 'write', sector: 28, count: 16, fua: true } },
      { op: { kind: 'write', sector: 2, count: 20, fua: false } },
      { crash: 'daemon', after: 1, op: { kind: 'read', sector: 29, count: 4 } },
      { op: { kind: 'read', sector: 21, count: 9 } },
      { op: { kind: 'read', sector: 21, count: 24 } },
      { op: { kind: 'flush' } },
      { op: { kind: 'zero', sector: 4, count: 16 } },
      { op: { kind: 'read', sector: 3, count: 12 } },
      { crash: 'daemon', after: 6, op: { kind: 'write', sector: 56, count: 22, fua: true } },
    ],
  },
  // A daemon killed inside an eviction, after the kernel's EVICT and before the store's: the
  // store kept the blocks present, the kernel refused to EVICT them again (not present there),
  // and every miss failed ('flushes free nothing', EIO). The re-attach's reconcile finds them
  // with CLAIM and evicts them in the store. Planted (ULOB_MODEL_NO_PRESENT_RECONCILE=1): 'EIO:
  // miss failed (-5)'.
  'a daemon killed inside an eviction leaves no block present only in the store': {
    seed: 1,
    steps: [
      { crash: 'power', after: 0, op: { kind: 'read', sector: 0, count: 1 } },
      { crash: 'daemon', after: 0, op: { kind: 'evict', blocks: 3 } },
    ],
  },
  // A MISS on a zeroed block waited for room while a budget flush wrote its zeros and cleaned it
  // on both sides; its materialised zeros were then committed dirty in the store only (dirty in
  // the store and clean in the kernel). engine.#materialize stages such a block clean now.
  'a zeroed block materialised while a budget flush cleans it is not left dirty in the store only': {
    seed: 1,
    steps: [
      { op: { kind: 'zero', sector: 14, count: 19 } },
      { op: { kind: 'write', sector: 0, count: 1, fua: false } },
      { crash: 'power', after: 0, op: { kind: 'write', sector: 0, count: 1, fua: false } },
    ],
  },
  // Whole missing blocks written by the kernel without asking (rule 4) past the budget: the
  // kernel's credit (CREDIT, ROOM; kernelCredit's policy) keeps the cache file within the budget
  // plus one unit. Planted (ULOB_MODEL_NO_CREDIT=1, or the daemon never setting the limit): 'the
  // cache file holds 6 blocks, over the budget of 4 plus one unit of 1'.
  'whole-block writes past the budget wait for ROOM: the cache file stays within the budget plus one unit': {
    seed: 1,
    steps: [
      { crash: 'power', after: 0, op: { kind: 'evict', blocks: 1 } },
      { op: { kind: 'write', sector: 7, count: 18, fua: false } },
    ],
  },
  // A punch that failed (a power crash at it) left its blocks counted as being punched for ever:
  // the MISS of blocks 0..2 waited for room on them, and the run never ended (the property's 20 s
  // timeout). Planted (store.#punch keeping failed blocks in #punching): times out.
  'a failed punch does not leave a fill waiting for room for ever': {
    seed: 1,
    steps: [
      { op: { kind: 'read', sector: 20, count: 5 } },
      { crash: 'daemon', after: 0, op: { kind: 'flush' } },
      { crash: 'power', after: 11, op: { kind: 'read', sector: 5, count: 12 } },
    ],
  },
  // The kernel refused to EVICT the clock's victims (in a request still preparing) and the engine
  // tried no other unit: the write's ROOM found 'flushes free nothing' and failed (EIO). An
  // eviction the kernel cut short now goes on with other units. Planted (no retry): 'EIO: room
  // failed (-5)'.
  'an eviction the kernel refuses in part goes on with other units': {
    seed: 1,
    steps: [
      { op: { kind: 'writeback-racing', sector: 30, count: 18, split: 0 } },
      { op: { kind: 'write', sector: 9, count: 16, fua: false } },
    ],
  },
  // A ZERO the killed daemon never answered: the kernel holds its blocks and sends it to the next
  // daemon (the model kernel now does: reissueZero), so they are not served over the punched hole.
  'a ZERO cut by a daemon kill is sent again to the next daemon': {
    seed: 1,
    steps: [
      { op: { kind: 'write', sector: 8, count: 1, fua: false } },
      { crash: 'daemon', after: 5, op: { kind: 'zero', sector: 0, count: 24 } },
    ],
  },
};

// Session 9 (kbud9): the last resort for review8 K2 (EVICT with ULOOP_EVICT_F_PINNED, once a
// flush freed nothing or nothing is dirty) first took the blocks of every request still preparing.
// A write whose ROOM grant and partial-block fill were the whole budget then lost its own fill and
// asked again, and the miss failed ('EIO: miss failed (-5)', 'the cache budget is held by blocks
// in use'). The kernel (and the model kernel) now leaves the oldest preparing request its blocks.
// Planted (ULOB_MODEL_PINNED_ALL=1, the pinned EVICT leaves none): 'EIO: miss failed (-5)'.
BUDGET_CASES['the last-resort EVICT leaves the oldest request its own fills'] = {
  seed: 1308816362,
  steps: [
    { op: { kind: 'write', sector: 17, count: 17, fua: false } },
    { op: { kind: 'read', sector: 56, count: 12 } },
    { op: { kind: 'write', sector: 31, count: 21, fua: true } },
    { op: { kind: 'read', sector: 25, count: 16 } },
    { op: { kind: 'write', sector: 13, count: 4, fua: true } },
    { op: { kind: 'read', sector: 34, count: 21 } },
    { crash: 'power', after: 3, op: { kind: 'zero', sector: 3, count: 13 } },
  ],
};
// The budget property's idle run at full scale (room8: 'went idle on a case not found yet'),
// found on main at run 1520 of 3000 with fast-check's own timeout and no shrinking: a write racing
// a flush (writeback-racing) waited for room that only the end of the flush epoch gives back,
// while the flush's copy had died with the simulated power loss; the harness ended the epoch only
// once both had settled, so neither ever did (the event loop idle). The daemon's flusher ends the
// epoch as soon as its copy fails (flushDirty); the harness now does too. A harness cycle, not the
// daemon's. Planted (ULOB_MODEL_LATE_ABORT=1, the old order): 'Test timed out in 60000ms'.
BUDGET_CASES['a flush whose copy dies ends its epoch, so a write waiting for room goes on'] = {
  seed: 2147483619,
  steps: [
    { op: { kind: 'write', sector: 43, count: 12, fua: true } },
    { crash: 'power', after: 10, op: { kind: 'flush' } },
    { crash: 'power', after: 10, op: { kind: 'evict', blocks: 1 } },
    { op: { kind: 'writeback-racing', sector: 34, count: 20, split: 2 } },
    { op: { kind: 'zero', sector: 16, count: 4 } },
    { crash: 'power', after: 3, op: { kind: 'writeback-racing', sector: 49, count: 12, split: 0 } },
    { crash: 'power', after: 1, op: { kind: 'write', sector: 60, count: 17, fua: true } },
  ],
};

// Session 10 (kbud10): the bound is now checked after daemon kills too (it was skipped until the
// next ADD). A fill the killed daemon answered (the kernel serves it) and never committed (the
// model commits no fill by timer) was counted by no store: after the re-attach the cache file
// held 6 blocks for a budget of 4 plus one unit, as uloop-budget's VM run held 16.77 MiB for
// 16 MiB. The re-attach's reconcile now evicts such blocks from the kernel and punches them
// (src/bdev/uloop.ts kernelEpochs.reconcile). Planted (that pass off): the property failed after
// 153 and 118 runs, 'the cache file holds 6 blocks, over the budget of 4 plus one unit of 1'.
BUDGET_CASES['fills a killed daemon answered and never recorded are not left in the cache file'] = {
  seed: 1,
  steps: [
    { crash: 'power', after: 0, op: { kind: 'writeback' } },
    { op: { kind: 'write', sector: 32, count: 8, fua: false } },
    { crash: 'daemon', after: 6, op: { kind: 'write', sector: 17, count: 8, fua: false } },
    { op: { kind: 'read', sector: 38, count: 19 } },
  ],
};

describe('uloop protocol model with a cache budget: 4 of 8 x 4096 B blocks', () => {
  for (const [name, c] of Object.entries(BUDGET_CASES)) it(name, () => runUloopModel(BUDGET_CONFIG, c), 60_000);

  // Invariants 1-4 and 7, no present bit over a hole, no block dirty only in the store, and the
  // cache file within the budget plus one unit after every step (after daemon kills too, since
  // session 10). Found every named case above.
  // Full runs (ULOB_TEST_SCALE=1, 1,000): passed; 3,000 and 4,000 runs passed too (session 9).
  it('keeps invariants 1-4 and 7, no present bit over a hole, and the cache file within the budget plus one unit, through power losses and daemon kills', () => assertUloopModel(BUDGET_CONFIG, RUNS), 900_000);
});
