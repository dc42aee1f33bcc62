// Sizes as status, the progress bar and the detach line print them (src/units.ts formatBytes): one
// form per value, whatever bytes beyond it (newuser4 item 9: `dirty 2 GiB` beside `2.0 GiB held`,
// and `(2 GiB held)` in one run, `(2.0 GiB held)` in the next).
import { describe, expect, it } from 'vitest';
import { formatBytes, parseSize } from '../../src/units.js';

const KiB = 1024;
const MiB = KiB * KiB;
const GiB = MiB * KiB;

describe('formatBytes', () => {
  it('prints a whole number of units without a decimal, also when a few bytes more round to it', () => {
    expect(formatBytes(2 * GiB)).toBe('2 GiB');
    expect(formatBytes(2 * GiB + 4096)).toBe('2 GiB');
    expect(formatBytes(2 * GiB - 4096)).toBe('2 GiB');
    expect(formatBytes(3 * MiB + 512)).toBe('3 MiB');
  });

  it('one decimal below 100 units, none from 100 on; bytes as they are below 1 KiB', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(1023)).toBe('1023 B');
    expect(formatBytes(1024)).toBe('1 KiB');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(Math.round(63.9 * MiB))).toBe('63.9 MiB');
    expect(formatBytes(Math.round(99.96 * MiB))).toBe('100 MiB');
    expect(formatBytes(Math.round(256.4 * MiB))).toBe('256 MiB');
  });

  it('goes up a unit when the value rounds to 1024 of the smaller one', () => {
    expect(formatBytes(MiB - 1)).toBe('1 MiB');
    expect(formatBytes(GiB - KiB)).toBe('1 GiB');
  });

  it('reads back through parseSize to within its rounding', () => {
    for (const n of [4096, 1536, 5 * MiB, 2 * GiB + 4096, 24 * 1024 * GiB]) {
      const back = parseSize(formatBytes(n).replace(' ', '').replace(/iB$/, ''));
      expect(Math.abs(back - n) / n, formatBytes(n)).toBeLessThan(0.05);
    }
  });
});
