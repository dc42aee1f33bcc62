// The write-back scheduler through the real CLI: a per-second cron schedule fires and writes the
// dirty data back; --dirty-max and --max-dirty-age trigger flushes on their own; a bad cron
// expression is refused in one line before anything is created.
import { randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { mustSh, prepareCliTests, scratch, sh, snapshot, ulobdev, unusedLoop } from '../support/cli.js';

let s: ReturnType<typeof scratch>;
let attached: string[] = [];

beforeAll(() => {
  prepareCliTests();
});

afterEach(async () => {
  for (const dev of attached.splice(0)) await ulobdev(['detach', dev, '--run-dir', s.runDir]);
  s?.cleanup();
});

async function serve(extra: string[]): Promise<{ url: string; name: string; disk: string }> {
  const disk = join(s.dir, 'disk.img');
  mustSh('truncate', ['-s', '32M', disk]);
  const sock = join(s.dir, 'nbd.sock');
  const url = `nbd+unix:///?socket=${sock}`;
  const r = await ulobdev(['--writeback', '-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap'), '--name', 'wb', '--daemon', '--run-dir', s.runDir, ...extra, url, disk]);
  expect(r.code, r.stderr).toBe(0);
  attached.push('wb');
  return { url: `nbd+unix:///ulobdev?socket=${sock}`, name: 'wb', disk };
}

function qemuWrite(url: string, offset: number, file: string): void {
  const r = sh('qemu-io', ['-f', 'raw', '-c', `write -s ${file} ${offset} ${statSync(file).size}`, '-c', 'flush', url]);
  expect(r.status, r.stderr).toBe(0);
}

