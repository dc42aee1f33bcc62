#!/usr/bin/env node
// Engine throughput against raw positioned I/O on the same files, in one run.
//
//   npx tsc -p tsconfig.json && node bench/engine.js [--size 256M] [--seconds 1] [--flush-size SIZE]
//                                                     [--json bench/results/engine.json] [--dir /var/tmp]
//
// Every row runs the same workload twice: through CacheEngine (CacheStore on posix storage, a
// regular backing file, mode 'writeback') and as bare native.pread/pwrite on the same file, with the
// same per-worker buffers, the same offset sequence and the same queue depth. Both sides share one
// warm page cache: there is no portable per-file way to drop it from Node, so the numbers are CPU,
// syscall and fsync costs, not disk speeds. bench/README.md explains each row. Not a test: no
// assertions, exit code 0 unless the bench itself breaks.
import { closeSync, constants as fsc, existsSync, fstatSync, mkdtempSync, openSync, rmSync, statfsSync, writeSync, fdatasyncSync } from 'node:fs';
import { cpus, release, totalmem, loadavg, type as osType, arch, constants as osConstants } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { randomBytes, randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { printTable, writeJson } from './lib/table.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 4 * KiB;
const SEQ = MiB;
const FLUSH_IO = 4 * MiB; // flushDirty's default largest write (src/writeback/flusher.ts)
const QDS = [1, 16];
const FLUSH_REPS = 3;
const MAX_ROUNDS = 8;
const SLICES = 4;
const SEED = 0x5eed;

// ---------------------------------------------------------------------------------------------
// Arguments

function parseSize(text, name) {
  const m = /^(\d+)\s*([KMG]?)(i?B)?$/i.exec(String(text).trim());
  if (!m) fail(`${name} must be a size like 256M, 1G or 65536, got ${JSON.stringify(text)}`);
  const mult = { '': 1, K: KiB, M: MiB, G: 1024 * MiB }[m[2].toUpperCase()];
  return Number(m[1]) * mult;
}

function fail(message) {
  process.stderr.write(`bench/engine.js: ${message}\n`);
  process.exit(2);
}

let opts;
try {
  ({ values: opts } = parseArgs({
    options: {
      size: { type: 'string', default: '256M' },
      seconds: { type: 'string', default: '1' },
      'flush-size': { type: 'string' },
      json: { type: 'string', default: fileURLToPath(new URL('./results/engine.json', import.meta.url)) },
      dir: { type: 'string', default: '/var/tmp' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  }));
} catch (err) {
  fail(`${err.message}; see --help`);
}
if (opts.help) {
  process.stdout.write(
    'usage: node bench/engine.js [--size 256M] [--seconds 1] [--flush-size SIZE] [--json PATH] [--dir /var/tmp]\n' +
      '  --size        backing device size (multiple of 1M, at least 32M)\n' +
      '  --seconds     length of each timed measurement; each row times engine and raw once each\n' +
      '  --flush-size  contiguous dirty data per flushDirty measurement (default: the whole device)\n' +
      '  --json        where the JSON result goes (default bench/results/engine.json)\n' +
      '  --dir         where the scratch files go (a real filesystem, not tmpfs)\n',
  );
  process.exit(0);
}
const SIZE = parseSize(opts.size, '--size');
const FLUSH_SIZE = opts['flush-size'] === undefined ? SIZE : parseSize(opts['flush-size'], '--flush-size');
const SECONDS = Number(opts.seconds);
if (SIZE % MiB !== 0 || SIZE < 32 * MiB) fail('--size must be a multiple of 1M and at least 32M');
if (FLUSH_SIZE % MiB !== 0 || FLUSH_SIZE < MiB || FLUSH_SIZE > SIZE) fail('--flush-size must be a multiple of 1M, at most --size');
if (!(SECONDS > 0 && SECONDS <= 600)) fail('--seconds must be a number in (0, 600]');
const WARMUP = Math.min(0.2, SECONDS / 5);
const BLOCKS = SIZE / BLOCK;

// ---------------------------------------------------------------------------------------------
// The project, from dist/ (tsc output) and build/Release (the addon dist/native/addon.js loads).

const root = fileURLToPath(new URL('..', import.meta.url));
for (const f of ['dist/cache/engine.js', 'dist/writeback/flusher.js', 'build/Release/ulob_native.node']) {
  if (!existsSync(join(root, f))) fail(`${f} is missing; build first (npx node-gyp rebuild && npx tsc -p tsconfig.json)`);
}
const native = await import('../dist/native/io.js');
const { CacheEngine } = await import('../dist/cache/engine.js');
const { CacheStore } = await import('../dist/cache/store.js');
const { Metadata } = await import('../dist/cache/metadata.js');
const { openBacking } = await import('../dist/source/backing.js');
const { flushDirty } = await import('../dist/writeback/flusher.js');

// ---------------------------------------------------------------------------------------------
// Scratch files: removed on every way out (normal end, error, SIGINT/SIGTERM/SIGHUP).

let scratch;
let loadAtStart;
function removeScratch() {
  if (!scratch) return;
  rmSync(scratch, { recursive: true, force: true });
  scratch = undefined;
}
process.on('exit', removeScratch);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    process.stderr.write(`\n${sig}: removing ${scratch ?? 'nothing'}\n`);
    removeScratch();
    process.exit(128 + osConstants.signals[sig]);
  });
}

