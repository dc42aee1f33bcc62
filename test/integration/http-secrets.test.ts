// ulohttp's secrets (issue 14, item 6), through the real CLI against two HTTP servers on 127.0.0.1
// (two ports: two origins) that record every request's headers: the first redirects to the
// second. The user's Authorization, Cookie and URL password reach only the first; a --daemon
// child never carries them in its argv (/proc/PID/cmdline is world-readable); --header-file and
// $ULOHTTP_HEADERS are the ways to give them without a warning.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import type http from 'node:http';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { prepareCliTests, scratch, ulobdev, type CliResult } from '../support/cli.js';
import { startRangeServer, ULOHTTP, type RangeServer } from '../support/http-env.js';

let s: ReturnType<typeof scratch>;
const undo: Array<() => Promise<unknown>> = [];

beforeAll(() => {
  prepareCliTests();
});

afterEach(async () => {
  for (const step of undo.splice(0).reverse()) await step();
  s?.cleanup();
});

function run(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  return new Promise((resolve) => {
    execFile(process.execPath, [ULOHTTP, ...args], { timeout: 60_000, encoding: 'utf8', env: { ...process.env, ...env } }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0, stdout, stderr });
    });
  });
}

interface Origins {
  image: Buffer;
  /** The URL the user gives: it redirects to the other origin. */
  url: string;
  first: http.IncomingHttpHeaders[];
  other: http.IncomingHttpHeaders[];
}

async function origins(): Promise<Origins> {
  const image = randomBytes(1 << 20);
  const other: http.IncomingHttpHeaders[] = [];
  const first: http.IncomingHttpHeaders[] = [];
  const target: RangeServer = await startRangeServer(image, { intercept: (req) => (other.push({ ...req.headers }), false) });
  undo.push(() => target.stop());
  const hop = await startRangeServer(Buffer.alloc(1), {
    intercept: (req, res) => {
      first.push({ ...req.headers });
      res.writeHead(302, { Location: target.url }).end();
      return true;
    },
  });
  undo.push(() => hop.stop());
  return { image, url: hop.url, first, other };
}

/** Attaches serve-only in the background; returns the CLI's result and the daemon's pid. */
async function attach(url: string, args: string[], env: Record<string, string> = {}): Promise<{ r: CliResult; pid: number; device: string }> {
  const device = `nbd+unix:///?socket=${join(s.dir, 'nbd.sock')}`;
  const r = await run(['-c', join(s.dir, 'c.cache'), '--daemon', '--run-dir', s.runDir, ...args, device, url], env);
  expect(r.code, r.stderr).toBe(0);
  undo.push(() => ulobdev(['detach', device, '--run-dir', s.runDir]));
  const st = await ulobdev(['status', device, '--json', '--run-dir', s.runDir]);
  expect(st.code, st.stderr).toBe(0);
  return { r, pid: JSON.parse(st.stdout).pid as number, device };
}

/** Reads the whole device through NBD, so the daemon fetches blocks from the servers. */
async function readAll(device: string, o: Origins): Promise<void> {
  const out = join(s.dir, 'copy.img');
  await new Promise<void>((resolve, reject) => execFile('nbdcopy', [device, out], (err) => (err ? reject(err) : resolve())));
  expect(readFileSync(out).equals(o.image)).toBe(true);
}

function cmdline(pid: number): string {
  return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ');
}

