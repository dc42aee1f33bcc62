#!/usr/bin/env node
// Write-back and hydration against dd on the same files, side by side in one run.
//
//   npx tsc -p tsconfig.json && sudo node bench/flush.js [--size 256M] [--reps 3] [--dir /var/tmp]
//                                                      [--blocks 4096] [--json bench/results/flush.json]
//                                                      [--only contiguous,random,hydrate]
//
// Rows (each side runs --reps times, interleaved ours, ref, ref, ours, ...; best and median of
// each, and a ratio of each: ours / ref in MB/s):
//   flush contiguous  flushDirty of the whole device, every block dirty, vs `dd if=CACHE of=DISK
//                     bs=4M conv=fdatasync,notrunc`: the same bytes from the same cache file to the
//                     same backing file. Before each run of either side (root only): sync, drop the
//                     page cache, read the cache file back in: both sides copy from a resident
//                     cache file into a disk file with no pages in memory.
//   flush random      --blocks dirty 4 KiB blocks at random offsets, flushed sorted (flushDirty) vs
//                     the same blocks copied from the cache file to the backing file in random
//                     order (pread + pwrite each) and one fdatasync.
//   hydrate           Hydrator (no rate limit) on a fresh cache vs `dd if=DISK of=FRESH bs=1M
//                     conv=fdatasync,notrunc` into a freshly fallocated file of the same size (the
//                     same copy), and vs `dd if=DISK of=/dev/null bs=1M` (the disk's read speed);
//                     the page cache is dropped before each (needs root; without it the disk is read
//                     from memory and the note says so).
// The backing file is filled with random data first, so no side writes into holes. The load
// average goes into the JSON: on a shared machine compare ratios from one run, not runs. Each
// row's note also gives the median CPU time (user + system, ms) of each side's runs: ours is this
// process (event loop and I/O threads), dd's its child's. Under load it moves far less than wall
// time and says what each side costs the machine.
// Not a test: no assertions; it exits non-zero only when the bench itself breaks.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, openSync, closeSync, fdatasyncSync, readFileSync, readSync, writeSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { randomBytes } from 'node:crypto';
import { cpus, loadavg, release, totalmem } from 'node:os';
import { performance } from 'node:perf_hooks';
import { printTable, writeJson } from './lib/table.js';

const { values: opts } = parseArgs({
  options: {
    size: { type: 'string', default: '256M' },
    reps: { type: 'string', default: '5' },
    blocks: { type: 'string', default: '4096' },
    dir: { type: 'string', default: '/var/tmp' },
    /** Rows to run, comma-separated (default all): `--only random --blocks 1` times a one-block flush, its fixed cost. */
    only: { type: 'string', default: 'contiguous,random,hydrate' },
    json: { type: 'string', default: new URL('./results/flush.json', import.meta.url).pathname },
  },
});
const MiB = 1 << 20;
/** --size: a whole number of MiB, given as 256M, 1G or 1024M (4 MiB multiples: the fill is in 4 MiB pieces). */
function parseSize(text) {
  const m = /^(\d+)([MG])i?B?$/i.exec(text);
  const bytes = m ? Number(m[1]) * (m[2].toUpperCase() === 'G' ? 1024 * MiB : MiB) : NaN;
  if (!(bytes >= 4 * MiB) || bytes % (4 * MiB) !== 0) {
    process.stderr.write(`bench/flush.js: --size ${text} is not a multiple of 4 MiB written like 256M or 1G\n`);
    process.exit(1);
  }
  return bytes;
}
const SIZE = parseSize(opts.size);
const REPS = Math.max(1, Number(opts.reps));
const RANDOM_BLOCKS = Number(opts.blocks);
const BLOCK = 4096;
const ONLY = new Set(opts.only.split(',').map((x) => x.trim()));
for (const r of ONLY) {
  if (!['contiguous', 'random', 'hydrate'].includes(r)) {
    process.stderr.write(`bench/flush.js: --only takes contiguous, random and hydrate, not ${r}\n`);
    process.exit(1);
  }
}

const { CacheEngine } = await import('../dist/cache/engine.js');
const { CacheStore } = await import('../dist/cache/store.js');
const { openBacking } = await import('../dist/source/backing.js');
const { flushDirty } = await import('../dist/writeback/flusher.js');
const { Hydrator } = await import('../dist/writeback/hydrate.js');

const loadAtStart = loadavg().map((x) => +x.toFixed(2));
const dir = mkdtempSync(join(opts.dir, 'ulob-bench-flush-'));
const cleanup = () => rmSync(dir, { recursive: true, force: true });
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    cleanup();
    process.exit(130);
  });
}
const disk = join(dir, 'disk.img');
const log = (msg) => process.stderr.write(`${msg}\n`);
const dd = (...args) => execFileSync('dd', [...args, 'status=none']);