const FS_MAGIC = { 0xef53: 'ext2/3/4', 0x58465342: 'xfs', 0x9123683e: 'btrfs', 0x01021994: 'tmpfs', 0x794c7630: 'overlayfs', 0x2fc12fc1: 'zfs', 0xf2f52010: 'f2fs' };

function progress(text) {
  process.stderr.write(`  ${text}\n`);
}

// ---------------------------------------------------------------------------------------------
// Offset sequences. Each factory returns next() -> offset, or null when exhausted. Engine and raw
// sides build the same sequence from the same seed.

function prng(seed) {
  let s = seed >>> 0 || 1;
  return () => {
    // xorshift32
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
}

const sequences = {
  /** 4 KiB-aligned offsets, uniform over the device, endless. */
  random4k: () => {
    const rand = prng(SEED);
    return () => (rand() % BLOCKS) * BLOCK;
  },
  /** Every 4 KiB block once, in a seeded random order; then exhausted. */
  shuffled4k: () => {
    const rand = prng(SEED + 1);
    const order = new Uint32Array(BLOCKS);
    for (let i = 0; i < BLOCKS; i++) order[i] = i;
    for (let i = BLOCKS - 1; i > 0; i--) {
      const j = rand() % (i + 1);
      const t = order[i];
      order[i] = order[j];
      order[j] = t;
    }
    let i = 0;
    return () => (i < BLOCKS ? order[i++] * BLOCK : null);
  },
  /** 1 MiB steps from 0 to the end of the device, then wrapping, endless. */
  seq1m: () => {
    let pos = 0;
    return () => {
      const off = pos;
      pos = pos + SEQ >= SIZE ? 0 : pos + SEQ;
      return off;
    };
  },
  /** One pass of 1 MiB steps over the device; then exhausted. */
  seq1mOnce: (limit = SIZE) => {
    let pos = 0;
    return () => {
      if (pos >= limit) return null;
      const off = pos;
      pos += SEQ;
      return off;
    };
  },
};

/** The same sequence, restarted whenever it runs out (the raw side of exhausting workloads). */
function cycled(factory) {
  let next = factory();
  return () => {
    let off = next();
    if (off === null) {
      next = factory();
      off = next();
    }
    return off;
  };
}

// ---------------------------------------------------------------------------------------------
// Measurement: `qd` workers, each awaiting one op at a time, share one offset sequence.

let quiesce = async () => undefined;

async function drive(qd, seconds, next, op, latencies) {
  const deadline = performance.now() + seconds * 1000;
  let ops = 0;
  const worker = async (w) => {
    while (performance.now() < deadline) {
      const off = next();
      if (off === null) return;
      const t = performance.now();
      await op(off, w);
      latencies?.push(performance.now() - t);
      ops++;
    }
  };
  await Promise.all(Array.from({ length: qd }, (_, w) => worker(w)));
  return ops;
}

/** Quiesce (sync both files), warm up (not counted), then run for SECONDS. */
async function measure({ qd, next, op, bytesPerOp, warmup = WARMUP }) {
  await quiesce();
  if (warmup > 0) await drive(qd, warmup, next, op, null);
  const latencies = [];
  const t0 = performance.now();
  const ops = await drive(qd, SECONDS, next, op, latencies);
  return summarize(ops, ops * bytesPerOp, (performance.now() - t0) / 1000, latencies);
}

/**
 * Engine and raw sides of one row, interleaved in SLICES slices of SECONDS / SLICES each, in the
 * order E R R E E R R E: on a shared machine both sides then see the same background load, and a
 * load that drifts over the row cancels out.
 */
async function measurePair({ qd, bytesPerOp, engine, raw }) {
  const sides = [engine, raw].map((s) => ({ ...s, latencies: [], ops: 0, elapsed: 0 }));
  await quiesce();
  for (const s of sides) await drive(qd, WARMUP, s.next, s.op, null);
  for (let i = 0; i < SLICES; i++) {
    for (const s of i % 2 === 0 ? sides : [...sides].reverse()) {
      await quiesce();
      const t0 = performance.now();
      s.ops += await drive(qd, SECONDS / SLICES, s.next, s.op, s.latencies);
      s.elapsed += (performance.now() - t0) / 1000;
    }
  }
  const [e, r] = sides.map((s) => summarize(s.ops, s.ops * bytesPerOp, s.elapsed, s.latencies));
  return { engine: e, raw: r };
}

/**
 * For workloads that use up their state (cold blocks, clean blocks): rounds of `factory()` until
 * SECONDS of measured time or MAX_ROUNDS, with `prepare()` (not timed) before each round to make
 * the state fresh again. No warm-up: it would use up state too, and the JIT is warm by then.
 */
async function measureRounds({ qd, factory, op, bytesPerOp, prepare }) {
  const latencies = [];
  let ops = 0;
  let elapsed = 0;
  let rounds = 0;
  let prepareMs = 0;
  while (rounds < MAX_ROUNDS && elapsed < SECONDS) {
    const t = performance.now();
    await prepare();
    prepareMs += performance.now() - t;
    await quiesce();
    const t0 = performance.now();
    ops += await drive(qd, SECONDS - elapsed, factory(), op, latencies);
    elapsed += (performance.now() - t0) / 1000;
    rounds++;
  }
  return { ...summarize(ops, ops * bytesPerOp, elapsed, latencies), rounds, prepareMs: round(prepareMs, 0) };
}

function summarize(ops, bytes, elapsed, latencies) {
  const sorted = Float64Array.from(latencies).sort();
  const pct = (p) => (sorted.length ? round(sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] * 1000, 1) : null);
  return {
    ops,
    bytes,
    seconds: round(elapsed, 3),
    iops: round(ops / elapsed, 0),
    mbps: round(bytes / elapsed / 1e6, 1),
    latencyUs: { p50: pct(0.5), p99: pct(0.99), max: pct(1) },
  };
}

