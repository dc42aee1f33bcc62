// A disk image on an HTTP(S) server, read with Range requests. The cache engine calls readAt for
// each run of missing blocks; this source answers from a small readahead buffer when a sequential
// stream was predicted, and otherwise with range GETs (concurrent misses that touch are merged into
// one request) over a keep-alive pool of undici connections.
//
// Correctness before speed: every 206 must carry exactly the asked-for Content-Range of an image of
// the known size, and every request is conditional on the image's validator (If-Match on a strong
// ETag, If-Range on Last-Modified). An answer from another version of the image fails the read and
// every later one (ImageChangedError → EIO), so a cache never mixes two versions.
import { readFileSync } from 'node:fs';
import { Agent, type Dispatcher } from 'undici';
import type { Logger } from 'pino';
import { InvalidArgumentError } from '../errors.js';
import type { Source } from './source.js';
import { HttpError, ImageChangedError, NoRangeSupportError } from './http-errors.js';
import { backoffMs, checkPart, imageIdentity, isStrongEtag, parseContentRange, rangeHeader, redactUrl, type ImageValidators } from './http-range.js';
import { Readahead } from './readahead.js';

export interface HttpSourceOptions {
  /** Extra request headers (auth, cookies), lower-case names. */
  headers?: Record<string, string>;
  /** PEM file of CAs to trust instead of the system's. */
  caFile?: string;
  /** Connections to the server (requests in flight). Default 32. */
  connections?: number;
  /** Per-request timeout for headers and for each gap in the body, ms. Default 30 s. */
  timeoutMs?: number;
  /** Retries of a failed request (5xx, reset, timeout, truncated body). Default 6. */
  retries?: number;
  retryBaseMs?: number;
  retryCapMs?: number;
  /** Redirects followed per request. Default 5. */
  maxRedirects?: number;
  /** Largest readahead window per stream; 0 turns readahead off. Default 32 MiB. */
  readaheadMax?: number;
  /** Memory for prefetched data not yet read. Default 64 MiB. */
  readaheadBudget?: number;
  logger?: Pick<Logger, 'warn' | 'error' | 'info' | 'debug'>;
}

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

interface Task {
  run: () => Promise<void>;
  urgent: boolean;
}

interface DemandWaiter {
  start: number;
  end: number;
  resolve: (data: Buffer) => void;
  reject: (err: unknown) => void;
}

export interface HttpSourceStats {
  [key: string]: number | string | boolean;
}

export class HttpSource implements Source {
  readonly size: number;
  readonly id: string;
  readonly description: string;
  readonly url: string;
  readonly validators: Readonly<ImageValidators>;

  readonly #agent: Agent;
  readonly #headers: Record<string, string>;
  readonly #opts: Required<Pick<HttpSourceOptions, 'timeoutMs' | 'retries' | 'retryBaseMs' | 'retryCapMs' | 'maxRedirects' | 'connections'>>;
  readonly #logger: HttpSourceOptions['logger'];
  #target: URL;
  #changed: ImageChangedError | undefined;
  #closed = false;

  // Scheduling: `connections` slots; urgent (demand) tasks go before prefetches.
  #running = 0;
  readonly #urgent: Task[] = [];
  readonly #background: Task[] = [];

  // Readahead buffer, keyed by chunk index; oldest first in insertion order.
  readonly #readahead: Readahead | undefined;
  readonly #chunks = new Map<number, Chunk>();
  readonly #budget: number;
  #buffered = 0;

  // Demand misses waiting for this turn of the event loop to be merged.
  #pending: DemandWaiter[] = [];
  #flushScheduled = false;