function dropCaches() {
  try {
    execFileSync('sync');
    writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch {
    return false;
  }
}

async function open(name) {
  const source = await openBacking(disk, { writable: true });
  const store = await CacheStore.open({
    paths: { cache: join(dir, `${name}.cache`), bitmap: join(dir, `${name}.bitmap`), metadata: join(dir, `${name}.meta`) },
    backing: source,
    mode: 'writeback',
  });
  return { engine: new CacheEngine(store, source, { autoCommitMs: 0 }), source, cache: join(dir, `${name}.cache`) };
}

async function close({ engine, source }) {
  await engine.close();
  await source.close();
}

/**
 * CPU milliseconds (user + system) this process and its waited-for children (dd) have used so far:
 * /proc/self/stat utime, stime, cutime, cstime. A run's share is a difference of two readings. On a
 * loaded machine wall times spread by 2-5x while CPU time moves little: it says what each side costs.
 */
function cpuMs() {
  const f = readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' ');
  const tick = 1000 / 100; // USER_HZ
  return (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) * tick;
}

let lastCpu = 0;
const time = async (fn) => {
  const c = cpuMs();
  const t = performance.now();
  await fn();
  const ms = performance.now() - t;
  lastCpu = cpuMs() - c;
  return ms;
};
const mbs = (bytes, ms) => +(bytes / 1e6 / (ms / 1000)).toFixed(1);

