// How the HTTP source turns the engine's reads into fetches: a read is served from the prefetch
// buffer where readahead (readahead.ts) fetched ahead of it, and otherwise by a demand fetch; demand
// misses queued in the same turn of the event loop that touch are merged into one request. No HTTP
// here: the transport (http-transport.ts) runs the fetches.
//
// Every byte asked of the server (by demand or by readahead, in flight or done) is recorded in an
// interval set, and readahead fetches only the parts of its window that nobody asked for yet: the
// engine caches what it read, so fetching those bytes again would be waste. Overlapping streams (a
// directory's files read in hash order make several) then never fetch the same bytes twice, and a
// window that runs past a stream's data fetches no more than the window itself, not whole grid slots.
import type { ImageChangedError } from '../errors.js';
import type { HttpTransport, Task } from './http-transport.js';
import { IntervalSet } from './intervals.js';
import { Readahead } from './readahead.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** Largest prefetch GET: a longer part of a window is split into GETs of at most this. */
const MAX_PREFETCH = 1 * MiB;
/** Smallest readahead window: the first of a stream of small reads (a directory's files). */
const MIN_WINDOW = 128 * KiB;
/** Largest merged demand request. */
const MAX_REQUEST = 4 * MiB;

/** A prefetched range of the image, fetched by one GET. Pieces never overlap. */
interface Piece {
  readonly start: number;
  readonly end: number;
  readonly data: Buffer;
  /** Resolves true when fetched, false when the fetch failed (the reader then asks itself). */
  ready: Promise<boolean>;
  done: boolean;
  /** Bytes of data from its start that have arrived (the body streams in; readers need not wait for all of it). */
  received: number;
  /** Readers waiting for data[0, upTo) to arrive: resolved true then, false if the fetch fails first. */
  waiters: Array<{ upTo: number; resolve: (ok: boolean) => void }>;
  used: number;
  task: Task | undefined;
}

interface DemandWaiter {
  start: number;
  end: number;
  resolve: (data: Buffer) => void;
  reject: (err: unknown) => void;
}

export interface PrefetchOptions {
  /** Image size in bytes. */
  size: number;
  /** Largest readahead window per stream; 0 turns readahead off. */
  readaheadMax: number;
  /** Memory for prefetched data not yet read. */
  budget: number;
}

export class PrefetchBuffer {
  readonly stats = { demandRequests: 0, prefetchRequests: 0, readaheadHitBytes: 0, readaheadWastedBytes: 0 };

  readonly #transport: HttpTransport;
  readonly #readahead: Readahead | undefined;
  // Prefetched pieces sorted by start, and the same pieces oldest first (for eviction).
  #pieces: Piece[] = [];
  readonly #age = new Set<Piece>();
  // Bytes asked of the server, by demand or prefetch.
  readonly #asked = new IntervalSet();
  readonly #budget: number;
  #buffered = 0;
  // Demand misses waiting for this turn of the event loop to be merged.
  #pending: DemandWaiter[] = [];
  #flushScheduled = false;

  constructor(transport: HttpTransport, options: PrefetchOptions) {
    this.#transport = transport;
    this.#budget = options.budget;
    const max = options.readaheadMax;
    this.#readahead = max > 0 ? new Readahead({ size: options.size, minWindow: Math.min(max, MIN_WINDOW), firstWindow: MAX_PREFETCH, maxWindow: max }) : undefined;
  }

  /** Current global readahead cap in bytes (0 without readahead). */
  get cap(): number {
    return this.#readahead?.cap ?? 0;
  }

  /** Prefetched bytes held, read or not. */
  get buffered(): number {
    return this.#buffered;
  }

  /**
   * Fills buf with [start, start + buf.length) of the image: from prefetched pieces where they
   * exist, else by demand; first lets readahead see the read and start fetching ahead of it.
   */
  async read(buf: Uint8Array, start: number): Promise<void> {
    const ahead = this.#readahead?.onRead(start, buf.byteLength);
    if (ahead) this.#prefetch(ahead.start, ahead.end);
    await this.#serve(buf, start, start + buf.byteLength);
  }

