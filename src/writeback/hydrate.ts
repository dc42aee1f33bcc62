// Hydration: copies the whole source into the cache in the background, so that afterwards no read
// reaches the source (the disk can sleep through any read; an HTTP image works offline). It only
// fills missing blocks (engine.prefetch), so it resumes where it stopped after a restart: the
// present bits are the progress. Source-agnostic: any CacheEngine, any Source.
import type { CacheEngine } from '../cache/engine.js';

export interface HydratorOptions {
  /** Bytes per second at most; 0 or undefined: as fast as the source goes. */
  rate?: number;
  /**
   * Largest single fill. Default 8 MiB where the engine's source streams (Source.streamInto, a
   * local disk: a chunk is one sequential stream through one fill buffer in one request to the I/O
   * threads, engine.prefetch), else 1 MiB.
   */
  chunkBytes?: number;
  /**
   * Fills in flight: the source is read ahead while earlier chunks are written to the cache.
   * Default 2 where the source streams (while one chunk's request returns to the event loop and
   * the next is queued, the other keeps the disk reading), else 4.
   */
  depth?: number;
  /** Pause while a user request came in this recently (milliseconds). */
  quietMs?: number;
  /**
   * How a chunk is filled: bytes [offset, offset + length), missing blocks only. Default
   * engine.prefetch. A kernel frontend that writes the cache file itself fills through the
   * kernel instead (/dev/uloopN: CLAIM, fill, FILLED), so a block it holds newer is never
   * overwritten with the disk's old content.
   */
  fill?: (offset: number, length: number) => Promise<void>;
  /** Called with each failure; the hydrator retries the same chunk after `retryMs`. */
  onError?: (err: Error) => void;
  retryMs?: number;
}

export interface HydrationProgress {
  running: boolean;
  done: boolean;
  presentBytes: number;
  size: number;
  percent: number;
  /** Bytes this run has fetched. */
  fetchedBytes: number;
  rate: number | null;
  lastError: string | null;
}

/** Chunk and chunks in flight where the source streams (bench/README.md, session 7). */
const STREAM_CHUNK = 8 << 20;
const STREAM_DEPTH = 2;

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms).unref());

export class Hydrator {
  readonly #engine: CacheEngine;
  readonly #rate: number;
  readonly #chunk: number;
  readonly #depth: number;
  readonly #quietMs: number;
  readonly #retryMs: number;
  readonly #onError: ((err: Error) => void) | undefined;
  /** Fills one chunk (HydratorOptions.fill); settable until start(). */
  fill: (offset: number, length: number) => Promise<void>;
  #run: Promise<void> | null = null;
  #stop = false;
  #fetched = 0;
  #lastError: string | null = null;
  #done = false;

  constructor(engine: CacheEngine, options: HydratorOptions = {}) {
    this.#engine = engine;
    this.#rate = options.rate ?? 0;
    const streams = typeof engine.source.streamInto === 'function';
    this.#chunk = Math.max(engine.geometry.blockSize, options.chunkBytes ?? (streams ? STREAM_CHUNK : 1 << 20));
    this.#depth = Math.max(1, options.depth ?? (streams ? STREAM_DEPTH : 4));
    this.#quietMs = options.quietMs ?? 200;
    this.#retryMs = options.retryMs ?? 30_000;
    this.#onError = options.onError;
    this.fill = options.fill ?? ((offset, length) => engine.prefetch(offset, length));
  }

  /** Starts in the background; resolves `finished` when every block is present. */
  start(): Promise<void> {
    this.#stop = false;
    this.#run ??= this.#loop().finally(() => (this.#run = null));
    return this.#run;
  }

  /** Stops after the chunk in flight. */
  async stop(): Promise<void> {
    this.#stop = true;
    await this.#run?.catch(() => undefined);
  }

  /**
   * How far the cache covers the disk. `coveredBlocks`: blocks present or zeroed as the caller
   * counts them (the daemon's status passes the count its `cached` shows); by default the store's
   * committed counts.
   */
  progress(coveredBlocks?: number): HydrationProgress {
    const g = this.#engine.geometry;
    // Zeroed blocks (dirty, not present) need nothing from the disk either.
    const store = this.#engine.store;
    const presentBytes = Math.min((coveredBlocks ?? store.space().presentBlocks + store.zeroBlocks()) * g.blockSize, g.size);
    const done = this.#done || presentBytes === g.size;
    return {
      running: this.#run !== null,
      done,
      presentBytes,
      size: g.size,
      percent: done ? 100 : Math.floor((presentBytes / g.size) * 1000) / 10,
      fetchedBytes: this.#fetched,
      rate: this.#rate || null,
      lastError: this.#lastError,
    };
  }

  async #loop(): Promise<void> {
    const engine = this.#engine;
    const g = engine.geometry;
    const chunkBlocks = Math.max(1, Math.floor(this.#chunk / g.blockSize));
    const started = Date.now();
    let sent = 0;
    let cursor = 0;
    // Up to `depth` chunks in flight, issued in ascending order. A failed chunk stops issuing; once
    // the others have settled, the hydrator waits retryMs and resumes from the lowest gap (the
    // present bits are the progress, so nothing is fetched twice).
    const running = new Set<Promise<void>>();
    let failed: Error | null = null;
    while (!this.#stop) {
      while (running.size >= this.#depth && !failed) await Promise.race(running);
      if (failed) {
        await Promise.all(running);
        const err: Error = failed;
        failed = null;
        this.#lastError = err.message;
        this.#onError?.(err);
        if (engine.store.failed) throw err;
        await sleep(this.#retryMs);
        cursor = 0;
        continue;
      }
      const gap = nextMissing(engine, cursor);
      if (gap.done) {
        // Nothing left to issue: once the chunks in flight settle, done or retry a failed one.
        if (running.size === 0) break;
        await Promise.all(running);
        continue;
      }
      const start = gap.value.start;
      const count = Math.min(chunkBlocks, gap.value.count);
      // Yield to user I/O: the hydrator's reads queue behind the user's at the disk otherwise.
      while (!this.#stop && Date.now() - engine.lastRequestAt < this.#quietMs) await sleep(this.#quietMs);
      if (this.#stop) break;
      const bytes = g.extentBytes(start, count);
      cursor = start + count;
      const task: Promise<void> = this.fill(g.blockOffset(start), bytes)
        .then(
          () => {
            this.#lastError = null;
            this.#fetched += bytes;
          },
          (err: unknown) => {
            failed ??= err as Error;
          },
        )
        .finally(() => running.delete(task));
      running.add(task);
      sent += bytes;
      if (this.#rate > 0) {
        const ahead = (sent / this.#rate) * 1000 - (Date.now() - started);
        if (ahead > 0) await sleep(ahead);
      }
    }
    // Stopped: let the chunks in flight finish (a failure among them is for the next start).
    await Promise.all(running);
    if (!this.#stop) {
      // Make the last fills present (durable) now rather than at the next commit.
      await engine.flush();
      this.#done = !hasMissing(engine);
    }
  }
}

/** The first run of missing blocks (not present, not zeroed) at or after `from`. */
function nextMissing(engine: CacheEngine, from: number): IteratorResult<{ start: number; count: number }> {
  const { present, dirty } = engine.store;
  for (const gap of present.gaps(from)) {
    for (const missing of dirty.gaps(gap.start, gap.start + gap.count)) return { done: false, value: missing };
  }
  return { done: true, value: undefined };
}

function hasMissing(engine: CacheEngine): boolean {
  return !nextMissing(engine, 0).done;
}
