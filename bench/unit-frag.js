#!/usr/bin/env node
// How the eviction unit size fragments a sparse cache file: the measurement behind the default
// --eviction-unit (docs/design.md, "Cache budget").
//
//   npx tsc -p tsconfig.json && node bench/unit-frag.js [--disk 4G] [--budget 256M] [--fs ext4,xfs] [--json FILE]
//
// For each filesystem (a fresh image mounted on a loop device, needs root) and each unit size, a
// sparse cache file the size of the disk takes 4 KiB reads drawn from a Zipf(1.1) distribution
// over the disk's blocks (hot blocks scattered at random, as fio's random_distribution=zipf:1.1).
// A miss fills its whole unit (one write); when the space used passes the budget, CLOCK evicts
// units and punches them (fallocate PUNCH_HOLE), as the engine does; an fdatasync every 32 MiB of
// fills stands in for the commits. After 4x the budget in fills: the file's extents (filefrag),
// extents per GiB held, the hit ratio, and the time the punches took. Not a test: no assertions.
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, openSync, closeSync, rmSync, writeFileSync, fstatSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { printTable, writeJson } from './lib/table.js';

const { values: opts } = parseArgs({
  options: {
    disk: { type: 'string', default: '4G' },
    budget: { type: 'string', default: '256M' },
    fs: { type: 'string', default: 'ext4,xfs' },
    units: { type: 'string', default: '4K,64K,256K,1M' },
    // 0: every 4 KiB block has its own Zipf rank (fio's zipf: hot blocks scattered). N: the ranks
    // are of N-byte regions (files), read at a uniformly random 4 KiB block inside.
    cluster: { type: 'string', default: '0' },
    dir: { type: 'string', default: '/var/tmp' },
    json: { type: 'string', default: new URL('./results/unit-frag.json', import.meta.url).pathname },
  },
});
const { parseSize, formatBytes } = await import('../dist/units.js');
const { pwrite, fdatasync, punchHole } = await import('../dist/native/io.js');

const DISK = parseSize(opts.disk);
const BUDGET = parseSize(opts.budget);
const BLOCK = 4096;
const BLOCKS = DISK / BLOCK;
const FILL_TOTAL = 4 * BUDGET;
const SYNC_EVERY = 32 << 20;
const CLUSTER_BLOCKS = Math.max(1, parseSize(opts.cluster === '0' ? '4K' : opts.cluster) / BLOCK);

/** Zipf(s) over n items, hot items scattered by a fixed permutation; deterministic (seeded). */
function zipfSampler(n, s, seed) {
  const cdf = new Float64Array(n);
  let sum = 0;
  for (let i = 0; i < n; i++) cdf[i] = sum += 1 / Math.pow(i + 1, s);
  for (let i = 0; i < n; i++) cdf[i] /= sum;
  const perm = new Uint32Array(n);
  for (let i = 0; i < n; i++) perm[i] = i;
  let x = seed >>> 0 || 1;
  const rnd = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [perm[i], perm[j]] = [perm[j], perm[i]];
  }
  return () => {
    const u = rnd();
    let lo = 0;
    let hi = n - 1;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (cdf[mid] < u) lo = mid + 1;
      else hi = mid;
    }
    return perm[lo];
  };
}

