// Whether a miss's neighbours are worth filling (issue 12, bench/budget.js). While misses keep the
// disk busy the engine filled the aligned fill granule (64 KiB) around every miss, not just the
// blocks asked. That pays where reads are near each other (files read 4 KiB at a time) and costs
// the budget where hot blocks are scattered (fio's zipf: each 4 KiB miss brought 60 KiB of cold
// neighbours, which pushed hot blocks out).
//
// The rule: at each miss the granule's other blocks are watched, in a ring of the last RING
// watched blocks, whether they are filled or not. A watched block read (a hit if it was filled, a
// miss if not) while still in the ring counts as useful; one pushed out of the ring unread, as
// wasted. The granule is filled while at least USEFUL_SHARE of the watched blocks were useful
// (both counts halve past DECAY_AT, so old evidence fades); otherwise only the blocks asked are.
// Watching unfilled neighbours too means the evidence never stops: when reads turn local again,
// the next block's miss counts its neighbour useful and the granule comes back within a few misses.
//
// Measured by replaying bench/budget.js's own 60,000 zipf:1.1 requests (40,000 warm-up, 20,000
// measured) through the engine's clock over a 32 MiB budget on a 256 MiB disk, 256 KiB units (a
// trace model of the engine's fills and evictions; bench/README.md): hit ratio over the measured
// requests 0.685 with the granule always, 0.852 asking only, 0.849 with this rule; with 64 KiB
// files read whole 4 KiB at a time (zipf over files) 0.984, 0.757 and 0.984; zipf then files
// 0.979, 0.670 and 0.972 (bench/budget-model.js).
//
// Only reads the engine serves count: on /dev/uloopN and /dev/ublkbN hits are served in the
// kernel or the native server, which report an accessed bit per unit, not per block.

/** Watched blocks kept: one read later than RING watched blocks after it counts as none. */
export const RING = 512;
/** The share of useful watched blocks from which the granule is filled. */
export const USEFUL_SHARE = 1 / 8;
/** Useful plus wasted past this halves both. */
const DECAY_AT = 1024;

export class NeighbourFeedback {
  /** The last RING watched blocks (-1: an empty slot). */
  readonly #ring = new Float64Array(RING).fill(-1);
  #head = 0;
  /** Watched blocks not read yet: block -> the ring slot of its latest watch (older slots holding it count nothing). */
  readonly #pending = new Map<number, number>();
  #useful = 0;
  #wasted = 0;

  /**
   * Asked at a miss while the disk is busy: true to fill the granule around it, false to fill
   * only what was asked. True until there is evidence either way. No allocation.
   */
  wantGranule(): boolean {
    const seen = this.#useful + this.#wasted;
    return seen === 0 || this.#useful >= USEFUL_SHARE * seen;
  }

  /** Blocks [first, end) are neighbours of a miss (not asked by it), filled now or not. */
  watch(first: number, end: number): void {
    for (let b = first; b < end; b++) {
      const slot = this.#head;
      const old = this.#ring[slot]!;
      // Pushed out unread, if this slot holds its latest watch (a block read, or watched again
      // since, left this slot behind: review11 B-1).
      if (old >= 0 && this.#pending.get(old) === slot) {
        this.#pending.delete(old);
        this.#count(false);
      }
      this.#ring[slot] = b;
      this.#head = (slot + 1) % RING;
      this.#pending.set(b, slot);
    }
  }

  /**
   * Blocks [first, end) are read (a hit, or a miss before its neighbours are watched). The hit
   * path: nothing but a size check while no block is watched (always without a budget).
   */
  read(first: number, end: number): void {
    if (this.#pending.size === 0) return;
    if (end - first <= this.#pending.size) {
      for (let b = first; b < end; b++) if (this.#pending.delete(b)) this.#count(true);
    } else {
      for (const b of [...this.#pending.keys()]) if (b >= first && b < end && this.#pending.delete(b)) this.#count(true);
    }
    // A block read leaves its ring slots in place: when they come round they are not its latest watch and count nothing.
  }

  /** Useful and wasted watched blocks counted so far (after decay), for tests. */
  counts(): { useful: number; wasted: number } {
    return { useful: this.#useful, wasted: this.#wasted };
  }

  #count(useful: boolean): void {
    if (useful) this.#useful++;
    else this.#wasted++;
    if (this.#useful + this.#wasted > DECAY_AT) {
      this.#useful /= 2;
      this.#wasted /= 2;
    }
  }
}
