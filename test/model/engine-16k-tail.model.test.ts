// Model-based crash test: 4 blocks of 16384 bytes, the last one 3584 bytes short.
// ULOB_MODEL_RUNS sets the sequences per file (four files: 10,000 per make test by default).
// CASES are shrunk counterexamples the property once found, kept as named regression cases: a
// failure of the property prints its own, ready to paste here.
import { describe, it } from 'vitest';
import { assertEngineModel, runEngineModel, type ModelCase } from '../support/engine-model.js';

const RUNS = Number(process.env.ULOB_MODEL_RUNS ?? 2500);
const CONFIG = { blockSize: 16384, blocks: 4, tail: 3584 };

const CASES: Record<string, ModelCase> = {};

describe('engine model: 4 x 16384 B blocks, short last block', () => {
  for (const [name, c] of Object.entries(CASES)) it(name, () => runEngineModel(CONFIG, c), 60_000);

  it('keeps invariants 1-4 through crashes at every persistence point', () => assertEngineModel(CONFIG, RUNS), 900_000);
});
