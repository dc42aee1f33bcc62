// What decides ulohttp's sequential rate at +20 ms per direction (bench/README.md, session 12):
// how fast a stream's readahead window grows, whether a reader can use the bytes of a prefetch
// GET before the whole GET has arrived, and that a random reader still fetches no more than it reads.
import { randomBytes } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { HttpSource } from '../../src/source/http.js';
import { Readahead } from '../../src/source/readahead.js';
import { startRangeServer, type RangeServer } from '../support/http-env.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const stops: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const stop of stops.splice(0).reverse()) await stop();
});

async function server(data: Buffer, options: Parameters<typeof startRangeServer>[1] = {}): Promise<RangeServer> {
  const s = await startRangeServer(data, options);
  stops.push(() => s.stop());
  return s;
}

async function open(url: string, options: Parameters<typeof HttpSource.open>[1] = {}): Promise<HttpSource> {
  const src = await HttpSource.open(url, { retryBaseMs: 5, retryCapMs: 50, timeoutMs: 5000, ...options });
  stops.push(() => src.close());
  return src;
}

/**
 * Feeds `Readahead` a sequential stream of `len`-byte reads over `total` bytes; returns the
 * furthest byte asked ahead and the stream's window (what is asked ahead is between half the
 * window and the window: the next part is asked when the reader is half a window from its end).
 */
function streamAhead(total: number, len: number): { front: number; ahead: number; window: number } {
  const ra = new Readahead({ size: 1024 * MiB, minWindow: 128 * KiB, firstWindow: MiB, maxWindow: 32 * MiB });
  let ahead = 0;
  for (let pos = 0; pos < total; pos += len) {
    const r = ra.onRead(pos, len);
    if (r) ahead = Math.max(ahead, r.end);
    ra.used(len);
  }
  return { front: total, ahead, window: ra.windows()[0] ?? 0 };
}

describe('readahead window growth', () => {
  it('a stream of 128 KiB reads has a window of a round trip at 200 MB/s and 40 ms (8 MB) after 8 MiB read', () => {
    // With the window capped at half the bytes read (before session 12), 8 MiB read gave a 4 MiB
    // window (2-4 MiB asked ahead): at +20 ms a sequential reader spent much of a 256 MiB file
    // ramping up.
    const { front, ahead, window } = streamAhead(8 * MiB, 128 * KiB);
    expect(window).toBeGreaterThanOrEqual(8 * MiB);
    expect(ahead - front).toBeGreaterThanOrEqual(4 * MiB);
  });

  it('a stream of small reads (a directory of 4-16 KiB files) still asks at most about half what it read ahead', () => {
    const { front, ahead, window } = streamAhead(2 * MiB, 16 * KiB);
    expect(window).toBeLessThanOrEqual(MiB);
    expect(ahead - front).toBeLessThanOrEqual(MiB);
  });
});

