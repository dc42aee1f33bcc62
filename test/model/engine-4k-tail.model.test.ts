// Model-based crash test: 12 blocks of 4096 bytes, the last one 1536 bytes short.
// 2,500 sequences in full (make test-long); make test runs ULOB_TEST_SCALE's share (test/support/scale.ts).
// CASES are shrunk counterexamples the property once found, kept as named regression cases: a
// failure of the property prints its own, ready to paste here.
import { describe, it } from 'vitest';
import { assertEngineModel, runEngineModel, type ModelCase } from '../support/engine-model.js';
import { scaledRuns } from '../support/scale.js';

const RUNS = scaledRuns(2500);
const CONFIG = { blockSize: 4096, blocks: 12, tail: 1536 };

const CASES: Record<string, ModelCase> = {
  // Planted once: the commit recorded present and dirty bits before its fdatasync (durability
  // rule 1). A power loss then keeps a FUA write's dirty bit over data that never reached the cache.
  'a power loss inside a FUA write leaves no garbage behind a dirty bit': {
    seed: 1,
    steps: [{ crash: 'power', after: 3, op: { kind: 'write', sector: 0, count: 1, fua: true } }],
  },
  // Planted once: a write into a present clean block went ahead without a durable dirty intent
  // (rule 3), leaving it to the next commit. A power loss then leaves a clean block whose cache
  // copy differs from the disk (invariant 2).
  'a clean block is durably dirty before its cache copy changes': {
    seed: 1,
    steps: [
      { crash: 'power', after: 0, op: { kind: 'write', sector: 0, count: 1, fua: false } },
      { crash: 'power', after: 5, op: { kind: 'writeback-racing', sector: 0, count: 1, split: 0, during: false } },
    ],
  },
  // Planted once: the write into a clean block went ahead once its intent transaction was in the
  // WAL, without waiting for the WAL's fsync (store.markDirtyDurable). A power loss then drops the
  // intent but keeps the new bytes: a clean block that differs from the disk (rule 3).
  'a dirty intent is synced before the write it guards, though its fsync runs off the loop': {
    seed: 816434649,
    steps: [
      { crash: 'power', after: 0, op: { kind: 'write', sector: 0, count: 1, fua: false } },
      { crash: 'power', after: 0, op: { kind: 'flush' } },
      { crash: 'power', after: 3, op: { kind: 'writeback-racing', sector: 0, count: 1, split: 0, during: false } },
    ],
  },
  // Planted once: commitEpoch cleared the dirty bits of blocks rewritten during the flush too
  // (rule 7), so the rewrite was never written back (invariant 4).
  'a block rewritten during a flush stays dirty after it': {
    seed: 1,
    steps: [
      { op: { kind: 'write', sector: 0, count: 1, fua: false } },
      { crash: 'power', after: 7, op: { kind: 'writeback-racing', sector: 0, count: 1, split: 0, during: false } },
    ],
  },
  // Planted once: a flush cleaned zeroed blocks (TRIM, WRITE_ZEROES) before the bitmap page with
  // their cleared present bits was synced (rule 10). A power loss then brings back the stale
  // present bit: a clean block whose cache copy is the old data, not the disk's zeros.
  'a zeroed block is durably not present before a flush makes it clean': {
    seed: 1,
    steps: [
      { crash: 'power', after: 0, op: { kind: 'read', sector: 0, count: 1 } },
      { op: { kind: 'zero', sector: 0, count: 8, fua: false } },
      { crash: 'power', after: 4, op: { kind: 'writeback' } },
    ],
  },
  // Planted once: a partial write into a zeroed block did not write zeros into the rest of the
  // block first. Without a budget the zeroed block is not punched, so the rest kept the block's
  // old bytes, and the flush sent them to the disk instead of zeros.
  'a partial write into a zeroed block materialises zeros first': {
    seed: 1,
    steps: [
      { crash: 'power', after: 0, op: { kind: 'read', sector: 0, count: 1 } },
      { op: { kind: 'discard', sector: 0, count: 8 } },
      { op: { kind: 'write', sector: 0, count: 1, fua: false } },
      { op: { kind: 'writeback-racing', sector: 0, count: 1, split: 0, during: false } },
    ],
  },
  // Planted once: no copy-on-write of the epoch's version before a write (rule 7), so a write
  // racing the flush reached the disk inside an epoch that began before it (invariant 7).
  'a flush writes the epoch image, not a write that raced it': {
    seed: 1,
    steps: [
      { crash: 'power', after: 4, op: { kind: 'write', sector: 0, count: 1, fua: true } },
      { op: { kind: 'writeback-racing', sector: 0, count: 1, split: 0, during: false } },
    ],
  },
  // Planted once (review7 P6): a write during a commit's fdatasync took its block out of the runs
  // staged since (#stagedRuns) but not out of the run being committed (#committingRuns). The commit
  // then recorded the block present and clean over the write's data (invariant 2).
  'a write into a range-staged block during the commit sync leaves that commit': {
    seed: 1,
    steps: [{ crash: 'power', after: 4, op: { kind: 'write-during-commit', sector: 0, count: 9, at: 0, wcount: 1 } }],
  },
  'a write into a range-staged block during the commit sync leaves that commit (no crash)': {
    seed: 1,
    steps: [{ op: { kind: 'write-during-commit', sector: 0, count: 9, at: 0, wcount: 1 } }],
  },
};

describe('engine model: 12 x 4096 B blocks, short last block', () => {
  for (const [name, c] of Object.entries(CASES)) it(name, () => runEngineModel(CONFIG, c), 60_000);

  it('keeps invariants 1-4 through crashes at every persistence point', () => assertEngineModel(CONFIG, RUNS), 900_000);
});
