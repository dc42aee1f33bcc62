// How the HTTP source turns the engine's reads into fetches: a read is served from the prefetch
// buffer where readahead (readahead.ts) fetched ahead of it, and otherwise by a demand fetch; demand
// misses queued in the same turn of the event loop that touch are merged into one request. No HTTP
// here: the transport (http-transport.ts) runs the fetches.
import type { ImageChangedError } from '../errors.js';
import type { HttpTransport, Task } from './http-transport.js';
import { Readahead } from './readahead.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** Prefetch grid: readahead fetches aligned pieces of this size. */
const CHUNK = 1 * MiB;
/** Largest merged demand request. */
const MAX_REQUEST = 4 * MiB;

interface Chunk {
  readonly index: number;
  readonly start: number;
  readonly end: number;
  readonly data: Buffer;
  /** Resolves true when fetched, false when the fetch failed (the reader then asks itself). */
  ready: Promise<boolean>;
  done: boolean;
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
  readonly #size: number;
  // Readahead buffer, keyed by chunk index; oldest first in insertion order.
  readonly #readahead: Readahead | undefined;
  readonly #chunks = new Map<number, Chunk>();
  readonly #budget: number;
  #buffered = 0;
  // Demand misses waiting for this turn of the event loop to be merged.
  #pending: DemandWaiter[] = [];
  #flushScheduled = false;

  constructor(transport: HttpTransport, options: PrefetchOptions) {
    this.#transport = transport;
    this.#size = options.size;
    this.#budget = options.budget;
    const max = options.readaheadMax;
    this.#readahead = max > 0 ? new Readahead({ size: options.size, minWindow: Math.min(max, CHUNK), maxWindow: max }) : undefined;
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
   * Fills buf with [start, start + buf.length) of the image: from prefetched chunks where they
   * exist, else by demand; first lets readahead see the read and start fetching ahead of it.
   */
  async read(buf: Uint8Array, start: number): Promise<void> {
    const ahead = this.#readahead?.onRead(start, buf.byteLength);
    if (ahead) this.#prefetch(ahead.start, ahead.end);
    await this.#serve(buf, start, start + buf.byteLength);
  }

  /** The image changed: nothing buffered may be served any more. */
  imageChanged(_err: ImageChangedError): void {
    this.#chunks.clear();
    this.#buffered = 0;
  }

  /** Fails every demand read still waiting to be merged with `err`, and drops the buffer. */
  close(err: Error): void {
    for (const w of this.#pending) w.reject(err);
    this.#pending = [];
    this.#chunks.clear();
  }

  // --- serving a read ------------------------------------------------------------------------

  /** Fills buf ([start, end) of the image) from prefetched chunks where they exist, else by demand. */
  async #serve(buf: Uint8Array, start: number, end: number): Promise<void> {
    const parts: Promise<void>[] = [];
    let missFrom = -1;
    const miss = (from: number, to: number) => parts.push(this.#demand(from, to).then((data) => buf.set(data, from - start)));
    for (let pos = start; pos < end; ) {
      const index = Math.floor(pos / CHUNK);
      const stop = Math.min(end, (index + 1) * CHUNK);
      const chunk = this.#chunks.get(index);
      if (chunk) {
        if (missFrom >= 0) miss(missFrom, pos);
        missFrom = -1;
        parts.push(this.#fromChunk(chunk, buf, start, pos, stop));
      } else if (missFrom < 0) {
        missFrom = pos;
      }
      pos = stop;
    }
    if (missFrom >= 0) miss(missFrom, end);
    await Promise.all(parts);
  }

  async #fromChunk(chunk: Chunk, buf: Uint8Array, bufStart: number, from: number, to: number): Promise<void> {
    if (chunk.task) this.#transport.promote(chunk.task);
    if (!(await chunk.ready)) {
      // The prefetch failed (it logs nothing: the demand read retries and reports).
      buf.set(await this.#demand(from, to), from - bufStart);
      return;
    }
    const changed = this.#transport.changed;
    if (changed) throw changed;
    buf.set(chunk.data.subarray(from - chunk.start, to - chunk.start), from - bufStart);
    chunk.used += to - from;
    this.stats.readaheadHitBytes += to - from;
    this.#readahead?.used(to - from);
    if (chunk.used >= chunk.end - chunk.start) this.#dropChunk(chunk, false);
  }

  /** Queues a demand fetch of [start, end); misses queued in the same turn that touch are merged. */
  #demand(start: number, end: number): Promise<Buffer> {
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
      const data = Buffer.allocUnsafe(gEnd - gStart);
      this.stats.demandRequests++;
      this.#transport
        .fetch(data, from, true)
        .then(() => {
          for (const w of members) w.resolve(data.subarray(w.start - from, w.end - from));
        })
        .catch((err: unknown) => {
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

  #prefetch(start: number, end: number): void {
    for (let index = Math.floor(start / CHUNK); index * CHUNK < end; index++) {
      if (this.#chunks.has(index)) continue;
      const cStart = index * CHUNK;
      const cEnd = Math.min(this.#size, cStart + CHUNK);
      if (!this.#makeRoom(cEnd - cStart)) return;
      const data = Buffer.allocUnsafe(cEnd - cStart);
      const chunk: Chunk = { index, start: cStart, end: cEnd, data, ready: Promise.resolve(false), done: false, used: 0, task: undefined };
      this.stats.prefetchRequests++;
      chunk.ready = this.#transport.fetch(data, cStart, false, (task) => (chunk.task = task)).then(
        () => {
          chunk.done = true;
          chunk.task = undefined;
          return true;
        },
        () => {
          chunk.task = undefined;
          this.#dropChunk(chunk, false);
          return false;
        },
      );
      this.#chunks.set(index, chunk);
      this.#buffered += cEnd - cStart;
    }
  }

  /** Evicts finished chunks, oldest first, until `bytes` more fit in the budget. */
  #makeRoom(bytes: number): boolean {
    if (this.#buffered + bytes <= this.#budget) return true;
    for (const chunk of this.#chunks.values()) {
      if (!chunk.done) continue;
      this.#dropChunk(chunk, true);
      if (this.#buffered + bytes <= this.#budget) return true;
    }
    return false;
  }

  #dropChunk(chunk: Chunk, evicted: boolean): void {
    if (this.#chunks.get(chunk.index) !== chunk) return;
    this.#chunks.delete(chunk.index);
    this.#buffered -= chunk.end - chunk.start;
    const unused = chunk.end - chunk.start - chunk.used;
    if (evicted && unused > 0) {
      this.stats.readaheadWastedBytes += unused;
      this.#readahead?.wasted(unused);
    }
  }
}
