// A set of block numbers kept as sorted, disjoint runs that never touch (touching runs merge): the
// engine's large staged fills (a hydration stages 2,048 blocks per 8 MiB chunk), where a Map entry
// per block cost more than the copy (bench/README.md, session 7). Meant for a handful of runs:
// add() and delete() splice arrays (linear in the runs), has() is a binary search.
import type { Extent } from './layout.js';

export class BlockRuns {
  // Parallel arrays sorted by start; runs [start, end) never overlap or touch.
  #starts: number[] = [];
  #ends: number[] = [];
  #blocks = 0;

  /** Blocks in the set. */
  get blocks(): number {
    return this.#blocks;
  }

  /** Runs held. */
  get runs(): number {
    return this.#starts.length;
  }

  /** Index of the last run starting at or before `b`, or -1. */
  #at(b: number): number {
    let lo = 0;
    let hi = this.#starts.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (this.#starts[mid]! <= b) {
        found = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    return found;
  }

  has(b: number): boolean {
    if (this.#starts.length === 0) return false;
    const i = this.#at(b);
    return i >= 0 && b < this.#ends[i]!;
  }

  /**
   * Adds blocks [start, end), none of which may be in the set (RangeError otherwise: a block staged
   * twice is a bug in the caller); merges with a run it touches.
   */
  add(start: number, end: number): void {
    if (end <= start) return;
    const i = this.#at(start);
    const next = i + 1;
    if ((i >= 0 && this.#ends[i]! > start) || (next < this.#starts.length && this.#starts[next]! < end)) {
      throw new RangeError(`blocks [${start}, ${end}) overlap a run already in the set`);
    }
    this.#blocks += end - start;
    const joinsLeft = i >= 0 && this.#ends[i] === start;
    const joinsRight = next < this.#starts.length && this.#starts[next] === end;
    if (joinsLeft && joinsRight) {
      this.#ends[i] = this.#ends[next]!;
      this.#starts.splice(next, 1);
      this.#ends.splice(next, 1);
    } else if (joinsLeft) {
      this.#ends[i] = end;
    } else if (joinsRight) {
      this.#starts[next] = start;
    } else {
      this.#starts.splice(next, 0, start);
      this.#ends.splice(next, 0, end);
    }
  }

  /** Removes block `b`; false when it was not in the set. */
  delete(b: number): boolean {
    if (this.#starts.length === 0) return false;
    const i = this.#at(b);
    if (i < 0 || b >= this.#ends[i]!) return false;
    this.#blocks--;
    const start = this.#starts[i]!;
    const end = this.#ends[i]!;
    if (start === b && end === b + 1) {
      this.#starts.splice(i, 1);
      this.#ends.splice(i, 1);
    } else if (start === b) {
      this.#starts[i] = b + 1;
    } else if (end === b + 1) {
      this.#ends[i] = b;
    } else {
      this.#ends[i] = b;
      this.#starts.splice(i + 1, 0, b + 1);
      this.#ends.splice(i + 1, 0, end);
    }
    return true;
  }

  /** The runs in ascending order, as extents (a copy). */
  extents(): Extent[] {
    const out: Extent[] = [];
    for (let i = 0; i < this.#starts.length; i++) out.push({ start: this.#starts[i]!, count: this.#ends[i]! - this.#starts[i]! });
    return out;
  }

  clear(): void {
    this.#starts = [];
    this.#ends = [];
    this.#blocks = 0;
  }
}
