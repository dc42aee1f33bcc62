#!/usr/bin/env node
// The eviction policy's view of bench/budget.js (issue 12): the same request sequence (fio's own
// zipf:1.1, randseed 42, drawn with ioengine=null as budget.js draws it) replayed through a model
// of the engine's fills and evictions, with the engine's own Clock (dist/cache/clock.js) and
// NeighbourFeedback (dist/cache/fill-feedback.js), against LRU per 4 KiB block and a bcache-like
// log of buckets. One request at a time, no concurrency, no staging: what the policy alone gives.
//
//   npx tsc -p tsconfig.json && node bench/budget-model.js [--disk 256M] [--warm-ios 40000] [--ios 20000] [--json FILE]
//
// Model: a budget of disk/8 in 4 KiB blocks. A read of a present block is a hit (the clock's
// accessed bit is set; with `miss=use`, as on /dev/uloopN where the kernel sets the bit on every
// request, a miss sets it too). A miss fills its span (the block; the aligned 64 KiB granule; or
// the granule when NeighbourFeedback says so); when the span does not fit, the clock picks units
// until their blocks cover what is over the budget plus one eviction batch (1/32 of the budget,
// 1 to 64 units: engine.#evictionBatch) and all their blocks go. The hit ratio is over the
// measured requests, after the warm-up ones. Workloads: fio's zipf:1.1 (hot blocks scattered),
// and two with locality for the fill rule: 64 KiB files picked by zipf:1.1 and read whole 4 KiB at a
// time, and the zipf warm-up followed by those files (the workload changing). Not a test.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { printTable, writeJson } from './lib/table.js';
import { drawZipfReads } from './lib/zipf-draw.js';

const { values: opts } = parseArgs({
  options: {
    disk: { type: 'string', default: '256M' },
    'warm-ios': { type: 'string', default: '40000' },
    ios: { type: 'string', default: '20000' },
    json: { type: 'string', default: new URL('./results/budget-model.json', import.meta.url).pathname },
  },
});
const { Clock } = await import('../dist/cache/clock.js');
const { NeighbourFeedback } = await import('../dist/cache/fill-feedback.js');

const DISK_MB = Number(/^(\d+)M$/.exec(opts.disk)?.[1]);
const WARM = Number(opts['warm-ios']);
const IOS = Number(opts.ios);
if (!(DISK_MB >= 64) || !(WARM >= 1) || !(IOS >= 1)) throw new Error('--disk NNNM (64M or more), --warm-ios and --ios positive');
const BLOCKS = (DISK_MB << 20) / 4096;
const BUDGET = BLOCKS / 8;
const GRANULE = 16; // engine DEFAULT_FILL_GRANULE, 64 KiB

/** fio's zipf:1.1 over the disk, randseed 42: the block numbers budget.js replays. */
function fioSequence() {
  const dir = mkdtempSync(join(tmpdir(), 'budget-model-'));
  try {
    return drawZipfReads(dir, DISK_MB, WARM + IOS).map((r) => Number(r.split(' ')[0]) / 4096);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** 64 KiB files (aligned), picked by a Zipf(1.1) with the ranks scattered (xorshift, seeded), each read whole in 4 KiB reads. */
function filesSequence(n) {
  let x = 12345;
  const rnd = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
  const files = BLOCKS / GRANULE;
  const cdf = new Float64Array(files);
  let sum = 0;
  for (let i = 0; i < files; i++) cdf[i] = sum += 1 / Math.pow(i + 1, 1.1);
  const perm = Array.from({ length: files }, (_, i) => i);
  for (let i = files - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [perm[i], perm[j]] = [perm[j], perm[i]];
  }
  const out = [];
  while (out.length < n) {
    const r = rnd() * sum;
    let lo = 0;
    let hi = files - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cdf[mid] < r) lo = mid + 1;
      else hi = mid;
    }
    for (let i = 0; i < GRANULE && out.length < n; i++) out.push(perm[lo] * GRANULE + i);
  }
  return out;
}