describe('ulohttp keeps credentials to their origin and out of argv', () => {
  it('-H Authorization: warned about, sent to the first origin only, absent from the daemon argv', async () => {
    s = scratch('ulohttp-secrets-');
    const o = await origins();
    const { r, pid, device } = await attach(o.url, ['-H', 'Authorization: Bearer s3cret-argv', '-H', 'Cookie: id=s3cret-cookie', '-H', 'X-Trace: 1']);
    expect(r.stderr).toBe(
      'ulohttp: warning: the authorization header and the cookie header on the command line can be read by every user of this machine (ps, /proc/PID/cmdline); pass it with --header-file FILE or $ULOHTTP_HEADERS instead\n',
    );
    expect(cmdline(pid)).not.toContain('s3cret');
    expect(cmdline(pid)).not.toContain('X-Trace');
    await readAll(device, o);
    expect(o.first.length).toBeGreaterThan(0);
    expect(o.first.every((h) => h.authorization === 'Bearer s3cret-argv' && h.cookie === 'id=s3cret-cookie' && h['x-trace'] === '1')).toBe(true);
    expect(o.other.length).toBeGreaterThan(1);
    expect(o.other.filter((h) => h.authorization || h.cookie || h['x-trace'])).toEqual([]);
  });

  it('user:pass@ in the URL: warned about, basic auth to the first origin only, no password in argv', async () => {
    s = scratch('ulohttp-secrets-');
    const o = await origins();
    const { r, pid, device } = await attach(o.url.replace('http://', 'http://alice:s3cret-pass@'), []);
    expect(r.stderr).toMatch(/^ulohttp: warning: the password in the URL on the command line can be read by every user/);
    expect(cmdline(pid)).not.toContain('s3cret');
    expect(cmdline(pid)).not.toContain('alice');
    await readAll(device, o);
    expect(o.first.every((h) => h.authorization === `Basic ${Buffer.from('alice:s3cret-pass').toString('base64')}`)).toBe(true);
    expect(o.other.filter((h) => h.authorization)).toEqual([]);
  });

  it('--header-file: no warning when it is 0600, a warning when others can read it', async () => {
    s = scratch('ulohttp-secrets-');
    const o = await origins();
    const file = join(s.dir, 'headers');
    writeFileSync(file, '# for the image server\nAuthorization: Bearer s3cret-file\n\n', { mode: 0o600 });
    const { r, pid } = await attach(o.url, ['--header-file', file]);
    expect(r.stderr).toBe('');
    expect(cmdline(pid)).not.toContain('s3cret');
    expect(cmdline(pid)).not.toContain('--header-file');
    expect(o.first[0]!.authorization).toBe('Bearer s3cret-file');
    expect(o.other.filter((h) => h.authorization)).toEqual([]);
    await ulobdev(['detach', `nbd+unix:///?socket=${join(s.dir, 'nbd.sock')}`, '--run-dir', s.runDir]);
    writeFileSync(file, 'Authorization: Bearer s3cret-file\n', { mode: 0o644 });
    chmodSync(file, 0o644);
    const again = await attach(o.url, ['--header-file', file]);
    expect(again.r.stderr).toBe(`ulohttp: warning: --header-file ${file} can be read by other users (mode 644); chmod 600 it\n`);
  });

  it('$ULOHTTP_HEADERS: no warning, and the header reaches the first origin', async () => {
    s = scratch('ulohttp-secrets-');
    const o = await origins();
    const { r } = await attach(o.url, [], { ULOHTTP_HEADERS: 'Authorization: Bearer s3cret-env' });
    expect(r.stderr).toBe('');
    expect(o.first[0]!.authorization).toBe('Bearer s3cret-env');
    expect(o.other.filter((h) => h.authorization)).toEqual([]);
  });

  it('a refused attach is one line: the secrets warnings are said only once it is accepted (newuser12)', async () => {
    s = scratch('ulohttp-secrets-');
    const file = join(s.dir, 'headers');
    writeFileSync(file, 'Cookie: id=1\n', { mode: 0o644 });
    chmodSync(file, 0o644);
    for (const daemon of [[], ['--daemon']]) {
      // A cache directory that does not exist: refused (by the --daemon child, the second time).
      const r = await run([
        ...daemon, '-c', join(s.dir, 'nodir', 'c.cache'), '-H', 'Authorization: Bearer x', '--header-file', file, '--run-dir', s.runDir,
        `nbd+unix:///?socket=${join(s.dir, 'nbd.sock')}`, 'http://127.0.0.1:9/disk.img',
      ]);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(/^ulohttp: -c \S+\/nodir\/c\.cache: the directory \S+ does not exist[^\n]*\n$/);
    }
  });

  it('a malformed header line is refused without echoing its value', async () => {
    s = scratch('ulohttp-secrets-');
    const file = join(s.dir, 'headers');
    writeFileSync(file, 'Bearer s3cret-no-name\n', { mode: 0o600 });
    const r = await run(['-c', join(s.dir, 'c.cache'), '--header-file', file, '--run-dir', s.runDir, `nbd+unix:///?socket=${join(s.dir, 'nbd.sock')}`, 'http://127.0.0.1:9/disk.img']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^ulohttp: --header-file .*headers: each header must look like 'Name: value'/);
    expect(r.stderr).not.toContain('s3cret');
  });
});
