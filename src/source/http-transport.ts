// The HTTP side of the HTTP source: range GETs of one image over a keep-alive pool of undici
// connections, each conditional on the image's validator, with redirects followed by hand, retries
// with jittered backoff, and a two-level queue in front of the connections (demand reads before
// prefetches; prefetches never take the last two slots).
//
// Correctness before speed: every 206 must carry exactly the asked-for Content-Range of an image of
// the known size, and every request is conditional on the image's validator (If-Match on a strong
// ETag, If-Range on Last-Modified). An answer from another version of the image fails the read and
// every later one (ImageChangedError → EIO), so a cache never mixes two versions.
import { readFileSync } from 'node:fs';
import { Agent, type Dispatcher } from 'undici';
import type { Logger } from 'pino';
import { HttpError, ImageChangedError, InvalidArgumentError, NoRangeSupportError } from '../errors.js';
import { backoffMs, checkPart, credentialsHeader, isStrongEtag, parseContentRange, rangeHeader, redactUrl, type ImageValidators } from './http-range.js';

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
  /**
   * Bytes a read miss in the cache fills around what was asked, aligned (Source.missGranule):
   * a random 4 KiB miss costs one round trip either way, and its neighbours then hit. Default
   * 16 KiB (a random reader's fetch/read stays at most 4); 0 fetches exactly what is asked.
   */
  missGranule?: number;
  logger?: Pick<Logger, 'warn' | 'error' | 'info' | 'debug'>;
}

/** A queued fetch. A prefetch's task turns urgent when a reader comes to wait for it. */
export interface Task {
  run: () => Promise<void>;
  urgent: boolean;
}

export class HttpTransport {
  /** The URL without credentials, for messages. */
  readonly description: string;
  /** Known after probe(). */
  size = 0;
  validators: Readonly<ImageValidators> = {};
  readonly stats = { requests: 0, retries: 0, bytesFetched: 0 };

  readonly #agent: Agent;
  /** The user's headers (credentials included): sent to `#origin` only. */
  readonly #headers: Record<string, string>;
  /** The origin of the URL the user gave: the only one trusted with the user's headers. */
  readonly #origin: string;
  readonly #opts: Required<Pick<HttpSourceOptions, 'timeoutMs' | 'retries' | 'retryBaseMs' | 'retryCapMs' | 'maxRedirects' | 'connections'>>;
  readonly #logger: HttpSourceOptions['logger'];
  readonly #onChanged: (err: ImageChangedError) => void;
  #target: URL;
  #changed: ImageChangedError | undefined;
  #closed = false;

  // Scheduling: `connections` slots; urgent (demand) tasks go before prefetches.
  #running = 0;
  readonly #urgent: Task[] = [];
  readonly #background: Task[] = [];