function round(x, digits) {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

function median(values) {
  const s = [...values].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const dir = resolve(opts.dir);
  const fsType = FS_MAGIC[Number(statfsSync(dir).type)] ?? `0x${Number(statfsSync(dir).type).toString(16)}`;
  if (fsType === 'tmpfs') process.stderr.write(`warning: ${dir} is tmpfs; fdatasync is free there and the numbers mean little\n`);
  scratch = mkdtempSync(join(dir, 'ulobdev-bench-'));
  loadAtStart = loadavg().map((x) => round(x, 2));
  process.stderr.write(`bench/engine.js: ${SIZE / MiB} MiB device, ${SECONDS} s per measurement, scratch ${scratch} (${fsType})\n`);

  // Every 4 KiB block of the device, and every buffer the bench writes, holds the same random
  // pattern: raw writes beside the engine then never make cache and backing disagree, and a
  // filesystem without compression or dedup pays the same for it as for varied data.
  const pattern = randomBytes(BLOCK);
  const filled = (len) => {
    const b = native.alignedBuffer(len);
    for (let o = 0; o < len; o += BLOCK) pattern.copy(b, o);
    return b;
  };
  // One buffer per worker and size; the engine and raw sides use the very same ones.
  const workerBuffers = (len) => Array.from({ length: Math.max(...QDS) }, () => filled(len));
  const bufs = { [BLOCK]: workerBuffers(BLOCK), [SEQ]: workerBuffers(SEQ) };

  const backingPath = join(scratch, 'backing.img');
  const paths = { cache: join(scratch, 'cache.img'), bitmap: join(scratch, 'cache.bitmap'), metadata: join(scratch, 'cache.sqlite') };
  const setup = {};
  let t = performance.now();
  {
    const fd = openSync(backingPath, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL, 0o600);
    const chunk = filled(SEQ);
    for (let o = 0; o < SIZE; o += SEQ) writeSync(fd, chunk, 0, SEQ, o);
    fdatasyncSync(fd);
    closeSync(fd);
  }
  setup.createBackingMs = round(performance.now() - t, 0);

  let engine;
  let source;
  const fds = [];
  try {
    source = await openBacking(backingPath, { writable: true });
    const store = await CacheStore.open({
      paths,
      backing: { size: source.size, id: source.id, description: source.description },
      mode: 'writeback',
    });
    engine = new CacheEngine(store, source); // production defaults: 1 s auto-commit, 1 MiB fills
    const cacheFd = openSync(paths.cache, fsc.O_RDWR);
    const backingFd = openSync(backingPath, fsc.O_RDWR);
    fds.push(cacheFd, backingFd);
    if (fstatSync(cacheFd).size !== SIZE) throw new Error(`cache file is ${fstatSync(cacheFd).size} bytes, expected ${SIZE}`);
    // Each measurement starts with no dirty page cache on either file, so no side pays for the
    // writeback of the one before it.
    quiesce = async () => {
      await native.fdatasync(cacheFd);
      await native.fdatasync(backingFd);
    };

    // The new cache file is fallocated (unwritten extents, no pages cached). Writing it once puts
    // it in the same state as the backing file, so the cold rows measure the engine, not the
    // filesystem's first touch of a fresh file. The content of missing blocks is never read.
    t = performance.now();
    for (let o = 0; o < SIZE; o += SEQ) await native.pwrite(cacheFd, bufs[SEQ][0], 0, SEQ, o);
    setup.prewriteCacheMs = round(performance.now() - t, 0);

    const rows = [];
    const add = (row) => {
      row.ratio = row.raw.mbps > 0 ? round(row.engine.mbps / row.raw.mbps, 3) : null;
      rows.push(row);
    };
    const tag = (len) => (len === BLOCK ? '4k' : '1m');
    const label = (len) => (len === BLOCK ? '4 KiB random' : '1 MiB seq');
    const unit = (len) => (len === BLOCK ? 'IOPS' : 'MB/s');
    const endless = (len) => (len === BLOCK ? sequences.random4k : sequences.seq1m);
    const rawRead = (fd, len) => (off, w) => native.pread(fd, bufs[len][w], 0, len, off);
    const rawWrite = (fd, len) => (off, w) => native.pwrite(fd, bufs[len][w], 0, len, off);

    // --- cold read: misses fill from the backing file ------------------------------------------
    // Each round evicts every block (discard of clean blocks) and reads the device once.
    for (const qd of QDS) {
      progress(`cold read 1 MiB seq QD${qd}`);
      const e = await measureRounds({
        qd, factory: () => sequences.seq1mOnce(), bytesPerOp: SEQ, op: (off) => engine.read(off, SEQ),
        prepare: async () => {
          await engine.flush(); // commit the previous round's fills (one fdatasync, bitmap write)
          await engine.discard(0, SIZE);
        },
      });
      const r = await measure({ qd, next: sequences.seq1m(), bytesPerOp: SEQ, op: rawRead(backingFd, SEQ) });
      add({ id: `cold-read-1m-qd${qd}`, workload: `cold read 1 MiB seq (miss, fill), QD${qd}`, kind: 'cold-read', unit: 'MB/s', qd, engine: e, raw: r,
        rawIs: 'pread of the backing file' });
    }
    // Hydrate: a timed-out round may have left blocks missing; read the whole device once more.
    progress('hydrating the cache');
    {
      const next = sequences.seq1mOnce();
      for (let off = next(); off !== null; off = next()) await engine.read(off, SEQ);
    }
    await engine.flush();
    const st = engine.stats();
    if (st.presentBlocks !== BLOCKS) throw new Error(`after hydration ${st.presentBlocks} of ${BLOCKS} blocks are present`);

    // --- warm reads: every block present -------------------------------------------------------
    for (const len of [BLOCK, SEQ]) {
      for (const qd of QDS) {
        progress(`warm read ${label(len)} QD${qd}`);
        const { engine: e, raw: r } = await measurePair({
          qd, bytesPerOp: len,
          engine: { next: endless(len)(), op: (off) => engine.read(off, len) },
          raw: { next: endless(len)(), op: rawRead(cacheFd, len) },
        });
        add({ id: `read-${tag(len)}-qd${qd}`, workload: `warm read ${label(len)}, QD${qd}`, kind: 'read', unit: unit(len), qd,
          engine: e, raw: r, rawIs: 'pread of the cache file' });
      }
    }

    // --- probe beside the warm-read rows --------------------------------------------------------
    progress('probe: reads into a fresh Buffer per request');
    const probes = {};
    {
      // What engine.read adds at least: a fresh Buffer per request instead of the caller's.
      for (const len of [BLOCK, SEQ]) {
        const s = await measure({ qd: 1, next: endless(len)(), bytesPerOp: len, op: (off) => native.pread(cacheFd, Buffer.allocUnsafe(len), 0, len, off) });
        probes[`rawReadFreshBuffer${tag(len)}`] = { iops: s.iops, mbps: s.mbps };
      }
    }

    // --- first writes: every write lands on clean present blocks (an intent transaction) ------
    // 4 KiB: each block of the device at most once, in random order. 1 MiB: one pass over the
    // device per round. Between rounds flushDirty makes every block clean again (not timed).
    const cleanAll = async () => {
      if (engine.stats().dirtyBlocks > 0) await flushDirty(engine);
    };
    for (const len of [BLOCK, SEQ]) {
      for (const qd of QDS) {
        progress(`first write ${label(len)} QD${qd}`);
        const factory = len === BLOCK ? sequences.shuffled4k : () => sequences.seq1mOnce();
        const e = await measureRounds({ qd, factory, bytesPerOp: len, op: (off, w) => engine.write(off, bufs[len][w]), prepare: cleanAll });
        await cleanAll();
        const r = await measure({ qd, next: cycled(factory), bytesPerOp: len, op: rawWrite(cacheFd, len) });
        add({ id: `first-write-${tag(len)}-qd${qd}`, workload: `first write ${label(len)} (clean→dirty), QD${qd}`, kind: 'first-write', unit: unit(len), qd,
          engine: e, raw: r, rawIs: 'pwrite of the cache file, no sync' });
      }
    }

    // --- probes beside the first-write rows, under the same disk conditions ------------------
    // What one intent costs on its own, and what a synced 4 KiB write costs, for comparison.
    progress('probes: SQLite intent transaction, pwrite + fdatasync');
    await quiesce();
    {
      const meta = Metadata.create(join(scratch, 'probe.sqlite'), { uuid: randomUUID(), blockSize: BLOCK, backingSize: SIZE, backingId: 'bench-probe' }, 'writeback');
      try {
        let i = 0;
        const t0 = performance.now();
        const deadline = t0 + SECONDS * 1000;
        while (performance.now() < deadline) meta.addDirty([{ start: (i++ * 7919) % BLOCKS, count: 1 }]);
        probes.intentTxnUs = round(((performance.now() - t0) * 1000) / i, 1);
      } finally {
        meta.close();
      }
    }
    {
      const s = await measure({ qd: 1, warmup: 0, next: sequences.random4k(), bytesPerOp: BLOCK, op: async (off) => {
        await native.pwrite(cacheFd, bufs[BLOCK][0], 0, BLOCK, off);
        await native.fdatasync(cacheFd);
      } });
      probes.pwriteFdatasyncUs = round((s.seconds * 1e6) / s.ops, 1);
    }

    // --- probe: cache hits while a stream of first writes runs beside them ---------------------
    progress('probe: 4 KiB hit reads beside 4 KiB first writes');
    {
      await quiesce();
      const writes = sequences.shuffled4k();
      let stop = false;
      let written = 0;
      const writer = (async () => {
        for (let off = writes(); !stop && off !== null; off = writes()) {
          await engine.write(off, bufs[BLOCK][0]);
          written++;
        }
      })();
      const latencies = [];
      const t0 = performance.now();
      const ops = await drive(1, SECONDS, sequences.random4k(), (off) => engine.read(off, BLOCK), latencies);
      const elapsed = (performance.now() - t0) / 1000;
      stop = true;
      await writer;
      const s = summarize(ops, ops * BLOCK, elapsed, latencies);
      probes.hitReadsBesideFirstWrites = { readIops: s.iops, readLatencyUs: s.latencyUs, firstWritesPerSecond: round(written / elapsed, 0) };
      await cleanAll();
    }

    // --- rewrites: every block already dirty ---------------------------------------------------
    progress('dirtying the whole device');
    t = performance.now();
    {
      const next = sequences.seq1mOnce();
      for (let off = next(); off !== null; off = next()) await engine.write(off, bufs[SEQ][0]);
    }
    setup.dirtyAllMs = round(performance.now() - t, 0);
    if (engine.stats().dirtyBlocks !== BLOCKS) throw new Error('not every block is dirty before the rewrite rows');
    for (const len of [BLOCK, SEQ]) {
      for (const qd of QDS) {
        progress(`rewrite ${label(len)} QD${qd}`);
        const { engine: e, raw: r } = await measurePair({
          qd, bytesPerOp: len,
          engine: { next: endless(len)(), op: (off, w) => engine.write(off, bufs[len][w]) },
          raw: { next: endless(len)(), op: rawWrite(cacheFd, len) },
        });
        add({ id: `rewrite-${tag(len)}-qd${qd}`, workload: `rewrite ${label(len)} (already dirty), QD${qd}`, kind: 'rewrite', unit: unit(len), qd,
          engine: e, raw: r, rawIs: 'pwrite of the cache file, no sync' });
      }
    }

    // --- flush: N MiB of contiguous dirty data back to the backing file ------------------------
    progress(`flush: ${FLUSH_REPS}× ${FLUSH_SIZE / MiB} MiB`);
    await cleanAll();
    {
      const engineRuns = [];
      const rawRuns = [];
      const chunk = filled(FLUSH_IO);
      for (let rep = 0; rep < FLUSH_REPS; rep++) {
        const next = sequences.seq1mOnce(FLUSH_SIZE);
        for (let off = next(); off !== null; off = next()) await engine.write(off, bufs[SEQ][0]);
        await engine.flush();
        if (engine.stats().dirtyBlocks !== FLUSH_SIZE / BLOCK) throw new Error('unexpected dirty count before the flush row');
        await quiesce();
        t = performance.now();
        const res = await flushDirty(engine);
        engineRuns.push(summarize(1, res.bytes, (performance.now() - t) / 1000, []));
        await quiesce();
        t = performance.now();
        for (let off = 0; off < FLUSH_SIZE; off += FLUSH_IO) await native.pwrite(backingFd, chunk, 0, Math.min(FLUSH_IO, FLUSH_SIZE - off), off);
        await native.fdatasync(backingFd);
        rawRuns.push(summarize(1, FLUSH_SIZE, (performance.now() - t) / 1000, []));
      }
      const pick = (runs) => {
        const m = median(runs.map((r) => r.mbps));
        return { ...runs.find((r) => r.mbps === m), repsMbps: runs.map((r) => r.mbps) };
      };
      add({ id: 'flush', workload: `flushDirty ${FLUSH_SIZE / MiB} MiB contiguous (median of ${FLUSH_REPS})`, kind: 'flush', unit: 'MB/s', qd: 1,
        engine: pick(engineRuns), raw: pick(rawRuns), rawIs: `pwrite of the backing file in ${FLUSH_IO / MiB} MiB pieces + fdatasync` });
    }

    t = performance.now();
    await engine.close();
    setup.closeMs = round(performance.now() - t, 0);
    engine = undefined;

    report(rows, probes, setup, fsType);
  } finally {
    if (engine) await engine.close().catch(() => undefined);
    if (source) await source.close().catch(() => undefined);
    for (const fd of fds) closeSync(fd);
    removeScratch();
  }
}

// ---------------------------------------------------------------------------------------------
// Output

function fmt(side, unit) {
  const n = unit === 'IOPS' ? side.iops : side.mbps;
  return `${n.toLocaleString('en-US', { maximumFractionDigits: unit === 'IOPS' || n >= 100 ? 0 : 1 })} ${unit}`;
}

function report(rows, probes, setup, fsType) {
  const usPerOp = (id, side) => {
    const r = rows.find((x) => x.id === id);
    return r ? round(1e6 / r[side].iops, 1) : null;
  };
  const derived = {
    readOverheadUs: round(usPerOp('read-4k-qd1', 'engine') - usPerOp('read-4k-qd1', 'raw'), 1),
    rewriteOverheadUs: round(usPerOp('rewrite-4k-qd1', 'engine') - usPerOp('rewrite-4k-qd1', 'raw'), 1),
    firstWriteExtraUs: round(usPerOp('first-write-4k-qd1', 'engine') - usPerOp('rewrite-4k-qd1', 'engine'), 1),
  };
  const p50 = (id) => rows.find((x) => x.id === id)?.engine.latencyUs.p50;
  const hit = { iops: probes.hitReadsBesideFirstWrites.readIops, readLatencyUs: probes.hitReadsBesideFirstWrites.readLatencyUs };

  printTable(
    [
      { key: 'workload', title: 'workload', align: 'left' },
      { key: 'engine', title: 'engine', align: 'right' },
      { key: 'raw', title: 'raw', align: 'right' },
      { key: 'ratio', title: 'engine/raw', align: 'right' },
    ],
    rows.map((r) => ({ workload: r.workload, engine: fmt(r.engine, r.unit), raw: fmt(r.raw, r.unit), ratio: r.ratio?.toFixed(2) })),
    {
      title:
        `ulobdev engine vs raw positioned I/O: ${SIZE / MiB} MiB device on ${fsType}, ${SECONDS} s per side, ` +
        `node ${process.version}, ${cpus().length} CPUs, UV_THREADPOOL_SIZE=${process.env.UV_THREADPOOL_SIZE ?? 4}, ` +
        `load average ${loadAtStart.join(' ')} at start, ${loadavg().map((x) => x.toFixed(2)).join(' ')} at end\n` +
        'Both sides run on the same warm page cache (no portable per-file drop): reads and unsynced writes are\n' +
        'memory + syscall + JS costs; fdatasync and SQLite commits do reach the disk. MB/s = 10^6 bytes/s.\n',
      notes: [
        '',
        `Per 4 KiB request at QD1: the engine adds ${derived.readOverheadUs} µs to a read and ${derived.rewriteOverheadUs} µs to a rewrite; a first`,
        `write costs ${derived.firstWriteExtraUs} µs more than a rewrite. Probes: one SQLite intent transaction (WAL, synchronous=FULL)`,
        `${probes.intentTxnUs} µs; 4 KiB pwrite + fdatasync of the cache file ${probes.pwriteFdatasyncUs} µs; raw pread into a fresh`,
        `Buffer per request (as engine.read allocates) ${fmt(probes.rawReadFreshBuffer4k, 'IOPS')} (4 KiB), ${fmt(probes.rawReadFreshBuffer1m, 'MB/s')} (1 MiB).`,
        `First write latency p50: ${p50('first-write-4k-qd1')} µs at QD1, ${p50('first-write-4k-qd16')} µs at QD16 (intent transactions run one at a time).`,
        `4 KiB cache hits at QD1 beside a QD1 stream of first writes: ${fmt(hit, 'IOPS')}, p50 ${hit.readLatencyUs.p50} µs, p99 ${hit.readLatencyUs.p99} µs ` +
          `(alone: ${fmt(rows.find((x) => x.id === 'read-4k-qd1').engine, 'IOPS')}, p50 ${p50('read-4k-qd1')} µs).`,
        ...rows.filter((r) => r.engine.rounds > 1).map((r) => `${r.workload}: engine side measured over ${r.engine.rounds} rounds (${r.engine.ops} ops, ${r.engine.seconds} s).`),
      ],
    },
  );

  const cpu = cpus();
  writeJson(resolve(opts.json), {
    bench: 'engine',
    date: new Date().toISOString(),
    machine: {
      cpus: cpu.length,
      cpuModel: cpu[0]?.model ?? null,
      memoryBytes: totalmem(),
      os: osType(),
      kernel: release(),
      arch: arch(),
      node: process.version,
      uvThreadpoolSize: Number(process.env.UV_THREADPOOL_SIZE ?? 4),
      loadAverage: { start: loadAtStart, end: loadavg().map((x) => round(x, 2)) },
      scratchFs: fsType,
    },
    params: { sizeBytes: SIZE, seconds: SECONDS, warmupSeconds: WARMUP, flushBytes: FLUSH_SIZE, flushReps: FLUSH_REPS, queueDepths: QDS, blockSize: BLOCK, seqBytes: SEQ, seed: SEED, dir: resolve(opts.dir) },
    pageCache: 'warm on both sides; not dropped (no portable per-file drop)',
    rows,
    probes,
    derived,
    setup,
  });
  process.stderr.write(`wrote ${resolve(opts.json)}\n`);
}

main().catch((err) => {
  removeScratch();
  process.stderr.write(`bench/engine.js failed: ${err?.stack ?? err}\n`);
  process.exitCode = 1;
});