  readonly #stats = {
    requests: 0,
    demandRequests: 0,
    prefetchRequests: 0,
    bytesFetched: 0,
    bytesRead: 0,
    readaheadHitBytes: 0,
    readaheadWastedBytes: 0,
    retries: 0,
    failedReads: 0,
  };

  private constructor(args: {
    url: string;
    target: URL;
    size: number;
    validators: ImageValidators;
    agent: Agent;
    headers: Record<string, string>;
    options: HttpSourceOptions;
  }) {
    const o = args.options;
    this.url = args.url;
    this.#target = args.target;
    this.size = args.size;
    this.validators = args.validators;
    this.id = imageIdentity(args.url, args.size, args.validators);
    this.description = redactUrl(args.url);
    this.#agent = args.agent;
    this.#headers = args.headers;
    this.#logger = o.logger;
    this.#opts = {
      timeoutMs: o.timeoutMs ?? 30_000,
      retries: o.retries ?? 6,
      retryBaseMs: o.retryBaseMs ?? 100,
      retryCapMs: o.retryCapMs ?? 5_000,
      maxRedirects: o.maxRedirects ?? 5,
      connections: o.connections ?? 32,
    };
    const max = o.readaheadMax ?? 32 * MiB;
    this.#budget = o.readaheadBudget ?? 64 * MiB;
    this.#readahead = max > 0 ? new Readahead({ size: args.size, minWindow: Math.min(max, CHUNK), maxWindow: max }) : undefined;
  }

  /**
   * Opens the image at `url`: one Range request for its first byte tells the size, the validator
   * (ETag or Last-Modified) and whether the server serves ranges at all.
   */
  static async open(url: string, options: HttpSourceOptions = {}): Promise<HttpSource> {
    let target: URL;
    try {
      target = new URL(url);
    } catch {
      throw new InvalidArgumentError(`${JSON.stringify(url)} is not a URL`);
    }
    if (target.protocol !== 'http:' && target.protocol !== 'https:') throw new InvalidArgumentError(`${redactUrl(url)}: only http:// and https:// URLs are supported`);
    const headers = { ...(options.headers ?? {}) };
    if ((target.username || target.password) && !headers.authorization) {
      headers.authorization = `Basic ${Buffer.from(`${decodeURIComponent(target.username)}:${decodeURIComponent(target.password)}`).toString('base64')}`;
    }
    target.username = '';
    target.password = '';
    const timeoutMs = options.timeoutMs ?? 30_000;
    const agent = new Agent({
      connections: options.connections ?? 32,
      pipelining: 1,
      keepAliveTimeout: 60_000,
      headersTimeout: timeoutMs,
      bodyTimeout: timeoutMs,
      connectTimeout: timeoutMs,
      connect: options.caFile ? { ca: readFileSync(options.caFile) } : undefined,
    });
    const probe = { target, size: 0, validators: {} as ImageValidators };
    const source = new HttpSource({ url, target, size: 1, validators: {}, agent, headers, options });
    try {
      await source.#withRetries('open', () => source.#probe(probe));
    } catch (err) {
      await agent.destroy().catch(() => undefined);
      throw err;
    }
    const real = new HttpSource({ url, target: probe.target, size: probe.size, validators: probe.validators, agent, headers, options });
    real.#stats.requests = source.#stats.requests;
    real.#stats.retries = source.#stats.retries;
    if (!probe.validators.etag && !probe.validators.lastModified) {
      options.logger?.warn(`${real.description} has neither ETag nor Last-Modified: a change of the image on the server can only be detected by its size`);
    }
    return real;
  }

  /** The image changed on the server since open (reads fail from then on). */
  get changed(): Error | undefined {
    return this.#changed;
  }

  stats(): HttpSourceStats {
    return {
      url: this.description,
      ...(this.validators.etag ? { etag: this.validators.etag } : {}),
      ...(this.validators.lastModified ? { lastModified: this.validators.lastModified } : {}),
      ...this.#stats,
      readaheadCapBytes: this.#readahead?.cap ?? 0,
      readaheadBufferedBytes: this.#buffered,
      inFlight: this.#running,
      imageChanged: this.#changed !== undefined,
    };
  }

  async readAt(buf: Uint8Array, position: number): Promise<void> {
    if (this.#closed) throw new HttpError(`${this.description}: the source is closed`);
    if (this.#changed) throw this.#changed;
    const end = position + buf.byteLength;
    if (!Number.isSafeInteger(position) || position < 0 || end > this.size) {
      throw new InvalidArgumentError(`read of ${buf.byteLength} bytes at ${position} is outside the image (${this.size} bytes)`);
    }
    if (buf.byteLength === 0) return;
    this.#stats.bytesRead += buf.byteLength;
    const ahead = this.#readahead?.onRead(position, buf.byteLength);
    if (ahead) this.#prefetch(ahead.start, ahead.end);
    try {
      await this.#serve(buf, position, end);
    } catch (err) {
      this.#stats.failedReads++;
      throw err;
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const w of this.#pending) w.reject(new HttpError(`${this.description}: the source is closed`));
    this.#pending = [];
    this.#urgent.length = 0;
    this.#background.length = 0;
    this.#chunks.clear();
    await this.#agent.destroy().catch(() => undefined);
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
    if (chunk.task) chunk.task.urgent = true;
    if (chunk.task && this.#background.includes(chunk.task)) {
      this.#background.splice(this.#background.indexOf(chunk.task), 1);
      this.#urgent.push(chunk.task);
    }
    if (!(await chunk.ready)) {
      // The prefetch failed (it logs nothing: the demand read retries and reports).
      buf.set(await this.#demand(from, to), from - bufStart);
      return;
    }
    if (this.#changed) throw this.#changed;
    buf.set(chunk.data.subarray(from - chunk.start, to - chunk.start), from - bufStart);
    chunk.used += to - from;
    this.#stats.readaheadHitBytes += to - from;
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
      this.#stats.demandRequests++;
      this.#schedule(true, () => this.#fetch(data, from))
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
      const cEnd = Math.min(this.size, cStart + CHUNK);
      if (!this.#makeRoom(cEnd - cStart)) return;
      const data = Buffer.allocUnsafe(cEnd - cStart);
      const chunk: Chunk = { index, start: cStart, end: cEnd, data, ready: Promise.resolve(false), done: false, used: 0, task: undefined };
      this.#stats.prefetchRequests++;
      chunk.ready = this.#schedule(false, () => this.#fetch(data, cStart), (task) => (chunk.task = task)).then(
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
      this.#stats.readaheadWastedBytes += unused;
      this.#readahead?.wasted(unused);
    }
  }

  // --- scheduling ----------------------------------------------------------------------------

  #schedule(urgent: boolean, fn: () => Promise<void>, onTask?: (task: Task) => void): Promise<void> {
    return new Promise((resolve, reject) => {
      const task: Task = {
        urgent,
        run: () => fn().then(resolve, reject),
      };
      onTask?.(task);
      (urgent ? this.#urgent : this.#background).push(task);
      this.#pump();
    });
  }

  #pump(): void {
    // Prefetches never take the last few slots: a demand read must not queue behind a window.
    const reserve = Math.min(2, this.#opts.connections - 1);
    while (this.#running < this.#opts.connections) {
      const task = this.#urgent.shift() ?? (this.#running < this.#opts.connections - reserve ? this.#background.shift() : undefined);
      if (!task) return;
      this.#running++;
      task.run().finally(() => {
        this.#running--;
        this.#pump();
      });
    }
  }

  // --- requests ------------------------------------------------------------------------------

  /** Fetches exactly [position, position + data.length) into data, with retries. */
  #fetch(data: Buffer, position: number): Promise<void> {
    return this.#withRetries(`read of ${data.length} bytes at ${position}`, () => this.#get(data, position));
  }

  async #withRetries(what: string, once: () => Promise<void>): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      if (this.#closed) throw new HttpError(`${this.description}: the source is closed`);
      if (this.#changed) throw this.#changed;
      try {
        await once();
        return;
      } catch (err) {
        if (err instanceof ImageChangedError) {
          this.#imageChanged(err);
          throw err;
        }
        const retryable = !(err instanceof NoRangeSupportError) && (!(err instanceof HttpError) || err.retryable);
        if (!retryable || attempt >= this.#opts.retries || this.#closed) {
          if (err instanceof HttpError || err instanceof NoRangeSupportError) throw err;
          throw new HttpError(`${this.description}: ${what} failed after ${attempt + 1} attempts: ${describe(err)}`, { cause: err });
        }
        this.#stats.retries++;
        this.#logger?.debug({ attempt, err: describe(err) }, `${what}: retrying`);
        await sleep(backoffMs(attempt, this.#opts.retryBaseMs, this.#opts.retryCapMs));
      }
    }
  }

  #imageChanged(err: ImageChangedError): void {
    if (this.#changed) return;
    this.#changed = err;
    this.#chunks.clear();
    this.#buffered = 0;
    this.#logger?.error(`${err.message}; every further read fails with EIO (re-attach with --revalidate to start over)`);
  }

  /** One GET with redirects followed; resolves to the final answer. */
  async #request(headers: Record<string, string>): Promise<Dispatcher.ResponseData & { url: URL }> {
    let url = this.#target;
    for (let hops = 0; ; hops++) {
      this.#stats.requests++;
      const res = await this.#agent.request({
        origin: url.origin,
        path: url.pathname + url.search,
        method: 'GET',
        headers: { ...this.#headers, ...headers },
      });
      if (res.statusCode >= 300 && res.statusCode < 400 && res.statusCode !== 304 && res.headers.location) {
        await res.body.dump().catch(() => undefined);
        if (hops >= this.#opts.maxRedirects) throw new HttpError(`${this.description}: more than ${this.#opts.maxRedirects} redirects`);
        const next = new URL(String(res.headers.location), url);
        if (next.protocol !== 'http:' && next.protocol !== 'https:') throw new HttpError(`${this.description}: redirect to ${redactUrl(next.href)} is not HTTP`);
        if (url.protocol === 'https:' && next.protocol === 'http:') throw new HttpError(`${this.description}: refusing a redirect from https to ${redactUrl(next.href)}`);
        if (next.origin !== url.origin) {
          // Credentials go only to the origin they were given for (as curl does).
          delete headers.authorization;
          delete headers.cookie;
        }
        url = next;
        // Permanent redirects stick, so later reads skip the hop.
        if (res.statusCode === 301 || res.statusCode === 308) this.#target = next;
        continue;
      }
      return Object.assign(res, { url });
    }
  }

  async #probe(out: { target: URL; size: number; validators: ImageValidators }): Promise<void> {
    const res = await this.#request({ range: 'bytes=0-0' });
    const where = this.description;
    if (res.statusCode === 200) {
      // Never download the image: drop the connection at once.
      discardBody(res.body);
      throw new NoRangeSupportError(`${where} answered 200 to a Range request: the server does not serve byte ranges, which ulohttp needs (it never downloads the whole image)`);
    }
    if (res.statusCode !== 206) {
      discardBody(res.body);
      throw new HttpError(`${where}: HTTP ${res.statusCode} ${statusText(res.statusCode)}`, { status: res.statusCode, retryable: isRetryableStatus(res.statusCode) });
    }
    const cr = parseContentRange(header(res.headers, 'content-range'));
    const body = await res.body.arrayBuffer();
    if (!cr || cr.start !== 0 || cr.end !== 0 || body.byteLength !== 1) {
      throw new NoRangeSupportError(`${where} answered a Range request with a bad part (Content-Range ${JSON.stringify(header(res.headers, 'content-range') ?? null)}, ${body.byteLength} bytes)`);
    }
    if (cr.size === undefined) throw new NoRangeSupportError(`${where} does not tell the image's size (Content-Range ends in /*): ulohttp needs a fixed size`);
    if (cr.size === 0) throw new InvalidArgumentError(`${where} is empty`);
    const etag = header(res.headers, 'etag');
    const lastModified = header(res.headers, 'last-modified');
    out.size = cr.size;
    out.target = this.#target;
    out.validators = { ...(etag ? { etag } : {}), ...(lastModified ? { lastModified } : {}) };
  }

  async #get(data: Buffer, position: number): Promise<void> {
    const end = position + data.length;
    const headers: Record<string, string> = { range: rangeHeader(position, end) };
    const { etag, lastModified } = this.validators;
    if (isStrongEtag(etag)) headers['if-match'] = etag;
    else if (lastModified) headers['if-range'] = lastModified;
    const res = await this.#request(headers);
    const where = `${this.description} (bytes ${position}-${end - 1})`;
    if (res.statusCode !== 206) {
      discardBody(res.body);
      if (res.statusCode === 412) throw new ImageChangedError(`${this.description} changed on the server: its ETag is no longer ${etag}`);
      if (res.statusCode === 200) {
        const lm = header(res.headers, 'last-modified');
        const et = header(res.headers, 'etag');
        if ((etag && et && et !== etag) || (lastModified && lm && lm !== lastModified)) {
          throw new ImageChangedError(`${this.description} changed on the server (${describeValidators({ etag: et, lastModified: lm })} instead of ${describeValidators(this.validators)})`);
        }
        throw new NoRangeSupportError(`${where}: the server answered 200 to a Range request; it no longer serves byte ranges`);
      }
      if (res.statusCode === 416) {
        const cr = header(res.headers, 'content-range');
        const m = /\/(\d+)\s*$/.exec(cr ?? '');
        if (m && Number(m[1]) !== this.size) throw new ImageChangedError(`${this.description} changed on the server: it is ${m[1]} bytes now, was ${this.size}`);
      }
      throw new HttpError(`${where}: HTTP ${res.statusCode} ${statusText(res.statusCode)}`, { status: res.statusCode, retryable: isRetryableStatus(res.statusCode) });
    }
    const bad = checkPart(header(res.headers, 'content-range'), position, end, this.size);
    if (bad) {
      discardBody(res.body);
      if (/the image is/.test(bad)) throw new ImageChangedError(`${this.description} changed on the server: ${bad}`);
      throw new HttpError(`${where}: ${bad}`, { retryable: true });
    }
    const et = header(res.headers, 'etag');
    const lm = header(res.headers, 'last-modified');
    if ((etag && et && et !== etag) || (!etag && lastModified && lm && lm !== lastModified)) {
      discardBody(res.body);
      throw new ImageChangedError(`${this.description} changed on the server (${describeValidators({ etag: et, lastModified: lm })} instead of ${describeValidators(this.validators)})`);
    }
    let off = 0;
    try {
      for await (const piece of res.body as AsyncIterable<Buffer>) {
        if (off + piece.length > data.length) throw new HttpError(`${where}: the server sent more bytes than asked for`, { retryable: true });
        piece.copy(data, off);
        off += piece.length;
      }
    } catch (err) {
      discardBody(res.body);
      throw err;
    } finally {
      this.#stats.bytesFetched += off;
    }
    if (off !== data.length) throw new HttpError(`${where}: the body ended after ${off} of ${data.length} bytes`, { retryable: true });
  }
}

/** Opens an HTTP(S) disk image as a Source (see HttpSource.open). */
export function openHttpSource(url: string, options: HttpSourceOptions = {}): Promise<HttpSource> {
  return HttpSource.open(url, options);
}

/** Drops an answer's body without reading it (and without an unhandled abort error). */
function discardBody(body: Dispatcher.ResponseData['body']): void {
  body.on('error', () => undefined);
  body.destroy();
}

function header(headers: Record<string, string | string[] | undefined>, name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function isRetryableStatus(status: number): boolean {
  return status >= 500 || status === 408 || status === 429;
}

function statusText(status: number): string {
  const texts: Record<number, string> = {
    401: 'Unauthorized (pass credentials with --header)',
    403: 'Forbidden',
    404: 'Not Found',
    416: 'Range Not Satisfiable',
    500: 'Internal Server Error',
    502: 'Bad Gateway',
    503: 'Service Unavailable',
    504: 'Gateway Timeout',
  };
  return texts[status] ?? '';
}

function describeValidators(v: ImageValidators): string {
  if (v.etag) return `ETag ${v.etag}`;
  if (v.lastModified) return `Last-Modified ${v.lastModified}`;
  return 'no validator';
}

function describe(err: unknown): string {
  const e = err as { code?: string; message?: string };
  const msg = e?.message ?? String(err);
  return e?.code && !msg.includes(e.code) ? `${msg} (${e.code})` : msg;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
