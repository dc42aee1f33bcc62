// Sizes as people type and read them: 4096, 4K, 64KiB, 1M, 2G (powers of 1024).
import { InvalidArgumentError } from './errors.js';

const UNITS: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/**
 * Bytes from a size as typed: 4096, 4K, 1.5G, 1.8TiB (powers of 1024). A fraction of a unit is
 * rounded down to a whole byte, as lvcreate -L 1.8T rounds (newuser13: 1.8T was refused);
 * a fraction of a byte (1.5, 1.5B) is not. Throws InvalidArgumentError with `reason`
 * 'not-a-size', 'fraction' (of a byte) or 'too-large' (past 2^53 bytes).
 */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) throw new InvalidArgumentError(`not a size: ${JSON.stringify(text)} (try 4096, 64K, 1M)`, { reason: 'not-a-size' });
  const unit = UNITS[m[2]!.toLowerCase()]!;
  const number = Number(m[1]);
  if (unit === 1 && !Number.isInteger(number)) throw new InvalidArgumentError(`not a whole number of bytes: ${JSON.stringify(text)}`, { reason: 'fraction' });
  const value = Math.floor(number * unit);
  if (!Number.isSafeInteger(value)) throw new InvalidArgumentError(`too large: ${JSON.stringify(text)} is more bytes than any disk has`, { reason: 'too-large' });
  return value;
}

/**
 * A byte count as people read it: '1023 B', '1.5 KiB', '2 GiB', '256 MiB' (powers of 1024; one
 * decimal below 100 units, none from 100 on). A value prints the same however many bytes beyond
 * its rounding it has: 2 GiB and 2 GiB + 4 KiB are both '2 GiB', never '2.0 GiB' (a trailing .0
 * is dropped), and what rounds to 1024 of a unit is 1 of the next.
 */
export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  const shown = (v: number) => (v >= 99.95 ? v.toFixed(0) : v.toFixed(1).replace(/\.0$/, ''));
  let v = n / 1024;
  let i = 0;
  while (Number(shown(v)) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${shown(v)} ${units[i]}`;
}
