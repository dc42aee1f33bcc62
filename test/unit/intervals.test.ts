// IntervalSet (src/source/intervals.ts) against a naive model: one boolean per byte of a small
// image. Every operation sequence fast-check finds must leave the same bytes covered, as sorted,
// disjoint, non-touching ranges; forgetting past maxRanges only ever drops ranges.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { IntervalSet, type Interval } from '../../src/source/intervals.js';

const SIZE = 200;

type Op = { op: 'add' | 'delete'; start: number; end: number };

const opArb: fc.Arbitrary<Op> = fc
  .tuple(fc.constantFrom<'add' | 'delete'>('add', 'add', 'delete'), fc.integer({ min: 0, max: SIZE }), fc.integer({ min: 0, max: 40 }))
  .map(([op, start, len]) => ({ op, start, end: Math.min(SIZE, start + len) }));

/** The runs of true bytes of the model in [start, end), as ranges. */
function runs(model: boolean[], start: number, end: number, want: boolean): Interval[] {
  const out: Interval[] = [];
  for (let i = start; i < end; i++) {
    if (model[i] !== want) continue;
    const last = out[out.length - 1];
    if (last && last.end === i) last.end = i + 1;
    else out.push({ start: i, end: i + 1 });
  }
  return out;
}

function checkShape(set: IntervalSet): void {
  const r = set.ranges();
  let bytes = 0;
  for (let i = 0; i < r.length; i++) {
    expect(r[i]!.end).toBeGreaterThan(r[i]!.start);
    if (i > 0) expect(r[i]!.start, 'disjoint and not touching').toBeGreaterThan(r[i - 1]!.end);
    bytes += r[i]!.end - r[i]!.start;
  }
  expect(set.bytes).toBe(bytes);
  expect(set.count).toBe(r.length);
}

describe('IntervalSet', () => {
  it('matches a byte-per-byte model under any sequence of adds and deletes', () => {
    fc.assert(
      fc.property(fc.array(opArb, { maxLength: 60 }), fc.integer({ min: 0, max: SIZE }), fc.integer({ min: 0, max: SIZE }), (ops, qa, qb) => {
        const set = new IntervalSet();
        const model = new Array<boolean>(SIZE).fill(false);
        for (const { op, start, end } of ops) {
          if (op === 'add') set.add(start, end);
          else set.delete(start, end);
          for (let i = start; i < end; i++) model[i] = op === 'add';
        }
        checkShape(set);
        expect(set.ranges()).toEqual(runs(model, 0, SIZE, true));
        const [a, b] = qa <= qb ? [qa, qb] : [qb, qa];
        expect(set.gaps(a, b)).toEqual(runs(model, a, b, false));
        expect(set.covers(a, b)).toBe(model.slice(a, b).every(Boolean));
      }),
      { numRuns: 300 },
    );
  });

  it('merges touching ranges and splits a range on delete', () => {
    const set = new IntervalSet();
    set.add(10, 20);
    set.add(20, 30);
    set.add(40, 50);
    expect(set.ranges()).toEqual([{ start: 10, end: 30 }, { start: 40, end: 50 }]);
    set.add(25, 45);
    expect(set.ranges()).toEqual([{ start: 10, end: 50 }]);
    set.delete(20, 22);
    expect(set.ranges()).toEqual([{ start: 10, end: 20 }, { start: 22, end: 50 }]);
    expect(set.gaps(0, 60)).toEqual([{ start: 0, end: 10 }, { start: 20, end: 22 }, { start: 50, end: 60 }]);
    expect(set.bytes).toBe(38);
  });

  it('past maxRanges forgets the least recently touched ranges, never adds any', () => {
    fc.assert(
      fc.property(fc.array(opArb, { minLength: 1, maxLength: 80 }), fc.integer({ min: 2, max: 8 }), (ops, maxRanges) => {
        const set = new IntervalSet({ maxRanges });
        const model = new Array<boolean>(SIZE).fill(false);
        for (const o of ops) {
          if (o.op === 'add') set.add(o.start, o.end);
          else set.delete(o.start, o.end);
          for (let i = o.start; i < o.end; i++) model[i] = o.op === 'add';
          if (set.count > maxRanges) throw new Error(`${set.count} ranges held, at most ${maxRanges} allowed`);
          // Only bytes the model holds; the range just added is never the one forgotten. (A delete
          // that splits a range may make it forget any half: the split parts share one age.)
          if (!set.ranges().every((r) => model.slice(r.start, r.end).every(Boolean))) throw new Error('holds a byte never added');
          if (o.op === 'add' && !set.covers(o.start, o.end)) throw new Error('forgot the range just added');
        }
        checkShape(set);
      }),
      { numRuns: 300 },
    );
  });

  it('keeps 100,000 scattered reads in bounded memory', () => {
    const set = new IntervalSet({ maxRanges: 1024 });
    for (let i = 0; i < 100_000; i++) set.add(i * 8192, i * 8192 + 4096);
    expect(set.count).toBeLessThanOrEqual(1024);
    expect(set.covers(99_999 * 8192, 99_999 * 8192 + 4096)).toBe(true);
    expect(set.covers(0, 4096)).toBe(false);
  });
});
