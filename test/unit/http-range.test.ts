// The pure parts of the HTTP source: Range/Content-Range, identity, headers, backoff, and the
// readahead window.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { backoffMs, checkPart, imageIdentity, isStrongEtag, parseContentRange, parseHeaders, rangeHeader, redactUrl } from '../../src/source/http-range.js';
import { Readahead } from '../../src/source/readahead.js';

describe('Content-Range', () => {
  it('parses satisfied byte ranges', () => {
    expect(parseContentRange('bytes 0-0/10')).toEqual({ start: 0, end: 0, size: 10 });
    expect(parseContentRange('bytes 4096-8191/1073741824')).toEqual({ start: 4096, end: 8191, size: 1 << 30 });
    expect(parseContentRange('Bytes  5-9/*')).toEqual({ start: 5, end: 9, size: undefined });
  });

  it('refuses anything else', () => {
    for (const bad of [undefined, null, '', 'bytes */10', 'bytes 5-4/10', 'bytes 0-10/10', 'items 0-1/2', 'bytes 0-1/2, 4-5/6', 'bytes -1-2/3', 'bytes 1-2', 'bytes 01x-2/3']) {
      expect(parseContentRange(bad as string), String(bad)).toBeUndefined();
    }
  });

  it('round-trips any range through rangeHeader', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 2 ** 40 }), fc.integer({ min: 1, max: 2 ** 30 }), (start, len) => {
        const h = rangeHeader(start, start + len);
        const [a, b] = h.slice('bytes='.length).split('-').map(Number);
        const cr = parseContentRange(`bytes ${a}-${b}/${start + len}`);
        expect(cr).toEqual({ start, end: start + len - 1, size: start + len });
        expect(checkPart(`bytes ${a}-${b}/${start + len}`, start, start + len, start + len)).toBeUndefined();
      }),
    );
    expect(() => rangeHeader(5, 5)).toThrow(RangeError);
  });

  it('checkPart names what is wrong with a part', () => {
    expect(checkPart('bytes 0-99/1000', 0, 100, 1000)).toBeUndefined();
    expect(checkPart('bytes 0-49/1000', 0, 100, 1000)).toMatch(/asked for bytes 0-99, got 0-49/);
    expect(checkPart('bytes 100-199/1000', 0, 100, 1000)).toMatch(/got 100-199/);
    expect(checkPart('bytes 0-99/2000', 0, 100, 1000)).toMatch(/the image is 2000 bytes now, was 1000/);
    expect(checkPart(undefined, 0, 100, 1000)).toMatch(/bad Content-Range/);
  });
});

describe('identity, headers, backoff', () => {
  it('identity holds URL without credentials, size and the validator', () => {
    expect(imageIdentity('http://u:p@h/x.img', 10, { etag: '"a"', lastModified: 'x' })).toBe('http:http://h/x.img|size=10|etag="a"');
    expect(imageIdentity('http://h/x.img?v=1', 10, { lastModified: 'Mon' })).toBe('http:http://h/x.img?v=1|size=10|lm=Mon');
    expect(imageIdentity('http://h/x', 10, {})).toBe('http:http://h/x|size=10|unvalidated');
    expect(redactUrl('https://me:secret@example.org/a')).toBe('https://example.org/a');
    expect(isStrongEtag('"abc"')).toBe(true);
    expect(isStrongEtag('W/"abc"')).toBe(false);
  });

  it('parses --header lines and refuses the ones we manage', () => {
    expect(parseHeaders(['Authorization: Bearer x:y', 'X-A:b'])).toEqual({ authorization: 'Bearer x:y', 'x-a': 'b' });
    expect(() => parseHeaders(['no colon'])).toThrow(/Name: value/);
    expect(() => parseHeaders(['Range: bytes=0-1'])).toThrow(/manages it/);
  });

  it('backs off exponentially with jitter, capped', () => {
    expect(backoffMs(0, 100, 5000, () => 0)).toBe(50);
    expect(backoffMs(0, 100, 5000, () => 1)).toBe(100);
    expect(backoffMs(3, 100, 5000, () => 1)).toBe(800);
    expect(backoffMs(20, 100, 5000, () => 1)).toBe(5000);
  });
});

