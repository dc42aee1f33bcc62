// Which units of the cache go when the budget is full: GCLOCK (CLOCK with a use count per unit,
// Smith 1978; Nicola, Dan and Dias 1992) over eviction units, with new units on probation.
//
// Why GCLOCK and not LRU, 2Q or ARC: on /dev/uloopN hits are served in the kernel, which only sets
// an "accessed" bit per unit that the daemon harvests now and then (ULOOP_IOC_ACCESSED). LRU, 2Q
// and ARC need every hit in order, in a list the hit moves; a bit per unit and a hand that
// harvests it is all CLOCK needs, and the same policy then runs on every frontend. The use count
// (0..MAX_COUNT) adds frequency to CLOCK's recency: a unit hit in several sweeps survives as many
// passes of the hand. Misses do not count as use: a unit filled once and never hit again (a scan,
// a backup reading the disk) still has count 0 and no accessed bit when the hand comes round, and
// goes first, as in 2Q's probation queue.
//
// Pure: the caller says which units hold data and which may go now (present, clean, not busy).
import type { ClockState } from './metadata.js';

/** Passes of the hand a unit hit in every sweep survives. */
export const MAX_COUNT = 3;

export class Clock {
  /** Blocks per unit. */
  readonly unitBlocks: number;
  readonly units: number;
  /** One bit per unit, set by noteAccess() (or from the kernel's ACCESSED bits), harvested by the hand. */
  readonly accessed: Buffer;
  /** Use count per unit, 0..MAX_COUNT. */
  readonly counts: Uint8Array;
  hand = 0;

  /** `unitBlocks` a power of two; `blockCount` blocks in all. */
  constructor(blockCount: number, unitBlocks: number) {
    this.unitBlocks = unitBlocks;
    this.units = Math.ceil(blockCount / unitBlocks);
    this.accessed = Buffer.alloc(Math.ceil(this.units / 8));
    this.counts = new Uint8Array(this.units);
  }

  /**
   * The hot path: blocks [first, end) were hit. A bit set per unit, no allocation. (Units number
   * below 2^31 for any disk up to 128 PiB with 64 KiB units, so the shifts below are exact.)
   */
  noteAccess(first: number, end: number): void {
    const last = Math.floor((end - 1) / this.unitBlocks);
    for (let u = Math.floor(first / this.unitBlocks); u <= last; u++) this.accessed[u >> 3]! |= 1 << (u & 7);
  }

  /** Merges accessed bits harvested elsewhere (the kernel's), one bit per unit, same order. */
  mergeAccessed(bits: Uint8Array, firstUnit = 0): void {
    if ((firstUnit & 7) === 0) {
      // Byte-aligned (the kernel's chunks are): whole bytes at a time, zero bytes skipped.
      const base = firstUnit >> 3;
      const bytes = Math.min(bits.byteLength, this.accessed.byteLength - base);
      for (let i = 0; i < bytes; i++) if (bits[i]) this.accessed[base + i]! |= bits[i]!;
      // Bits past the last unit in the last byte are the kernel's padding: never set there.
      const tail = this.units & 7;
      if (tail && base + bytes === this.accessed.byteLength) this.accessed[this.accessed.byteLength - 1]! &= (1 << tail) - 1;
      return;
    }
    for (let i = 0; i < bits.byteLength * 8 && firstUnit + i < this.units; i++) {
      if (bits[i >> 3]! & (1 << (i & 7))) {
        const u = firstUnit + i;
        this.accessed[u >> 3]! |= 1 << (u & 7);
      }
    }
  }

  /**
   * Moves the hand until it has chosen `want` units, or has gone round MAX_COUNT + 1 times (by
   * then every count has run down, so whatever was not chosen cannot go now). At each unit that
   * holds data: an accessed bit is harvested into the count; else a count above 0 drops by one;
   * else the unit is chosen if `evictable(u)` says it may go now. `nextWithData(u)` returns the
   * first unit at or after u that holds data (or `units`), so empty stretches cost nothing.
   * Returns the chosen units in the order chosen, each once.
   */
  pick(want: number, nextWithData: (u: number) => number, evictable: (u: number) => boolean): number[] {
    const chosen: number[] = [];
    if (want <= 0 || this.units === 0) return chosen;
    // A unit passed again on a later round is not chosen twice.
    const taken = new Set<number>();
    let wraps = 0;
    let u = this.hand;
    while (chosen.length < want) {
      u = nextWithData(u);
      if (u >= this.units) {
        if (++wraps > MAX_COUNT + 1) break;
        u = nextWithData(0);
        if (u >= this.units) break;
      }
      const bit = 1 << (u & 7);
      if (this.accessed[u >> 3]! & bit) {
        this.accessed[u >> 3]! &= ~bit;
        if (this.counts[u]! < MAX_COUNT) this.counts[u]!++;
      } else if (this.counts[u]! > 0) {
        this.counts[u]!--;
      } else if (!taken.has(u) && evictable(u)) {
        chosen.push(u);
        taken.add(u);
      }
      u++;
    }
    this.hand = u >= this.units ? 0 : u;
    return chosen;
  }

  /** A unit left the cache (evicted or zeroed): it starts again on probation when it comes back. */
  forget(u: number): void {
    this.counts[u] = 0;
    this.accessed[u >> 3]! &= ~(1 << (u & 7));
  }

  /** What the metadata keeps across a restart (accessed bits are folded into the counts). */
  state(unitBytes: number): ClockState {
    const counts = Buffer.from(this.counts);
    for (let u = 0; u < this.units; u++) if (this.accessed[u >> 3]! & (1 << (u & 7)) && counts[u]! < MAX_COUNT) counts[u]!++;
    return { unitBytes, hand: this.hand, counts };
  }

  /** Takes back a saved state if it is of this geometry; otherwise starts fresh. */
  restore(state: ClockState | null, unitBytes: number): boolean {
    if (!state || state.unitBytes !== unitBytes || state.counts.byteLength !== this.units) return false;
    for (let u = 0; u < this.units; u++) this.counts[u] = Math.min(MAX_COUNT, state.counts[u]!);
    this.hand = Number.isSafeInteger(state.hand) && state.hand >= 0 && state.hand < this.units ? state.hand : 0;
    return true;
  }
}