  /** The image changed: nothing buffered may be served any more. */
  imageChanged(_err: ImageChangedError): void {
    this.#dropAll();
  }

  /** Fails every demand read still waiting to be merged with `err`, and drops the buffer. */
  close(err: Error): void {
    for (const w of this.#pending) w.reject(err);
    this.#pending = [];
    this.#dropAll();
  }

  // --- serving a read ------------------------------------------------------------------------

  /** Fills buf ([start, end) of the image) from prefetched pieces where they exist, else by demand. */
  async #serve(buf: Uint8Array, start: number, end: number): Promise<void> {
    const parts: Promise<void>[] = [];
    const miss = (from: number, to: number) => parts.push(this.#demand(from, to).then((data) => buf.set(data, from - start)));
    // The pieces are served after the walk: serving one whose bytes have all arrived may drop it
    // from the list at once, which would shift the walk's index.
    const hits: Array<[Piece, number, number]> = [];
    let pos = start;
    for (let i = this.#firstEndingAfter(start); pos < end; i++) {
      const piece = this.#pieces[i];
      if (!piece || piece.start >= end) {
        miss(pos, end);
        break;
      }
      if (piece.start > pos) miss(pos, piece.start);
      const stop = Math.min(end, piece.end);
      hits.push([piece, Math.max(pos, piece.start), stop]);
      pos = stop;
    }
    for (const [piece, from, to] of hits) parts.push(this.#fromPiece(piece, buf, start, from, to));
    await Promise.all(parts);
  }

  async #fromPiece(piece: Piece, buf: Uint8Array, bufStart: number, from: number, to: number): Promise<void> {
    if (piece.task) this.#transport.promote(piece.task);
    // Served as soon as its own bytes have arrived, not when the whole piece has: a sequential
    // reader follows the body of a 1 MiB GET instead of waiting for its end.
    const arrived = piece.received >= to - piece.start || (await this.#arrival(piece, to - piece.start));
    if (!arrived) {
      // The prefetch failed (it logs nothing: the demand read retries and reports).
      buf.set(await this.#demand(from, to), from - bufStart);
      return;
    }
    const changed = this.#transport.changed;
    if (changed) throw changed;
    buf.set(piece.data.subarray(from - piece.start, to - piece.start), from - bufStart);
    piece.used += to - from;
    this.stats.readaheadHitBytes += to - from;
    this.#readahead?.used(to - from);
    if (piece.used >= piece.end - piece.start) this.#dropPiece(piece, false);
  }

  /** Resolves true once piece.data[0, upTo) has arrived, false if the fetch fails before. */
  #arrival(piece: Piece, upTo: number): Promise<boolean> {
    if (piece.done) return Promise.resolve(true);
    // A piece still listed has not failed (failure drops it and wakes its waiters in one step), so
    // every waiter is woken by progress, by the end of the fetch, or by its failure.
    return new Promise((resolve) => piece.waiters.push({ upTo, resolve }));
  }

  #progress(piece: Piece, bytes: number): void {
    if (bytes <= piece.received) return;
    piece.received = bytes;
    if (piece.waiters.length === 0) return;
    const still: Piece['waiters'] = [];
    for (const w of piece.waiters) {
      if (w.upTo <= bytes) w.resolve(true);
      else still.push(w);
    }
    piece.waiters = still;
  }

  /** Queues a demand fetch of [start, end); misses queued in the same turn that touch are merged. */
  #demand(start: number, end: number): Promise<Buffer> {
    this.#asked.add(start, end);
    return new Promise((resolve, reject) => {
      this.#pending.push({ start, end, resolve, reject });
      if (!this.#flushScheduled) {
        this.#flushScheduled = true;
        setImmediate(() => this.#flushDemand());
      }
    });
  }

  #flushDemand(): void {
    this.#flushScheduled = false;
    const waiters = this.#pending.sort((a, b) => a.start - b.start || a.end - b.end);
    this.#pending = [];
    let group: DemandWaiter[] = [];
    let gStart = 0;
    let gEnd = 0;
    const issue = () => {
      if (group.length === 0) return;
      const members = group;
      const from = gStart;
      const to = gEnd;
      const data = Buffer.allocUnsafe(to - from);
      this.stats.demandRequests++;
      this.#transport
        .fetch(data, from, true)
        .then(() => {
          for (const w of members) w.resolve(data.subarray(w.start - from, w.end - from));
        })
        .catch((err: unknown) => {
          // Nothing of it arrived: readahead may ask for these bytes again.
          this.#asked.delete(from, to);
          for (const w of members) w.reject(err);
        });
      group = [];
    };
    for (const w of waiters) {
      if (group.length > 0 && w.start <= gEnd && Math.max(gEnd, w.end) - gStart <= MAX_REQUEST) {
        gEnd = Math.max(gEnd, w.end);
        group.push(w);
      } else {
        issue();
        group = [w];
        gStart = w.start;
        gEnd = w.end;
      }
    }
    issue();
  }