/** Runs ours and ref interleaved (ours, ref, ref, ours, ...); `prepare` before each, untimed. */
async function sideBySide(prepare, ours, ref) {
  const times = { ours: [], ref: [] };
  const cpu = { ours: [], ref: [] };
  for (let i = 0; i < REPS; i++) {
    for (const side of i % 2 === 0 ? ['ours', 'ref'] : ['ref', 'ours']) {
      await prepare(side);
      times[side].push(await time(side === 'ours' ? ours : ref));
      cpu[side].push(lastCpu);
    }
  }
  return { ours: Math.min(...times.ours), ref: Math.min(...times.ref), oursMedian: median(times.ours), refMedian: median(times.ref), all: times, cpu };
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/**
 * The same page-cache state before either side of a flush run: dirty data synced, every page
 * dropped, the cache file read back in. Both then read a resident cache file and write a disk
 * file with no pages in memory. False without root (nothing dropped).
 */
function samePageCache(cacheFile) {
  if (!dropCaches()) return false;
  dd(`if=${cacheFile}`, 'of=/dev/null', 'bs=4M');
  return true;
}

const rows = [];
let flushPages = false;
function row(workload, bytes, t, refName, extra = {}) {
  const ours = mbs(bytes, t.ours);
  const ref = mbs(bytes, t.ref);
  const oursMedian = mbs(bytes, t.oursMedian);
  const refMedian = mbs(bytes, t.refMedian);
  rows.push({
    workload, ours, ref, refName, ratio: +(ours / ref).toFixed(2),
    oursMedian, refMedian, ratioMedian: +(oursMedian / refMedian).toFixed(2),
    msOurs: t.all.ours.map(Math.round), msRef: t.all.ref.map(Math.round),
    cpuOurs: median(t.cpu.ours), cpuRef: median(t.cpu.ref), ...extra,
  });
}

try {
  log(`filling ${SIZE / MiB} MiB backing file with random data`);
  dd('if=/dev/urandom', `of=${disk}`, 'bs=4M', `count=${SIZE / (4 * MiB)}`, 'conv=fdatasync');
  const chunk = randomBytes(4 * MiB);

  // 1. Contiguous flush vs dd from the same cache file.
  if (ONLY.has('contiguous')) {
    log('flush contiguous');
    const dev = await open('seq');
    let result;
    const t = await sideBySide(
      async () => {
        // Both sides start alike: every block written in the cache (dirty) and synced there.
        for (let off = 0; off < SIZE; off += chunk.length) await dev.engine.write(off, chunk);
        await dev.engine.flush();
        if (dev.engine.stats().dirtyBlocks === 0) throw new Error('nothing dirty');
        flushPages = samePageCache(dev.cache);
      },
      async () => (result = await flushDirty(dev.engine)),
      async () => {
        dd(`if=${dev.cache}`, `of=${disk}`, 'bs=4M', `count=${SIZE / (4 * MiB)}`, 'conv=fdatasync,notrunc');
        // The blocks stay dirty in the cache: the next preparation rewrites them anyway.
      },
    );
    if (result.bytes !== SIZE) throw new Error(`flushed ${result.bytes} of ${SIZE} bytes`);
    row(`flush ${SIZE / MiB} MiB contiguous`, SIZE, t, 'dd bs=4M conv=fdatasync (cache file → disk)');
    await close(dev);
  }

  // 2. Random 4 KiB dirty blocks: sorted and pipelined vs the same copy unsorted.
  if (ONLY.has('random')) {
    log('flush random blocks');
    const dev = await open('rnd');
    const picked = new Set();
    while (picked.size < RANDOM_BLOCKS) picked.add(Math.floor(Math.random() * (SIZE / BLOCK)));
    const list = [...picked];
    const data = randomBytes(BLOCK);
    const t = await sideBySide(
      async () => {
        for (const b of list) await dev.engine.write(b * BLOCK, data);
        await dev.engine.flush();
        flushPages = samePageCache(dev.cache);
      },
      () => flushDirty(dev.engine),
      async () => {
        const cfd = openSync(dev.cache, 'r');
        const dfd = openSync(disk, 'r+');
        const buf = Buffer.allocUnsafe(BLOCK);
        for (const b of list) {
          readSync(cfd, buf, 0, BLOCK, b * BLOCK);
          writeSync(dfd, buf, 0, BLOCK, b * BLOCK);
        }
        fdatasyncSync(dfd);
        closeSync(dfd);
        closeSync(cfd);
      },
    );
    row(`flush ${RANDOM_BLOCKS} random 4 KiB blocks`, RANDOM_BLOCKS * BLOCK, t, 'same copy unsorted + fdatasync');
    await close(dev);
  }

  // 3. Hydration vs dd copying the disk into a fresh file, and vs dd reading the disk.
  let dropped = false;
  if (ONLY.has('hydrate')) {
    log('hydrate');
    let dev = null;
    const fresh = join(dir, 'dd.fresh');
    const t = await sideBySide(
      async (side) => {
        if (dev) await close(dev);
        dev = null;
        for (const p of ['hyd.cache', 'hyd.bitmap', 'hyd.meta', 'hyd.meta-wal', 'hyd.meta-shm', 'dd.fresh']) rmSync(join(dir, p), { force: true });
        if (side === 'ours') dev = await open('hyd');
        else execFileSync('fallocate', ['-l', String(SIZE), fresh]);
        dropped = dropCaches();
      },
      async () => {
        await new Hydrator(dev.engine, { quietMs: 0 }).start();
        if (dev.engine.stats().presentBlocks !== SIZE / BLOCK) throw new Error('hydration incomplete');
      },
      async () => dd(`if=${disk}`, `of=${fresh}`, 'bs=1M', 'conv=fdatasync,notrunc'),
    );
    if (dev) await close(dev);
    const read = await sideBySide(
      async () => {
        dropCaches();
      },
      async () => dd(`if=${disk}`, 'of=/dev/null', 'bs=1M'),
      async () => dd(`if=${disk}`, 'of=/dev/null', 'bs=1M'),
    );
    const readMbs = mbs(SIZE, Math.min(read.ours, read.ref));
    row(`hydrate ${SIZE / MiB} MiB`, SIZE, t, 'dd bs=1M conv=fdatasync (disk → fresh file)', { diskReadMbs: readMbs });
    rows.push({
      workload: `  (disk read alone)`, ours: mbs(SIZE, t.ours), ref: readMbs, refName: 'dd bs=1M disk → /dev/null', ratio: +(mbs(SIZE, t.ours) / readMbs).toFixed(2),
      oursMedian: mbs(SIZE, t.oursMedian), refMedian: mbs(SIZE, median([...read.all.ours, ...read.all.ref])),
      msRef: [...read.all.ours, ...read.all.ref].map(Math.round),
    });
    const last = rows[rows.length - 1];
    last.ratioMedian = +(last.oursMedian / last.refMedian).toFixed(2);
  }

  const loadAtEnd = loadavg().map((x) => +x.toFixed(2));
  printTable(
    [
      { key: 'workload', title: 'workload' },
      { key: 'ours', title: 'ulobdev best' },
      { key: 'ref', title: 'ref best' },
      { key: 'ratio', title: 'ratio best' },
      { key: 'oursMedian', title: 'ulobdev median' },
      { key: 'refMedian', title: 'ref median' },
      { key: 'ratioMedian', title: 'ratio median' },
      { key: 'refName', title: 'reference' },
    ],
    rows,
    {
      title: `bench/flush.js: ${SIZE / MiB} MiB on ${opts.dir}, MB/s, best and median of ${REPS} interleaved runs each`,
      notes: [
        ...rows.filter((r) => r.msOurs).map((r) => `${r.workload.trim()}: ms ulobdev ${r.msOurs.join(' ')} / ref ${r.msRef.join(' ')}; CPU ms (user+sys, median) ulobdev ${r.cpuOurs} / ref ${r.cpuRef}`),
        ...(ONLY.has('contiguous') || ONLY.has('random')
          ? [flushPages ? 'flush runs: synced, page cache dropped, cache file read back in before each run of either side' : 'flush runs: page cache NOT dropped (not root): the state left by the run before']
          : []),
        ...(ONLY.has('hydrate') ? [dropped ? 'page cache dropped before each hydration run' : 'page cache NOT dropped (not root): hydration reads come from memory'] : []),
        `load average ${loadAtStart.join(' ')} at start, ${loadAtEnd.join(' ')} at end (${cpus().length} CPUs)`,
      ],
    },
  );
  writeJson(opts.json, {
    at: new Date().toISOString(),
    machine: { cpus: cpus().length, cpu: cpus()[0]?.model, memory: totalmem(), kernel: release(), node: process.version, loadAverage: { start: loadAtStart, end: loadAtEnd } },
    params: { size: SIZE, reps: REPS, randomBlocks: RANDOM_BLOCKS, only: [...ONLY], dir: opts.dir, pageCacheDropped: dropped, flushPageCacheSame: flushPages },
    rows,
  });
} finally {
  cleanup();
}
