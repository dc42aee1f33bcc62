// A disk image on an HTTP(S) server, read with Range requests. The cache engine calls readAt for
// each run of missing blocks; the prefetch buffer (http-prefetch.ts) answers from what readahead
// fetched ahead of a sequential stream, and otherwise with range GETs, merging concurrent misses
// that touch; the transport (http-transport.ts) runs the GETs over a keep-alive pool of undici
// connections and makes sure the cache never mixes two versions of the image.
import { HttpError, InvalidArgumentError } from '../errors.js';
import type { Source } from './source.js';
import { imageIdentity, type ImageValidators } from './http-range.js';
import { PrefetchBuffer } from './http-prefetch.js';
import { HttpTransport, type HttpSourceOptions } from './http-transport.js';

export type { HttpSourceOptions } from './http-transport.js';

const MiB = 1024 * 1024;
/** HttpSourceOptions.missGranule's default. */
export const DEFAULT_MISS_GRANULE = 16 * 1024;

export interface HttpSourceStats {
  [key: string]: number | string | boolean;
}

export class HttpSource implements Source {
  readonly size: number;
  readonly id: string;
  readonly description: string;
  readonly url: string;
  readonly validators: Readonly<ImageValidators>;
  /** Source.missGranule: bytes a cache miss fills around what was asked (HttpSourceOptions.missGranule). */
  readonly missGranule: number;

  readonly #transport: HttpTransport;
  readonly #prefetch: PrefetchBuffer;
  #closed = false;
  readonly #stats = { bytesRead: 0, failedReads: 0 };

  private constructor(url: string, transport: HttpTransport, prefetch: PrefetchBuffer, missGranule: number) {
    this.url = url;
    this.missGranule = missGranule;
    this.size = transport.size;
    this.validators = transport.validators;
    this.id = imageIdentity(url, transport.size, transport.validators);
    this.description = transport.description;
    this.#transport = transport;
    this.#prefetch = prefetch;
  }

  /**
   * Opens the image at `url`: one Range request for its first byte tells the size, the validator
   * (ETag or Last-Modified) and whether the server serves ranges at all. InvalidArgumentError for a
   * bad URL or an empty image, NoRangeSupportError, HttpError when the server cannot be read.
   */
  static async open(url: string, options: HttpSourceOptions = {}): Promise<HttpSource> {
    let prefetch: PrefetchBuffer | undefined;
    const transport = new HttpTransport(url, options, (err) => prefetch?.imageChanged(err));
    try {
      await transport.probe();
    } catch (err) {
      await transport.close();
      throw err;
    }
    prefetch = new PrefetchBuffer(transport, { size: transport.size, readaheadMax: options.readaheadMax ?? 32 * MiB, budget: options.readaheadBudget ?? 64 * MiB });
    const source = new HttpSource(url, transport, prefetch, options.missGranule ?? DEFAULT_MISS_GRANULE);
    if (!transport.validators.etag && !transport.validators.lastModified) {
      options.logger?.warn(`${source.description} has neither ETag nor Last-Modified: a change of the image on the server can only be detected by its size`);
    }
    return source;
  }

  /** The image changed on the server since open (reads fail from then on). */
  get changed(): Error | undefined {
    return this.#transport.changed;
  }

  stats(): HttpSourceStats {
    const t = this.#transport.stats;
    const p = this.#prefetch.stats;
    return {
      url: this.description,
      ...(this.validators.etag ? { etag: this.validators.etag } : {}),
      ...(this.validators.lastModified ? { lastModified: this.validators.lastModified } : {}),
      requests: t.requests,
      demandRequests: p.demandRequests,
      prefetchRequests: p.prefetchRequests,
      bytesFetched: t.bytesFetched,
      bytesRead: this.#stats.bytesRead,
      readaheadHitBytes: p.readaheadHitBytes,
      readaheadWastedBytes: p.readaheadWastedBytes,
      retries: t.retries,
      failedReads: this.#stats.failedReads,
      readaheadCapBytes: this.#prefetch.cap,
      readaheadBufferedBytes: this.#prefetch.buffered,
      inFlight: this.#transport.inFlight,
      imageChanged: this.#transport.changed !== undefined,
    };
  }

  async readAt(buf: Uint8Array, position: number): Promise<void> {
    if (this.#closed) throw new HttpError(`${this.description}: the source is closed`);
    const changed = this.#transport.changed;
    if (changed) throw changed;
    const end = position + buf.byteLength;
    if (!Number.isSafeInteger(position) || position < 0 || end > this.size) {
      throw new InvalidArgumentError(`read of ${buf.byteLength} bytes at ${position} is outside the image (${this.size} bytes)`);
    }
    if (buf.byteLength === 0) return;
    this.#stats.bytesRead += buf.byteLength;
    try {
      await this.#prefetch.read(buf, position);
    } catch (err) {
      this.#stats.failedReads++;
      throw err;
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#prefetch.close(new HttpError(`${this.description}: the source is closed`));
    await this.#transport.close();
  }
}

/** Opens an HTTP(S) disk image as a Source (see HttpSource.open). */
export function openHttpSource(url: string, options: HttpSourceOptions = {}): Promise<HttpSource> {
  return HttpSource.open(url, options);
}