  // --- readahead -----------------------------------------------------------------------------

  /** Fetches the parts of [start, end) nobody has asked for, in GETs of at most MAX_PREFETCH. */
  #prefetch(start: number, end: number): void {
    for (const gap of this.#asked.gaps(start, end)) {
      const len = gap.end - gap.start;
      const n = Math.ceil(len / MAX_PREFETCH);
      for (let k = 0; k < n; k++) {
        const pStart = gap.start + Math.floor((len * k) / n);
        const pEnd = gap.start + Math.floor((len * (k + 1)) / n);
        // A piece still buffered is always asked for, unless the set forgot it (it holds at most
        // 65,536 ranges): pieces must never overlap.
        if ((this.#pieces[this.#firstEndingAfter(pStart)]?.start ?? Infinity) < pEnd) continue;
        if (!this.#makeRoom(pEnd - pStart)) return;
        this.#startPiece(pStart, pEnd);
      }
    }
  }

  #startPiece(start: number, end: number): void {
    const data = Buffer.allocUnsafe(end - start);
    const piece: Piece = { start, end, data, ready: Promise.resolve(false), done: false, received: 0, waiters: [], used: 0, task: undefined };
    this.stats.prefetchRequests++;
    piece.ready = this.#transport
      .fetch(
        data,
        start,
        false,
        (task) => (piece.task = task),
        (bytes) => this.#progress(piece, bytes),
      )
      .then(
        () => {
          piece.done = true;
          piece.task = undefined;
          this.#progress(piece, end - start);
          return true;
        },
        () => {
          piece.task = undefined;
          // Readers of bytes that had arrived were served; the others ask by demand.
          for (const w of piece.waiters) w.resolve(false);
          piece.waiters = [];
          this.#asked.delete(start, end);
          this.#dropPiece(piece, false);
          return false;
        },
      );
    this.#asked.add(start, end);
    this.#pieces.splice(this.#firstEndingAfter(start), 0, piece);
    this.#age.add(piece);
    this.#buffered += end - start;
  }

  /** Evicts finished pieces, oldest first, until `bytes` more fit in the budget. */
  #makeRoom(bytes: number): boolean {
    if (this.#buffered + bytes <= this.#budget) return true;
    for (const piece of this.#age) {
      if (!piece.done) continue;
      this.#dropPiece(piece, true);
      if (this.#buffered + bytes <= this.#budget) return true;
    }
    return false;
  }

  #dropPiece(piece: Piece, evicted: boolean): void {
    if (!this.#age.delete(piece)) return;
    const i = this.#firstEndingAfter(piece.start);
    if (this.#pieces[i] === piece) this.#pieces.splice(i, 1);
    this.#buffered -= piece.end - piece.start;
    const unused = piece.end - piece.start - piece.used;
    if (evicted && unused > 0) {
      this.stats.readaheadWastedBytes += unused;
      this.#readahead?.wasted(unused);
    }
  }

  #dropAll(): void {
    this.#pieces = [];
    this.#age.clear();
    this.#asked.clear();
    this.#buffered = 0;
  }

  /** Index of the first piece that ends after pos (binary search over the sorted pieces). */
  #firstEndingAfter(pos: number): number {
    let lo = 0;
    let hi = this.#pieces.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.#pieces[mid]!.end <= pos) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}
