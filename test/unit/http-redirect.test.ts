// Credentials and user headers across redirects, against real HTTP servers on 127.0.0.1: two ports
// are two origins. Each server records the headers it receives; the user's Authorization, Cookie
// and any other header given with --header (or user:pass@ in the URL) must reach only the origin
// the user named, never the origin a redirect points to, on the first request or any later one.
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import { afterEach, describe, expect, it } from 'vitest';
import { HttpSource } from '../../src/source/http.js';
import { startRangeServer, type RangeServer } from '../support/http-env.js';

const stops: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const stop of stops.splice(0).reverse()) await stop();
});

/** A range server that records the headers of every request it gets. */
async function recordingServer(data: Buffer, redirectTo?: () => string, status = 302): Promise<RangeServer & { seen: http.IncomingHttpHeaders[] }> {
  const seen: http.IncomingHttpHeaders[] = [];
  const s = await startRangeServer(data, {
    intercept: (req, res) => {
      seen.push({ ...req.headers });
      if (!redirectTo) return false;
      res.writeHead(status, { Location: redirectTo() }).end();
      return true;
    },
  });
  stops.push(() => s.stop());
  return Object.assign(s, { seen });
}

async function open(url: string, headers: Record<string, string> = {}): Promise<HttpSource> {
  const src = await HttpSource.open(url, { headers, retryBaseMs: 5, retryCapMs: 50, timeoutMs: 2000, readaheadMax: 0 });
  stops.push(() => src.close());
  return src;
}

const SECRET = { authorization: 'Bearer s3cret-token', cookie: 'session=s3cret-cookie', 'x-api-key': 's3cret-key' };

function leaked(seen: http.IncomingHttpHeaders[]): string[] {
  return seen.flatMap((h) => Object.entries(h).filter(([, v]) => String(v).includes('s3cret')).map(([k]) => k));
}

describe('HTTP redirects and credentials', () => {
  for (const status of [302, 307, 301, 308]) {
    it(`never sends the user's headers to another origin after a ${status}`, async () => {
      const data = randomBytes(256 * 1024);
      const other = await recordingServer(data);
      const first = await recordingServer(Buffer.alloc(1), () => other.url, status);
      const src = await open(first.url, SECRET);
      const buf = Buffer.alloc(8192);
      await src.readAt(buf, 4096);
      expect(buf.equals(data.subarray(4096, 4096 + 8192))).toBe(true);
      await src.readAt(buf, 65536);
      expect(buf.equals(data.subarray(65536, 65536 + 8192))).toBe(true);
      // The origin the user named got them; the other origin got the reads and no secret.
      expect(first.seen.length).toBeGreaterThan(0);
      expect(first.seen[0]!.authorization).toBe(SECRET.authorization);
      expect(first.seen[0]!['x-api-key']).toBe(SECRET['x-api-key']);
      expect(other.seen.length).toBeGreaterThanOrEqual(3);
      expect(leaked(other.seen)).toEqual([]);
      // Range and validators still go along: they are the request, not the user's.
      expect(other.seen.every((h) => typeof h.range === 'string')).toBe(true);
    });
  }

  it('never sends user:pass@ from the URL to another origin', async () => {
    const data = randomBytes(64 * 1024);
    const other = await recordingServer(data);
    const first = await recordingServer(Buffer.alloc(1), () => other.url, 301);
    const url = first.url.replace('http://', 'http://alice:s3cret-pass@');
    const src = await open(url);
    const buf = Buffer.alloc(4096);
    await src.readAt(buf, 0);
    expect(buf.equals(data.subarray(0, 4096))).toBe(true);
    expect(first.seen[0]!.authorization).toBe(`Basic ${Buffer.from('alice:s3cret-pass').toString('base64')}`);
    expect(other.seen.map((h) => h.authorization)).toEqual(other.seen.map(() => undefined));
    expect(src.description).not.toContain('s3cret');
  });

  it('keeps sending them to the same origin, on another path', async () => {
    const data = randomBytes(64 * 1024);
    const seen: http.IncomingHttpHeaders[] = [];
    const s = await startRangeServer(data, {
      intercept: (req, res) => {
        seen.push({ ...req.headers });
        if (req.url !== '/disk.img') return false;
        res.writeHead(301, { Location: '/moved.img' }).end();
        return true;
      },
    });
    stops.push(() => s.stop());
    const src = await open(s.url, SECRET);
    await src.readAt(Buffer.alloc(4096), 8192);
    expect(seen.length).toBeGreaterThanOrEqual(3);
    expect(seen.every((h) => h.authorization === SECRET.authorization && h.cookie === SECRET.cookie)).toBe(true);
  });
});
