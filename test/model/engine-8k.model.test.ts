// Model-based crash test: 6 blocks of 8192 bytes.
// ULOB_MODEL_RUNS sets the sequences per file (four files: 10,000 per make test by default).
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { engineModelProperty } from '../support/engine-model.js';

const RUNS = Number(process.env.ULOB_MODEL_RUNS ?? 2500);

describe('engine model: 6 x 8192 B blocks', () => {
  it('keeps invariants 1-4 through crashes at every persistence point', async () => {
    await fc.assert(engineModelProperty({ blockSize: 8192, blocks: 6, tail: 0 }), { numRuns: RUNS });
  }, 900_000);
});
