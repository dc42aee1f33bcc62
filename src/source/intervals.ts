// A set of byte ranges of an image, kept as sorted, disjoint, non-touching [start, end) ranges.
// Pure (no I/O): the HTTP prefetch buffer records in it every byte it has asked the server for,
// so readahead fetches only what no demand read and no other stream has asked for already.
//
// Memory is bounded: past `maxRanges` ranges the least recently touched half is forgotten. For the
// prefetch buffer forgetting is safe (a forgotten range may be fetched again: waste, never wrong
// data), and it keeps a long run of scattered random reads from growing the set without end.

/** A byte range [start, end). */
export interface Interval {
  start: number;
  /** Exclusive. */
  end: number;
}

export interface IntervalSetOptions {
  /** Ranges kept before the least recently touched half is forgotten. Default 65,536. */
  maxRanges?: number;
}

export class IntervalSet {
  // Parallel arrays, sorted by start; ranges never overlap or touch (touching ranges are merged).
  #starts: number[] = [];
  #ends: number[] = [];
  // When each range was last added to (for forgetting the least recently touched).
  #touched: number[] = [];
  #tick = 0;
  #bytes = 0;
  readonly #max: number;

  constructor(options: IntervalSetOptions = {}) {
    const max = options.maxRanges ?? 65_536;
    if (!Number.isInteger(max) || max < 2) throw new RangeError('IntervalSet needs maxRanges >= 2');
    this.#max = max;
  }

  /** Ranges held. */
  get count(): number {
    return this.#starts.length;
  }

  /** Bytes covered. */
  get bytes(): number {
    return this.#bytes;
  }

  /** The ranges, in order (a copy). */
  ranges(): Interval[] {
    return this.#starts.map((start, i) => ({ start, end: this.#ends[i]! }));
  }

  /** Adds [start, end), merging with every range it overlaps or touches. An empty range is a no-op. */
  add(start: number, end: number): void {
    if (end <= start) return;
    // First range that ends at or after start (it touches or overlaps, or lies past).
    const i = this.#firstEndingAtOrAfter(start);
    let j = i;
    let s = start;
    let e = end;
    let covered = 0;
    while (j < this.#starts.length && this.#starts[j]! <= end) {
      s = Math.min(s, this.#starts[j]!);
      e = Math.max(e, this.#ends[j]!);
      covered += this.#ends[j]! - this.#starts[j]!;
      j++;
    }
    this.#starts.splice(i, j - i, s);
    this.#ends.splice(i, j - i, e);
    this.#touched.splice(i, j - i, ++this.#tick);
    this.#bytes += e - s - covered;
    if (this.#starts.length > this.#max) this.#forget();
  }

  /** Removes [start, end) from the set, splitting a range that covers it. */
  delete(start: number, end: number): void {
    if (end <= start) return;
    const i = this.#firstEndingAfter(start);
    let j = i;
    const keepStarts: number[] = [];
    const keepEnds: number[] = [];
    const keepTouched: number[] = [];
    let removed = 0;
    while (j < this.#starts.length && this.#starts[j]! < end) {
      const s = this.#starts[j]!;
      const e = this.#ends[j]!;
      const t = this.#touched[j]!;
      if (s < start) keepStarts.push(s), keepEnds.push(start), keepTouched.push(t);
      if (e > end) keepStarts.push(end), keepEnds.push(e), keepTouched.push(t);
      removed += Math.min(e, end) - Math.max(s, start);
      j++;
    }
    if (j === i) return;
    this.#starts.splice(i, j - i, ...keepStarts);
    this.#ends.splice(i, j - i, ...keepEnds);
    this.#touched.splice(i, j - i, ...keepTouched);
    this.#bytes -= removed;
    // Splitting a range adds one.
    if (this.#starts.length > this.#max) this.#forget();
  }

  /** True when every byte of [start, end) is in the set (an empty range is covered). */
  covers(start: number, end: number): boolean {
    if (end <= start) return true;
    const i = this.#firstEndingAfter(start);
    return i < this.#starts.length && this.#starts[i]! <= start && this.#ends[i]! >= end;
  }

  /** The parts of [start, end) that are not in the set, in order. */
  gaps(start: number, end: number): Interval[] {
    const out: Interval[] = [];
    let pos = start;
    for (let i = this.#firstEndingAfter(start); i < this.#starts.length && pos < end; i++) {
      const s = this.#starts[i]!;
      if (s >= end) break;
      if (s > pos) out.push({ start: pos, end: s });
      pos = Math.max(pos, this.#ends[i]!);
    }
    if (pos < end) out.push({ start: pos, end });
    return out;
  }

  clear(): void {
    this.#starts = [];
    this.#ends = [];
    this.#touched = [];
    this.#bytes = 0;
  }

  /** Index of the first range with end >= pos (binary search). */
  #firstEndingAtOrAfter(pos: number): number {
    return this.#search(pos, false);
  }

  /** Index of the first range with end > pos (binary search). */
  #firstEndingAfter(pos: number): number {
    return this.#search(pos, true);
  }

  #search(pos: number, strict: boolean): number {
    let lo = 0;
    let hi = this.#ends.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const e = this.#ends[mid]!;
      if (e < pos || (strict && e === pos)) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Forgets the least recently touched half of the ranges (by rank: split ranges share a tick). */
  #forget(): void {
    const n = this.#starts.length;
    const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => this.#touched[a]! - this.#touched[b]! || a - b);
    const drop = new Uint8Array(n);
    for (let k = 0; k < (n + 1) >>> 1; k++) drop[order[k]!] = 1;
    const starts: number[] = [];
    const ends: number[] = [];
    const touched: number[] = [];
    let bytes = 0;
    for (let i = 0; i < n; i++) {
      if (drop[i]) continue;
      starts.push(this.#starts[i]!);
      ends.push(this.#ends[i]!);
      touched.push(this.#touched[i]!);
      bytes += this.#ends[i]! - this.#starts[i]!;
    }
    this.#starts = starts;
    this.#ends = ends;
    this.#touched = touched;
    this.#bytes = bytes;
  }
}
