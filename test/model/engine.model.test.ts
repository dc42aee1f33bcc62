import fc from 'fast-check';
import { describe, it } from 'vitest';
import { engineModelProperty } from '../support/engine-model.js';

const RUNS = Number(process.env.ULOB_MODEL_RUNS ?? 2500);

describe('engine model, 4 KiB blocks', () => {
  it('keeps invariants 1-4 through crashes at every persistence point', async () => {
    await fc.assert(engineModelProperty({ blockSize: 4096, blocks: 12, tail: 1536 }), { numRuns: RUNS });
  }, 600_000);
});
