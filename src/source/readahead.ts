// Adaptive readahead for a remote source: which bytes past a read are worth fetching now.
// Pure (no I/O, no timers): the HTTP source feeds it every read and tells it when prefetched bytes
// were used or thrown away, and fetches what it asks for.
//
// Reads are grouped into streams by position: a read that starts near where a stream ended (a
// little behind, because parallel requests arrive out of order, or a little ahead, because the
// engine skips blocks it already has) continues that stream. On its third read a stream gets a
// first window fetched ahead: four times its last read, at least `minWindow`, at most
// `firstWindow` (the kernel's get_init_ra_size does the same: small reads start small). Each time
// the reader gets within half a window of the end of what was fetched ahead, the window doubles (up
// to `cap`, and to no more than half the bytes the stream has read so far, or twice them for a
// stream of reads of 64 KiB and more) and the next part is
// asked for, as the kernel's async readahead does. So the window grows only as fast as prefetched
// data is consumed, and a stream that stops has fetched at most one window it did not read.
//
// "Read so far" counts the bytes of the stream's reads, not the distance it covered: the files of
// one directory read in hash order make a stream whose front jumps to the directory's end after a
// few reads, and a window sized by that distance would fetch far past the directory's data (bench/
// README.md, "Why small files fetch about twice what they read"). `cap` is global
// feedback: it halves when prefetched bytes are evicted unused (random access, a scan that jumped)
// and grows back as prefetched bytes get used, so wasted transfer stays a small multiple of what was
// read, and memory stays bounded by the caller's buffer budget.

/** A stream whose reads average this many bytes or more is a file being read through. */
export const LARGE_READ = 64 * 1024;
/** Largest window of a stream of large reads, as a share of the bytes it has read. */
const LARGE_SHARE = 2;
/** Largest window of a stream of small reads, as a share of the bytes it has read. */
const SMALL_SHARE = 0.5;

export interface ReadaheadOptions {
  /** Size of the image: nothing past it is asked for. */
  size: number;
  /** Smallest window: the first one of a stream of small reads, and the floor of `cap`. */
  minWindow: number;
  /** Largest first window (a stream of large reads). Default min(1 MiB, maxWindow), at least minWindow. */
  firstWindow?: number;
  /** Largest window (and the starting cap). */
  maxWindow: number;
  /** Streams tracked at once (parallel sequential readers). */
  streams?: number;
  /** A read this far past a stream's end still continues it, when the window is smaller. */
  skipTolerance?: number;
}

export interface Range {
  start: number;
  /** Exclusive. */
  end: number;
}

interface Stream {
  /** End of the furthest read of the stream. */
  front: number;
  /** Start of its first read, for the backward tolerance. */
  origin: number;
  reads: number;
  /** Bytes its reads asked for (less than front - origin when it skips or reads out of order). */
  bytes: number;
  window: number;
  /** End of what was asked for ahead of this stream (0: nothing yet). */
  ahead: number;
  tick: number;
}

export class Readahead {
  readonly #size: number;
  readonly #min: number;
  readonly #first: number;
  readonly #max: number;
  readonly #maxStreams: number;
  readonly #skip: number;
  readonly #streams: Stream[] = [];
  #cap: number;
  #tick = 0;

  constructor(options: ReadaheadOptions) {
    if (!(options.minWindow > 0) || options.maxWindow < options.minWindow) throw new RangeError('readahead needs 0 < minWindow <= maxWindow');
    this.#size = options.size;
    this.#min = options.minWindow;
    this.#max = options.maxWindow;
    this.#first = Math.min(this.#max, Math.max(this.#min, options.firstWindow ?? 1024 * 1024));
    this.#cap = options.maxWindow;
    this.#maxStreams = options.streams ?? 16;
    this.#skip = options.skipTolerance ?? 256 * 1024;
  }

  /** Current cap on any stream's window. */
  get cap(): number {
    return this.#cap;
  }

  /** Windows of the tracked streams, most recent first (for stats and tests). */
  windows(): number[] {
    return [...this.#streams].sort((a, b) => b.tick - a.tick).map((s) => s.window);
  }

  /**
   * Records a read of [pos, pos+len) and returns the range to have fetched ahead of it, or
   * undefined when the read looks random. The range may overlap bytes already fetched or in flight;
   * the caller skips those.
   */
  onRead(pos: number, len: number): Range | undefined {
    const end = pos + len;
    this.#tick++;
    const s = this.#match(pos, end);
    if (!s) {
      this.#add({ front: end, origin: pos, reads: 1, bytes: len, window: 0, ahead: 0, tick: this.#tick });
      return undefined;
    }
    s.tick = this.#tick;
    s.reads++;
    s.bytes += len;
    s.front = Math.max(s.front, end);
    // Two reads in a row can be chance (random reads 4 KiB apart); three make a stream.
    if (s.reads < 3) return undefined;
    if (s.ahead > 0 && s.front + s.window / 2 < s.ahead) return undefined;
    // Never more ahead than a share of what the stream has read so far: a stream of small reads
    // (a directory's files) at most half of it, so a stream that stops wastes at most half as much
    // as it used; a stream of large reads (a file read through, reads of LARGE_READ and more on
    // average) twice it, so the window reaches a round trip's worth of data soon enough (8 MB at
    // 200 MB/s and 40 ms) instead of after most of a 256 MiB file (bench/README.md, session 12).
    const first = Math.min(this.#first, Math.max(this.#min, 4 * len));
    const share = s.bytes >= LARGE_READ * s.reads ? LARGE_SHARE : SMALL_SHARE;
    s.window = Math.min(this.#cap, Math.max(first, s.bytes * share), s.window === 0 ? first : s.window * 2);
    const start = Math.max(s.front, s.ahead);
    const stop = Math.min(this.#size, s.front + s.window);
    if (stop <= start) return undefined;
    s.ahead = stop;
    return { start, end: stop };
  }

  /** Prefetched bytes were evicted without being read: the access pattern is less sequential. */
  wasted(bytes: number): void {
    if (bytes <= 0) return;
    this.#cap = Math.max(this.#min, Math.floor(this.#cap / 2));
    for (const s of this.#streams) s.window = Math.min(s.window, this.#cap);
  }

  /** Prefetched bytes were read: let the cap grow back. */
  used(bytes: number): void {
    if (bytes <= 0) return;
    this.#cap = Math.min(this.#max, this.#cap + bytes);
  }

  #match(pos: number, end: number): Stream | undefined {
    let best: Stream | undefined;
    for (const s of this.#streams) {
      // Forward skips stay small: a large jump is a new stream, not a reason to fetch around it.
      const ahead = Math.max(this.#skip, 2 * (end - pos));
      const behind = Math.max(this.#skip, s.window);
      // Continues the stream: starts no further than `ahead` past its front, and not entirely
      // behind the part of it already read (a re-read of old data is not progress).
      if (pos <= s.front + ahead && pos >= Math.max(s.origin, s.front - behind) && end > s.front - behind) {
        if (!best || s.tick > best.tick) best = s;
      }
    }
    return best;
  }

  #add(s: Stream): void {
    if (this.#streams.length >= this.#maxStreams) {
      let oldest = 0;
      for (let i = 1; i < this.#streams.length; i++) if (this.#streams[i]!.tick < this.#streams[oldest]!.tick) oldest = i;
      this.#streams.splice(oldest, 1);
    }
    this.#streams.push(s);
  }
}
