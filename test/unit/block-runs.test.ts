// BlockRuns (src/cache/runs.ts): the engine's staged long fills. Against a Set of block numbers,
// under random adds of free ranges and deletes: membership, counts, and runs that are sorted,
// disjoint and never touch.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { BlockRuns } from '../../src/cache/runs.js';

describe('BlockRuns', () => {
  it('matches a Set of blocks under random adds and deletes; runs stay sorted, disjoint, merged', () => {
    const op = fc.oneof(
      fc.record({ kind: fc.constant('add' as const), start: fc.integer({ min: 0, max: 200 }), count: fc.integer({ min: 1, max: 40 }) }),
      fc.record({ kind: fc.constant('delete' as const), start: fc.integer({ min: 0, max: 240 }), count: fc.constant(1) }),
    );
    fc.assert(
      fc.property(fc.array(op, { maxLength: 80 }), (ops) => {
        const runs = new BlockRuns();
        const model = new Set<number>();
        for (const { kind, start, count } of ops) {
          if (kind === 'add') {
            let overlaps = false;
            for (let b = start; b < start + count; b++) if (model.has(b)) overlaps = true;
            if (overlaps) {
              expect(() => runs.add(start, start + count)).toThrow(RangeError);
              continue;
            }
            runs.add(start, start + count);
            for (let b = start; b < start + count; b++) model.add(b);
          } else {
            expect(runs.delete(start)).toBe(model.delete(start));
          }
          expect(runs.blocks).toBe(model.size);
          const ext = runs.extents();
          expect(runs.runs).toBe(ext.length);
          for (let i = 1; i < ext.length; i++) expect(ext[i]!.start).toBeGreaterThan(ext[i - 1]!.start + ext[i - 1]!.count);
          const fromRuns = new Set<number>();
          for (const e of ext) for (let b = e.start; b < e.start + e.count; b++) fromRuns.add(b);
          expect([...fromRuns].sort((a, b) => a - b)).toEqual([...model].sort((a, b) => a - b));
          for (let b = 0; b < 250; b++) expect(runs.has(b)).toBe(model.has(b));
        }
      }),
      { numRuns: 300 },
    );
  });

  it('merges a run that fills the gap between two, splits one on a delete in its middle, and clears', () => {
    const runs = new BlockRuns();
    runs.add(0, 10);
    runs.add(20, 30);
    expect(runs.runs).toBe(2);
    runs.add(10, 20);
    expect(runs.extents()).toEqual([{ start: 0, count: 30 }]);
    expect(runs.delete(15)).toBe(true);
    expect(runs.extents()).toEqual([{ start: 0, count: 15 }, { start: 16, count: 14 }]);
    expect(runs.delete(15)).toBe(false);
    expect(() => runs.add(14, 16)).toThrow(RangeError);
    runs.clear();
    expect(runs.blocks).toBe(0);
    expect(runs.has(3)).toBe(false);
  });
});
