// Model-based crash test: 4 blocks of 16384 bytes, the last one 3584 bytes short.
// 2,500 sequences in full (make test-long); make test runs ULOB_TEST_SCALE's share (test/support/scale.ts).
// CASES are shrunk counterexamples the property once found, kept as named regression cases: a
// failure of the property prints its own, ready to paste here.
import { describe, it } from 'vitest';
import { assertEngineModel, runEngineModel, type ModelCase } from '../support/engine-model.js';
import { scaledRuns } from '../support/scale.js';

const RUNS = scaledRuns(2500);
const CONFIG = { blockSize: 16384, blocks: 4, tail: 3584 };

const CASES: Record<string, ModelCase> = {};

describe('engine model: 4 x 16384 B blocks, short last block', () => {
  for (const [name, c] of Object.entries(CASES)) it(name, () => runEngineModel(CONFIG, c), 60_000);

  it('keeps invariants 1-4 through crashes at every persistence point', () => assertEngineModel(CONFIG, RUNS), 900_000);
});
