// Pure pieces of the HTTP source: Range / Content-Range headers, the image identity, and
// validators. No I/O here, so all of it is unit-tested.
import { InvalidArgumentError } from '../errors.js';

export interface ContentRange {
  /** First byte of the part. */
  start: number;
  /** Last byte of the part, inclusive (as on the wire). */
  end: number;
  /** Complete length of the representation, or undefined for `*`. */
  size: number | undefined;
}

/** The Range header for [start, end) (end exclusive). */
export function rangeHeader(start: number, end: number): string {
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end <= start) {
    throw new RangeError(`bad byte range [${start}, ${end})`);
  }
  return `bytes=${start}-${end - 1}`;
}

const CONTENT_RANGE = /^bytes[ \t]+(\d{1,16})-(\d{1,16})\/(\d{1,16}|\*)$/i;

/**
 * Parses a Content-Range header of a 206 answer (RFC 9110 §14.4). Returns undefined for anything
 * but a well-formed satisfied byte range (an unsatisfied `bytes *` + `/N`, other units, last < first,
 * last >= size).
 */
export function parseContentRange(value: string | undefined | null): ContentRange | undefined {
  if (typeof value !== 'string') return undefined;
  const m = CONTENT_RANGE.exec(value.trim());
  if (!m) return undefined;
  const start = Number(m[1]);
  const end = Number(m[2]);
  const size = m[3] === '*' ? undefined : Number(m[3]);
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || end < start) return undefined;
  if (size !== undefined && (!Number.isSafeInteger(size) || end >= size)) return undefined;
  return { start, end, size };
}

/**
 * Why a 206 answer is not the part asked for, or undefined when it is exactly [start, end) of an
 * image of `size` bytes. A server may legally answer a smaller or shifted range; we refuse it
 * rather than stitch parts together.
 */
export function checkPart(header: string | undefined | null, start: number, end: number, size: number | undefined): string | undefined {
  const cr = parseContentRange(header);
  if (!cr) return `bad Content-Range ${JSON.stringify(header ?? null)}`;
  if (cr.start !== start || cr.end !== end - 1) return `asked for bytes ${start}-${end - 1}, got ${cr.start}-${cr.end}`;
  if (size !== undefined && cr.size !== size) return `the image is ${cr.size ?? 'of unknown size'} bytes now, was ${size}`;
  return undefined;
}

/** A strong ETag can be sent in If-Match / If-Range; a weak one (W/"...") cannot. */
export function isStrongEtag(etag: string | undefined): etag is string {
  return typeof etag === 'string' && /^"[^"]*"$/.test(etag);
}

export interface ImageValidators {
  etag?: string;
  lastModified?: string;
}

/**
 * The cache identity of an image: URL (without credentials, query kept), size and the strongest
 * validator the server gave. A cache made for one version is refused for any other.
 */
export function imageIdentity(url: string, size: number, v: ImageValidators): string {
  const validator = v.etag ? `etag=${v.etag}` : v.lastModified ? `lm=${v.lastModified}` : 'unvalidated';
  return `http:${redactUrl(url)}|size=${size}|${validator}`;
}

/** The URL with any user:password removed, for messages, logs and identities. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    u.username = '';
    u.password = '';
    return u.href;
  } catch {
    return url;
  }
}

/**
 * Parses `Name: value` lines (repeated --header arguments, a --header file, $ULOHTTP_HEADERS) into
 * lower-case names. `where` names the source in errors. InvalidArgumentError for a malformed line
 * (its value is not shown: it may be a secret) or a header ulohttp sets itself.
 */
export function parseHeaders(lines: readonly string[], where = '--header'): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of lines) {
    const i = line.indexOf(':');
    const name = i > 0 ? line.slice(0, i).trim() : '';
    if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(name)) {
      // The value is never shown: it may be a secret.
      throw new InvalidArgumentError(`${where}: each header must look like 'Name: value', got ${i > 0 ? JSON.stringify(`${line.slice(0, i)}: ...`) : 'a line without a colon'}`);
    }
    const value = line.slice(i + 1).trim();
    if (/[\r\n\0]/.test(value)) throw new InvalidArgumentError(`${where}: the value of ${name} holds a line break`);
    const lower = name.toLowerCase();
    if (['range', 'if-range', 'if-match', 'host', 'content-length', 'connection'].includes(lower)) {
      throw new InvalidArgumentError(`${where} cannot set ${name}: ulohttp manages it`);
    }
    out[lower] = value;
  }
  return out;
}

/** Headers as `Name: value` lines, as parseHeaders reads them. */
export function formatHeaders(headers: Record<string, string>): string {
  return Object.entries(headers)
    .map(([k, v]) => `${k}: ${v}`)
    .join('\n');
}

/** The Authorization header for user:password in a URL ({} without them), as the transport sends it. */
export function credentialsHeader(url: string): Record<string, string> {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return {};
  }
  if (!u.username && !u.password) return {};
  return { authorization: `Basic ${Buffer.from(`${decodeURIComponent(u.username)}:${decodeURIComponent(u.password)}`).toString('base64')}` };
}

/** Backoff before retry `attempt` (0-based): exponential with full jitter, capped. */
export function backoffMs(attempt: number, baseMs: number, capMs: number, random: () => number = Math.random): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** attempt);
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}
