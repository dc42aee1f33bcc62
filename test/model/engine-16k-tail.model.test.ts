// Model-based crash test: 4 blocks of 16384 bytes, the last one 3584 bytes short.
// ULOB_MODEL_RUNS sets the sequences per file (four files: 10,000 per make test by default).
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { engineModelProperty } from '../support/engine-model.js';

const RUNS = Number(process.env.ULOB_MODEL_RUNS ?? 2500);

describe('engine model: 4 x 16384 B blocks, short last block', () => {
  it('keeps invariants 1-4 through crashes at every persistence point', async () => {
    await fc.assert(engineModelProperty({ blockSize: 16384, blocks: 4, tail: 3584 }), { numRuns: RUNS });
  }, 900_000);
});