describe('readahead window', () => {
  const K = 1024;
  const M = 1024 * K;
  const make = () => new Readahead({ size: 1 << 30, minWindow: 1 * M, maxWindow: 32 * M });

  it('does nothing for a first read, then grows the window as the stream consumes it', () => {
    const ra = make();
    expect(ra.onRead(0, 128 * K)).toBeUndefined();
    const asked: Array<{ start: number; end: number; at: number }> = [];
    let aheadEnd = 0;
    for (let pos = 128 * K; pos < 200 * M; pos += 128 * K) {
      const r = ra.onRead(pos, 128 * K);
      if (!r) continue;
      // Contiguous: each request starts where the previous one ended (or at the reader).
      expect(r.start).toBe(Math.max(aheadEnd, pos + 128 * K));
      // Never more than one window ahead of the reader.
      expect(r.end - (pos + 128 * K)).toBeLessThanOrEqual(32 * M);
      aheadEnd = r.end;
      asked.push({ ...r, at: pos });
    }
    const windows = asked.map((r) => r.end - (r.at + 128 * K));
    for (let i = 1; i < windows.length; i++) expect(windows[i]).toBeGreaterThanOrEqual(windows[i - 1]!);
    // No more ahead than twice what a stream of 128 KiB reads has read (after the first window;
    // half for a stream of small reads, below).
    for (const r of asked) expect(r.end - (r.at + 128 * K)).toBeLessThanOrEqual(Math.max(1 * M, 2 * (r.at + 128 * K)));
    expect(windows[0]).toBe(1 * M);
    expect(windows.at(-1)).toBe(32 * M);
    expect(asked.length).toBeLessThan(30);
  });

  it.each([
    [128 * K, 4 * M, 8 * M],
    [16 * K, 4 * M, 2 * M],
  ])('fetches at most one window past a stream of %i-byte reads that stops after %i bytes: no more than %i', (len, total, most) => {
    const ra = make();
    let asked = 0;
    for (let pos = 0; pos < total; pos += len) {
      const r = ra.onRead(pos, len);
      if (r) asked += r.end - r.start;
    }
    expect(asked - total).toBeLessThanOrEqual(most);
  });

  it('keeps a stream across reads arriving out of order and across small skips', () => {
    const ra = make();
    ra.onRead(0, 128 * K);
    expect(ra.onRead(256 * K, 128 * K)).toBeUndefined();
    expect(ra.onRead(128 * K, 128 * K)).toBeDefined(); // arrived late, same stream
    ra.onRead(400 * K, 4 * K); // skipped blocks the cache had
    expect(ra.windows()).toHaveLength(1);
    let more = 0;
    for (let pos = 512 * K; pos < 4 * M; pos += 128 * K) if (ra.onRead(pos, 128 * K)) more++;
    expect(more).toBeGreaterThan(0);
    expect(ra.windows()).toHaveLength(1);
  });

  it('stays quiet on random reads', () => {
    const ra = make();
    let prefetched = 0;
    let seed = 12345;
    const random = () => {
      // mulberry32
      seed = (seed + 0x6d2b79f5) | 0;
      let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
    for (let i = 0; i < 10_000; i++) {
      const pos = Math.floor(random() * (1 << 18)) * 4 * K;
      const r = ra.onRead(pos, 4 * K);
      if (r) prefetched += r.end - r.start;
    }
    // Readahead on random 4 KiB reads must stay far below the 4x amplification budget.
    expect(prefetched / (10_000 * 4 * K)).toBeLessThan(0.1);
  });

  it('tracks parallel streams separately', () => {
    const ra = make();
    for (let i = 0; i < 8; i++) {
      for (const base of [0, 256 * M, 512 * M]) ra.onRead(base + i * 64 * K, 64 * K);
    }
    expect(ra.windows().filter((w) => w > 0)).toHaveLength(3);
  });

  it('halves the cap when prefetched bytes are wasted and grows it back when used', () => {
    const ra = make();
    ra.wasted(1);
    expect(ra.cap).toBe(16 * M);
    for (let i = 0; i < 10; i++) ra.wasted(1);
    expect(ra.cap).toBe(1 * M);
    ra.onRead(0, 64 * K);
    ra.onRead(64 * K, 64 * K);
    const r = ra.onRead(128 * K, 64 * K)!;
    expect(r.end - r.start).toBe(1 * M);
    for (let pos = 192 * K; pos < 8 * M; pos += 64 * K) {
      const next = ra.onRead(pos, 64 * K);
      if (next) expect(next.end - (pos + 64 * K)).toBeLessThanOrEqual(1 * M);
    }
    ra.used(64 * M);
    expect(ra.cap).toBe(32 * M);
  });

  it('never asks past the end of the image', () => {
    const ra = new Readahead({ size: 1 * M, minWindow: 256 * K, maxWindow: 4 * M });
    ra.onRead(0, 256 * K);
    ra.onRead(256 * K, 256 * K);
    const r = ra.onRead(512 * K, 256 * K)!;
    expect(r.end).toBe(1 * M);
    expect(ra.onRead(768 * K, 256 * K)).toBeUndefined();
  });
});