describe('HttpSource prefetch', () => {
  it('serves the bytes of a prefetch GET that have arrived without waiting for the rest of it', async () => {
    const data = randomBytes(8 * MiB);
    let gate!: () => void;
    const gated = new Promise<void>((r) => (gate = r));
    let piece: { start: number; end: number } | undefined;
    let etag = '';
    const s = await server(data, {
      // The first prefetch GET (longer than one 128 KiB read): headers and its first half at once,
      // the second half only when the test opens the gate.
      intercept: async (req, res) => {
        const m = /bytes=(\d+)-(\d+)/.exec(String(req.headers.range));
        if (!m || piece || Number(m[2]) + 1 - Number(m[1]) <= 128 * KiB) return false;
        const start = Number(m[1]);
        const end = Number(m[2]) + 1;
        piece = { start, end };
        const half = start + Math.floor((end - start) / 2 / 4096) * 4096;
        res.writeHead(206, { 'Content-Range': `bytes ${start}-${end - 1}/${data.length}`, 'Content-Length': end - start, ETag: etag });
        res.write(data.subarray(start, half));
        await gated;
        res.end(data.subarray(half, end));
        return true;
      },
    });
    const src = await open(s.url);
    etag = src.validators.etag ?? '';
    const read = async (pos: number, len: number) => {
      const buf = Buffer.alloc(len);
      await src.readAt(buf, pos);
      return buf;
    };
    try {
      // Three reads in a row make a stream; the third asks for a window ahead.
      for (let pos = 0; pos < 3 * 128 * KiB; pos += 128 * KiB) await read(pos, 128 * KiB);
      for (let i = 0; i < 50 && !piece; i++) await new Promise((r) => setTimeout(r, 10));
      expect(piece, 'a prefetch GET was sent').toBeDefined();
      const { start, end } = piece!;
      const late = read(end - 4096, 4096);
      let lateDone = false;
      void late.then(() => (lateDone = true));
      const early = await Promise.race([read(start, 4096), new Promise<'waited'>((r) => setTimeout(() => r('waited'), 2000))]);
      expect(early, 'the first bytes of the GET were served while its second half was held back').not.toBe('waited');
      expect((early as Buffer).equals(data.subarray(start, start + 4096))).toBe(true);
      expect(lateDone, 'a read of the held-back half waits for it').toBe(false);
      gate();
      expect((await late).equals(data.subarray(end - 4096, end))).toBe(true);
    } finally {
      gate();
    }
  });

  it.each([
    ['retried', 6],
    ['not retried (the readers of the missing half then ask by demand)', 0],
  ])("a prefetch GET cut off halfway, %s: readers of either half get exactly the image's bytes", async (_how, retries) => {
    const data = randomBytes(8 * MiB);
    let piece: { start: number; end: number } | undefined;
    let cut = 0;
    let etag = '';
    const s = await server(data, {
      // The first prefetch GET: headers and half its body, then the connection is closed.
      intercept: async (req, res) => {
        const m = /bytes=(\d+)-(\d+)/.exec(String(req.headers.range));
        if (!m || cut > 0 || Number(m[2]) + 1 - Number(m[1]) <= 128 * KiB) return false;
        cut++;
        const start = Number(m[1]);
        const end = Number(m[2]) + 1;
        piece = { start, end };
        res.writeHead(206, { 'Content-Range': `bytes ${start}-${end - 1}/${data.length}`, 'Content-Length': end - start, ETag: etag });
        res.write(data.subarray(start, start + Math.floor((end - start) / 2)));
        await new Promise((r) => setTimeout(r, 200));
        res.socket?.destroy();
        return true;
      },
    });
    const src = await open(s.url, { retries });
    etag = src.validators.etag ?? '';
    const read = async (pos: number, len: number) => {
      const buf = Buffer.alloc(len);
      await src.readAt(buf, pos);
      return buf;
    };
    for (let pos = 0; pos < 3 * 128 * KiB; pos += 128 * KiB) await read(pos, 128 * KiB);
    for (let i = 0; i < 50 && !piece; i++) await new Promise((r) => setTimeout(r, 10));
    expect(piece, 'a prefetch GET was sent').toBeDefined();
    const { start, end } = piece!;
    const [first, last] = await Promise.all([read(start, 64 * KiB), read(end - 64 * KiB, 64 * KiB)]);
    expect(first.equals(data.subarray(start, start + 64 * KiB))).toBe(true);
    expect(last.equals(data.subarray(end - 64 * KiB, end))).toBe(true);
    expect(Number(src.stats().retries)).toBe(retries > 0 ? 1 : 0);
  });

  it('a random reader fetches about what it reads: no readahead for scattered 4 KiB reads', async () => {
    const data = randomBytes(64 * MiB);
    const s = await server(data);
    const src = await open(s.url);
    let seed = 7;
    const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
    const sent0 = s.bytesSent;
    let readBytes = 0;
    for (let i = 0; i < 400; i++) {
      const pos = Math.floor(rnd() * (data.length / 4096)) * 4096;
      const buf = Buffer.alloc(4096);
      await src.readAt(buf, pos);
      expect(buf.equals(data.subarray(pos, pos + 4096))).toBe(true);
      readBytes += 4096;
    }
    expect((s.bytesSent - sent0) / readBytes).toBeLessThan(1.1);
    expect(Number(src.stats().prefetchRequests)).toBe(0);
  });
});