async function status(name: string): Promise<Record<string, any>> {
  const r = await ulobdev(['status', name, '--json', '--run-dir', s.runDir]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

async function waitFor<T>(what: string, fn: () => Promise<T | undefined | false>, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('write-back scheduler', () => {
  it('refuses a bad cron expression in one line and changes nothing', async () => {
    s = scratch('ulob-cron-bad-');
    mustSh('truncate', ['-s', '16M', join(s.dir, 'disk.img')]);
    const before = snapshot(s.dir);
    for (const expr of ['61 * * * *', 'every hour', '0 0 30 2 *']) {
      const r = await ulobdev(['--writeback', '--flush', expr, '-c', join(s.dir, 'c.cache'), '-b', join(s.dir, 'c.bitmap'), '--daemon', '--run-dir', s.runDir, unusedLoop(), join(s.dir, 'disk.img')]);
      expect(r.code).toBe(1);
      expect(r.stdout).toBe('');
      expect(r.stderr).toMatch(/^ulobdev: --flush '[^']+'(: minute 61 is out of range 0-59| is not a cron expression| never fires)[^\n]*\n$/);
    }
    expect(snapshot(s.dir)).toEqual(before);
    // Other tests may bind loop devices meanwhile: none may point into this test's directory.
    expect(sh('losetup', ['-a']).stdout).not.toContain(s.dir);
  });

  it('flushes on a per-second cron schedule; status shows last and next flush', async () => {
    s = scratch('ulob-cron-');
    const { url, name, disk } = await serve(['--flush', '*/2 * * * * *']);
    const first = await status(name);
    expect(first.writeback.schedule).toBe('*/2 * * * * *');
    expect(first.writeback.nextFlushAt).toBeGreaterThan(Date.now() - 1000);
    expect(first.writeback.nextFlushAt).toBeLessThanOrEqual(Date.now() + 2500);

    const data = randomBytes(3 << 20);
    const file = join(s.dir, 'data.bin');
    writeFileSync(file, data);
    qemuWrite(url, 1 << 20, file);
    const st = await waitFor('a scheduled flush', async () => {
      const x = await status(name);
      return x.writeback.lastFlushAt !== null && x.dirtyBytes === 0 && x;
    });
    expect(st.flushEpoch).toBeGreaterThanOrEqual(1);
    expect(st.bytesAtRisk).toBe(0);
    expect(st.oldestDirtyAgeSeconds).toBeNull();
    expect(readFileSync(disk).subarray(1 << 20, (1 << 20) + data.byteLength).equals(data)).toBe(true);
    const report = JSON.parse((await ulobdev(['report', name, '--json', '--run-dir', s.runDir])).stdout);
    expect(report.flushes.length).toBeGreaterThanOrEqual(1);
    expect(report.flushes.at(-1).bytes).toBe(3 << 20);
    const svg = join(s.dir, 'r.svg');
    const r = await ulobdev(['report', name, '--svg', svg, '--run-dir', s.runDir]);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(svg, 'utf8')).toMatch(/^<svg[\s\S]*class="flush"[\s\S]*<\/svg>\n$/);
    // A sample just before the flush: the chart shows what each flush took away.
    const flushed = report.flushes.find((f: { bytes: number }) => f.bytes === 3 << 20);
    expect(report.samples.some((x: { at: number; dirtyBytes: number }) => x.dirtyBytes === 3 << 20 && Math.abs(x.at - flushed.startedAt) < 1000)).toBe(true);

    // Detached, the history is still there: report reads it from the cache.
    expect((await ulobdev(['detach', name, '--run-dir', s.runDir])).code).toBe(0);
    attached = attached.filter((d) => d !== name);
    const gone = await ulobdev(['report', name, '--json', '--run-dir', s.runDir]);
    expect(gone.code).toBe(1);
    expect(gone.stderr).toMatch(/add --cache CACHE/);
    const offline = await ulobdev(['report', name, '--json', '--cache', join(s.dir, 'c.cache'), '--run-dir', s.runDir]);
    expect(offline.code, offline.stderr).toBe(0);
    expect(JSON.parse(offline.stdout).flushes.map((f: { epoch: number }) => f.epoch)).toEqual(report.flushes.map((f: { epoch: number }) => f.epoch));
  });

  it('a cache detached with dirty data has them in its last sample (newuser8: its report showed 0)', async () => {
    s = scratch('ulob-detach-sample-');
    const { url, name } = await serve([]);
    const file = join(s.dir, 'data.bin');
    writeFileSync(file, randomBytes(2 << 20));
    qemuWrite(url, 0, file);
    const d = await ulobdev(['detach', name, '--run-dir', s.runDir]);
    expect(d.code, d.stderr).toBe(0);
    attached = attached.filter((x) => x !== name);
    const r = await ulobdev(['report', name, '--json', '--cache', join(s.dir, 'c.cache'), '--run-dir', s.runDir]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).samples.at(-1).dirtyBytes).toBe(2 << 20);
  });

  it('flushes when dirty data passes --dirty-max, and when it is older than --max-dirty-age', async () => {
    s = scratch('ulob-threshold-');
    const { url, name, disk } = await serve(['--dirty-max', '2M', '--max-dirty-age', '3s', '--tick-ms', '200']);
    const small = randomBytes(1 << 20);
    writeFileSync(join(s.dir, 'small.bin'), small);
    const flushes = async (): Promise<{ reason: string; startedAt: number; bytes: number }[]> =>
      JSON.parse((await ulobdev(['report', name, '--json', '--run-dir', s.runDir])).stdout).flushes;
    // Timed from the history, not from this process's clock: qemu-io alone can take seconds at
    // load (a fixed 1.5 s check once saw the age flush already done).
    const t0 = Date.now();
    qemuWrite(url, 0, join(s.dir, 'small.bin'));
    // 1 MiB is below the limit: only its age flushes it, 3 s after it became dirty (after t0).
    await waitFor('an age flush', async () => (await status(name)).dirtyBytes === 0);
    const age = await flushes();
    expect(age.map((f) => f.reason)).toEqual(['age']);
    expect(age[0]!.startedAt - t0).toBeGreaterThanOrEqual(2800);
    expect(age[0]!.bytes).toBe(1 << 20);
    expect(readFileSync(disk).subarray(0, 1 << 20).equals(small)).toBe(true);

    // 3 MiB passes the limit: a threshold flush, not one 3 s later for its age.
    const big = randomBytes(3 << 20);
    writeFileSync(join(s.dir, 'big.bin'), big);
    qemuWrite(url, 8 << 20, join(s.dir, 'big.bin'));
    await waitFor('a threshold flush', async () => (await status(name)).dirtyBytes === 0);
    const both = await flushes();
    expect(both[1]?.reason).toBe('threshold');
    expect(readFileSync(disk).subarray(8 << 20, (8 << 20) + big.byteLength).equals(big)).toBe(true);
  });
});