  /**
   * Checks the URL and sets up the connection pool; nothing is sent before probe(). `onChanged`
   * hears once that the image changed on the server. InvalidArgumentError for a URL that is not
   * http(s).
   */
  constructor(url: string, options: HttpSourceOptions, onChanged: (err: ImageChangedError) => void) {
    let target: URL;
    try {
      target = new URL(url);
    } catch {
      throw new InvalidArgumentError(`${JSON.stringify(url)} is not a URL`);
    }
    if (target.protocol !== 'http:' && target.protocol !== 'https:') throw new InvalidArgumentError(`${redactUrl(url)}: only http:// and https:// URLs are supported`);
    // user:password in the URL is Basic authentication, unless an Authorization header is given.
    const headers = { ...credentialsHeader(url), ...(options.headers ?? {}) };
    target.username = '';
    target.password = '';
    this.description = redactUrl(url);
    this.#target = target;
    this.#origin = target.origin;
    this.#headers = headers;
    this.#logger = options.logger;
    this.#onChanged = onChanged;
    this.#opts = {
      timeoutMs: options.timeoutMs ?? 30_000,
      retries: options.retries ?? 6,
      retryBaseMs: options.retryBaseMs ?? 100,
      retryCapMs: options.retryCapMs ?? 5_000,
      maxRedirects: options.maxRedirects ?? 5,
      connections: options.connections ?? 32,
    };
    const timeoutMs = this.#opts.timeoutMs;
    this.#agent = new Agent({
      connections: this.#opts.connections,
      pipelining: 1,
      keepAliveTimeout: 60_000,
      headersTimeout: timeoutMs,
      bodyTimeout: timeoutMs,
      connectTimeout: timeoutMs,
      connect: options.caFile ? { ca: readFileSync(options.caFile) } : undefined,
    });
  }

  /** The image changed on the server (every fetch fails from then on). */
  get changed(): ImageChangedError | undefined {
    return this.#changed;
  }

  /** Requests running now. */
  get inFlight(): number {
    return this.#running;
  }

  /**
   * One Range request for the first byte: the size, the validator (ETag or Last-Modified) and
   * whether the server serves ranges at all. NoRangeSupportError, HttpError after the retries.
   */
  probe(): Promise<void> {
    return this.#withRetries('open', () => this.#probe());
  }

  /**
   * Fetches exactly [position, position + data.length) of the image into data, with retries,
   * in a connection slot: urgent (demand) fetches go first. `onTask` receives the queued task, so
   * a prefetch can be promoted once someone waits for it. `onProgress(bytes)` hears, as the body
   * arrives, that data[0, bytes) holds the image's bytes (validated answer of this image's
   * version; a retry rewrites the same bytes, so a caller keeps the highest count it heard).
   */
  fetch(data: Buffer, position: number, urgent: boolean, onTask?: (task: Task) => void, onProgress?: (bytes: number) => void): Promise<void> {
    return this.#schedule(urgent, () => this.#withRetries(`read of ${data.length} bytes at ${position}`, () => this.#get(data, position, onProgress)), onTask);
  }

  /** A queued prefetch that a reader now waits for goes ahead of the other prefetches. */
  promote(task: Task): void {
    task.urgent = true;
    const at = this.#background.indexOf(task);
    if (at < 0) return;
    this.#background.splice(at, 1);
    this.#urgent.push(task);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#urgent.length = 0;
    this.#background.length = 0;
    await this.#agent.destroy().catch(() => undefined);
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
        // A TLS failure that another attempt cannot mend: said at once, in words, not OpenSSL's.
        const tls = tlsProblem(err, this.#target);
        if (tls) throw new HttpError(`${this.description}: ${tls}`, { cause: err });
        const retryable = !(err instanceof NoRangeSupportError) && (!(err instanceof HttpError) || err.retryable);
        if (!retryable || attempt >= this.#opts.retries || this.#closed) {
          if (err instanceof HttpError || err instanceof NoRangeSupportError) throw err;
          throw new HttpError(`${this.description}: ${what} failed after ${attempt + 1} attempts: ${describe(err)}`, { cause: err });
        }
        this.stats.retries++;
        this.#logger?.debug({ attempt, err: describe(err) }, `${what}: retrying`);
        await sleep(backoffMs(attempt, this.#opts.retryBaseMs, this.#opts.retryCapMs));
      }
    }
  }

  #imageChanged(err: ImageChangedError): void {
    if (this.#changed) return;
    this.#changed = err;
    this.#onChanged(err);
    this.#logger?.error(`${err.message}; every further read fails with EIO (re-attach with --revalidate to start over)`);
  }

  /**
   * One GET with redirects followed; resolves to the final answer. `headers` are this request's
   * own (Range, validators) and go wherever the request goes; the user's headers (Authorization,
   * Cookie, anything given with --header, user:pass@ of the URL) go only to the origin the user
   * named, never to one a redirect (or an earlier permanent redirect) points to, as curl does
   * without --location-trusted.
   */
  async #request(headers: Record<string, string>): Promise<Dispatcher.ResponseData & { url: URL }> {
    let url = this.#target;
    for (let hops = 0; ; hops++) {
      this.stats.requests++;
      const res = await this.#agent.request({
        origin: url.origin,
        path: url.pathname + url.search,
        method: 'GET',
        headers: url.origin === this.#origin ? { ...this.#headers, ...headers } : headers,
      });
      if (res.statusCode >= 300 && res.statusCode < 400 && res.statusCode !== 304 && res.headers.location) {
        await res.body.dump().catch(() => undefined);
        if (hops >= this.#opts.maxRedirects) throw new HttpError(`${this.description}: more than ${this.#opts.maxRedirects} redirects`);
        const next = new URL(String(res.headers.location), url);
        if (next.protocol !== 'http:' && next.protocol !== 'https:') throw new HttpError(`${this.description}: redirect to ${redactUrl(next.href)} is not HTTP`);
        if (url.protocol === 'https:' && next.protocol === 'http:') throw new HttpError(`${this.description}: refusing a redirect from https to ${redactUrl(next.href)}`);
        // Credentials in a Location (http://user:pass@other/) are not ours to send either.
        next.username = '';
        next.password = '';
        url = next;
        // Permanent redirects stick, so later reads skip the hop.
        if (res.statusCode === 301 || res.statusCode === 308) this.#target = next;
        continue;
      }
      return Object.assign(res, { url });
    }
  }

  async #probe(): Promise<void> {
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
    this.size = cr.size;
    this.validators = { ...(etag ? { etag } : {}), ...(lastModified ? { lastModified } : {}) };
  }

  async #get(data: Buffer, position: number, onProgress?: (bytes: number) => void): Promise<void> {
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
        onProgress?.(off);
      }
    } catch (err) {
      discardBody(res.body);
      throw err;
    } finally {
      this.stats.bytesFetched += off;
    }
    if (off !== data.length) throw new HttpError(`${where}: the body ended after ${off} of ${data.length} bytes`, { retryable: true });
  }
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

/** Certificate checks that fail the same way on every attempt (Node's and OpenSSL's codes). */
const UNTRUSTED_CERT = new Set([
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID',
]);

/**
 * What a TLS failure that retrying cannot mend means, in one clause, or undefined for any other
 * error: an https:// URL whose server answers plain HTTP (OpenSSL's "wrong version number"), or
 * a certificate the system (or --cacert) does not trust.
 */
export function tlsProblem(err: unknown, target: URL): string | undefined {
  if (target.protocol !== 'https:') return undefined;
  const e = err as { code?: unknown; message?: unknown };
  const code = typeof e?.code === 'string' ? e.code : '';
  const message = typeof e?.message === 'string' ? e.message : '';
  const hostPort = `${target.hostname}:${target.port || '443'}`;
  if (code === 'ERR_SSL_WRONG_VERSION_NUMBER' || /wrong version number/.test(message)) {
    return `${hostPort} does not speak TLS (an http:// server?); use an http:// URL for it, or the server's https port`;
  }
  if (UNTRUSTED_CERT.has(code)) {
    return `the TLS certificate of ${hostPort} is not trusted (${code}); give --cacert FILE with the CA that signed it, or fix the server's certificate`;
  }
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') {
    return `the TLS certificate of ${hostPort} is not issued for ${target.hostname} (${code}); use a name it is issued for in the URL`;
  }
  return undefined;
}

function describe(err: unknown): string {
  const e = err as { code?: string; message?: string };
  const msg = e?.message ?? String(err);
  return e?.code && !msg.includes(e.code) ? `${msg} (${e.code})` : msg;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