async function runOne(dir, unitBytes) {
  const path = join(dir, `cache-${unitBytes}`);
  writeFileSync(path, '');
  execFileSync('truncate', ['-s', String(DISK), path]);
  const fd = openSync(path, 'r+');
  const unitBlocks = unitBytes / BLOCK;
  const units = Math.ceil(BLOCKS / unitBlocks);
  const present = new Uint8Array(units);
  const ref = new Uint8Array(units);
  const data = Buffer.alloc(unitBytes, 0xa5);
  const region = zipfSampler(Math.ceil(BLOCKS / CLUSTER_BLOCKS), 1.1, 12345);
  let y = 777;
  const next = () => {
    y ^= y << 13;
    y ^= y >>> 17;
    y ^= y << 5;
    return Math.min(BLOCKS - 1, region() * CLUSTER_BLOCKS + ((y >>> 0) % CLUSTER_BLOCKS));
  };
  let hand = 0;
  let used = 0;
  let filled = 0;
  let sinceSync = 0;
  let hits = 0;
  let reads = 0;
  let punches = 0;
  let punchMs = 0;
  while (filled < FILL_TOTAL) {
    const u = Math.floor(next() / unitBlocks);
    reads++;
    if (present[u]) {
      hits++;
      ref[u] = 1;
      continue;
    }
    while (used + unitBytes > BUDGET) {
      // CLOCK: second chance for referenced units.
      if (present[hand] && ref[hand]) ref[hand] = 0;
      else if (present[hand]) {
        const t = performance.now();
        await punchHole(fd, hand * unitBytes, unitBytes);
        punchMs += performance.now() - t;
        punches++;
        present[hand] = 0;
        used -= unitBytes;
      }
      hand = (hand + 1) % units;
    }
    await pwrite(fd, data, 0, unitBytes, u * unitBytes);
    present[u] = 1;
    used += unitBytes;
    filled += unitBytes;
    sinceSync += unitBytes;
    if (sinceSync >= SYNC_EVERY) {
      await fdatasync(fd);
      sinceSync = 0;
    }
  }
  await fdatasync(fd);
  const allocated = fstatSync(fd).blocks * 512;
  closeSync(fd);
  const out = execFileSync('filefrag', [path], { encoding: 'utf8' });
  const extents = Number(/(\d+) extents? found/.exec(out)?.[1] ?? NaN);
  rmSync(path);
  return {
    unit: formatBytes(unitBytes),
    unitBytes,
    hitRatio: Math.round((hits / reads) * 1000) / 1000,
    held: formatBytes(allocated),
    extents,
    extentsPerGiB: Math.round(extents / (allocated / 2 ** 30)),
    punches,
    usPerPunch: Math.round((punchMs * 1000) / Math.max(1, punches)),
  };
}

const rows = [];
const base = mkdtempSync(join(opts.dir, 'ulob-bench-frag-'));
try {
  for (const fs of opts.fs.split(',')) {
    const img = join(base, `${fs}.img`);
    const mnt = join(base, `${fs}.mnt`);
    mkdirSync(mnt);
    execFileSync('truncate', ['-s', String(BUDGET * 3 + (512 << 20)), img]);
    execFileSync(`mkfs.${fs}`, fs === 'xfs' ? ['-q', img] : ['-q', '-F', img]);
    execFileSync('mount', ['-o', 'loop', img, mnt]);
    try {
      for (const u of opts.units.split(',')) rows.push({ fs, ...(await runOne(mnt, parseSize(u))) });
    } finally {
      execFileSync('umount', [mnt]);
    }
  }
} finally {
  rmSync(base, { recursive: true, force: true });
}

printTable(
  [
    { key: 'fs', title: 'fs' },
    { key: 'unit', title: 'unit' },
    { key: 'hitRatio', title: 'hit ratio' },
    { key: 'held', title: 'held' },
    { key: 'extents', title: 'extents' },
    { key: 'extentsPerGiB', title: 'extents/GiB' },
    { key: 'punches', title: 'punches' },
    { key: 'usPerPunch', title: 'µs/punch' },
  ],
  rows,
  {
    title:
      `Eviction unit vs fragmentation: ${formatBytes(DISK)} disk, ${formatBytes(BUDGET)} budget, 4 KiB Zipf(1.1) reads` +
      `${CLUSTER_BLOCKS > 1 ? ` over ${formatBytes(CLUSTER_BLOCKS * BLOCK)} regions` : ''}, ${formatBytes(FILL_TOTAL)} filled`,
  },
);
writeJson(opts.json, { disk: DISK, budget: BUDGET, fillTotal: FILL_TOTAL, clusterBytes: CLUSTER_BLOCKS * BLOCK, rows });