/** ulobdev's model: fills of `fill` ('block' | 'granule' | 'feedback'), GCLOCK over units of `unitBlocks`. */
function ulobdev(seq, { unitBlocks, fill, missIsUse }) {
  const clock = new Clock(BLOCKS, unitBlocks);
  const feedback = new NeighbourFeedback();
  const present = new Uint8Array(BLOCKS);
  const perUnit = new Uint32Array(Math.ceil(BLOCKS / unitBlocks));
  const batch = Math.min(Math.max(unitBlocks, Math.floor(BUDGET / 32)), 64 * unitBlocks);
  const nextWithData = (u) => {
    while (u < perUnit.length && perUnit[u] === 0) u++;
    return u;
  };
  let used = 0;
  let hits = 0;
  const evict = (want) => {
    let covered = 0;
    while (covered < want) {
      const units = clock.pick(Math.ceil((want - covered) / unitBlocks), nextWithData, (u) => perUnit[u] > 0);
      if (units.length === 0) break;
      for (const u of units) {
        for (let b = u * unitBlocks; b < (u + 1) * unitBlocks; b++) {
          if (present[b]) {
            present[b] = 0;
            used--;
            covered++;
          }
        }
        perUnit[u] = 0;
        clock.forget(u);
      }
    }
  };
  for (let i = 0; i < seq.length; i++) {
    const b = seq[i];
    feedback.read(b, b + 1);
    if (present[b]) {
      if (i >= WARM) hits++;
      clock.noteAccess(b, b + 1);
      continue;
    }
    if (missIsUse) clock.noteAccess(b, b + 1);
    const g0 = Math.floor(b / GRANULE) * GRANULE;
    if (fill === 'feedback') for (let x = g0; x < g0 + GRANULE; x++) if (x !== b && !present[x]) feedback.watch(x, x + 1);
    const span = fill === 'granule' || (fill === 'feedback' && feedback.wantGranule()) ? GRANULE : 1;
    const f0 = Math.floor(b / span) * span;
    const blocks = [];
    for (let x = f0; x < f0 + span; x++) if (!present[x]) blocks.push(x);
    if (used + blocks.length > BUDGET) evict(used + blocks.length - BUDGET + batch);
    for (const x of blocks) {
      present[x] = 1;
      used++;
      perUnit[Math.floor(x / unitBlocks)]++;
    }
  }
  return hits / (seq.length - WARM);
}

/** LRU per 4 KiB block over the budget: what a per-block policy gives. */
function lru(seq) {
  const m = new Map();
  let hits = 0;
  for (let i = 0; i < seq.length; i++) {
    const b = seq[i];
    if (m.has(b)) {
      m.delete(b);
      if (i >= WARM) hits++;
    } else if (m.size >= BUDGET) m.delete(m.keys().next().value);
    m.set(b, true);
  }
  return hits / (seq.length - WARM);
}

/** bcache-like: misses appended to buckets of `bucketBlocks` in arrival order; a hit stamps its bucket; the bucket with the oldest stamp goes whole. */
function bucketLog(seq, bucketBlocks) {
  const where = new Map();
  const buckets = [];
  let current = null;
  let hits = 0;
  for (let i = 0; i < seq.length; i++) {
    const b = seq[i];
    const at = where.get(b);
    if (at) {
      at.stamp = i;
      if (i >= WARM) hits++;
      continue;
    }
    if (!current || current.blocks.length === bucketBlocks) {
      if (buckets.length === BUDGET / bucketBlocks) {
        let victim = 0;
        for (let k = 1; k < buckets.length; k++) if (buckets[k].stamp < buckets[victim].stamp) victim = k;
        for (const x of buckets[victim].blocks) where.delete(x);
        buckets.splice(victim, 1);
      }
      current = { blocks: [], stamp: i };
      buckets.push(current);
    }
    current.blocks.push(b);
    where.set(b, current);
  }
  return hits / (seq.length - WARM);
}

const zipf = fioSequence();
const files = filesSequence(WARM + IOS);
const workloads = { zipf, files: files, 'zipf then files': [...zipf.slice(0, WARM), ...files.slice(0, IOS)] };
const rows = [];
const add = (policy, f) => rows.push({ policy, ...Object.fromEntries(Object.entries(workloads).map(([k, seq]) => [k, f(seq).toFixed(3)])) });
add('LRU per 4 KiB block', lru);
add('bcache-like: 32 KiB buckets in miss order, oldest hit goes', (s) => bucketLog(s, 8));
for (const unitKiB of [64, 256, 1024]) {
  add(`ulobdev ${unitKiB} KiB units, 4 KiB fills (uloop/ublk MISS; miss sets the bit)`, (s) => ulobdev(s, { unitBlocks: unitKiB / 4, fill: 'block', missIsUse: true }));
}
add('ulobdev 256 KiB units, 4 KiB fills (a miss is no use)', (s) => ulobdev(s, { unitBlocks: 64, fill: 'block', missIsUse: false }));
add('ulobdev 256 KiB units, 64 KiB granule always (nbd before)', (s) => ulobdev(s, { unitBlocks: 64, fill: 'granule', missIsUse: false }));
add('ulobdev 256 KiB units, granule by NeighbourFeedback (nbd now)', (s) => ulobdev(s, { unitBlocks: 64, fill: 'feedback', missIsUse: false }));
printTable(
  [
    { key: 'policy', title: `hit ratio over ${IOS} requests after ${WARM}; ${DISK_MB} MiB disk, ${BUDGET * 4 / 1024} MiB budget` },
    ...Object.keys(workloads).map((k) => ({ key: k, title: k, align: 'right' })),
  ],
  rows,
  { notes: [`zipf: fio zipf:1.1 randseed 42 (${new Set(zipf.slice(0, WARM)).size} distinct blocks in the warm-up, ${new Set(zipf).size} in all; the budget holds ${BUDGET})`] },
);
writeJson(opts.json, { bench: 'budget-model', date: new Date().toISOString(), params: { diskMiB: DISK_MB, budgetBlocks: BUDGET, warmIos: WARM, ios: IOS }, rows });
