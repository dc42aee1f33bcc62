#!/usr/bin/env node
// The simulation's metadata (SQLite, synchronous=FULL) goes to tmpfs: its fsyncs on this machine's
// disk took most of the run's time (2,700 history samples) and measure nothing of the model.
if (process.env.TMPDIR === undefined && (await import('node:fs')).existsSync('/dev/shm')) process.env.TMPDIR = '/dev/shm';
// A simulated day of laptop use against a simulated hard disk (src/writeback/disk-model.ts): what
// ulobdev's write-back policy does to the disk, side by side with what users do today.
//
//   npx tsc -p tsconfig.json && node bench/power.js [--seed 1] [--json bench/results/power.json]
//
// The trace follows the desktop/notebook findings of Riska and Riedel, "Disk Drive Level Workload
// Characterization" (USENIX ATC 2006): the disk is idle most of the time and requests come in
// bursts separated by long idle gaps. The parameters are ours and listed in TRACE below: work from
// 08:30 to 12:30 and 13:30 to 18:00, an evening session 20:00-22:30, nothing at night; a burst
// every few minutes (exponential gaps) of a few writes (a saved document, a mail folder, a build)
// and reads, of which 85 % hit files read earlier in the day or in a warm set (cached) and 15 %
// are new files (misses that must reach the disk). The same trace, seeded, goes through:
//   ulobdev     the real store, engine and FlushScheduler (power-sim.ts): --flush '*/30 * * * *'
//               --spindown --standby-timeout 10m, opportunistic flushes, under a fake clock
//   hdparm -S   the disk alone, standby timer 10 min (hdparm -S 120): writes reach it within the
//               kernel's 30 s dirty expiry, reads of files not in the page cache reach it at once
//   laptop_mode writes held up to 10 min (dirty_expire 600 s) or until a read spins the disk up,
//               standby timer 10 min
//   bcache-like a write-back cache that writes back whenever the disk has been quiet for 30 s
//               (bcache's writeback thread runs whenever there is dirty data), standby timer 10 min
// Reported per policy: spin-ups (and why), hours in standby, the largest dirty set (bytes at risk
// if the flash or RAM holding them is lost) and the longest time a write waited for the disk.
// Goal for ulobdev: one spin-up per flush window with dirty data, none while clean, none caused by
// its own queries, fewer spin-ups than every alternative. Not a test: it asserts nothing.
import { parseArgs } from 'node:util';
import { cpus, totalmem, release } from 'node:os';
import FakeTimers from '@sinonjs/fake-timers';
import { printTable, writeJson } from './lib/table.js';

const { values: opts } = parseArgs({
  options: {
    seed: { type: 'string', default: '1' },
    json: { type: 'string', default: new URL('./results/power.json', import.meta.url).pathname },
  },
});

const S = 1000;
const MIN = 60 * S;
const HOUR = 60 * MIN;
const KiB = 1024;
const MiB = 1024 * KiB;
const DISK_BYTES = 64 * 1024 * MiB; // 64 GiB: the offsets the trace touches
const DAY = 24 * HOUR;

// --- the trace -------------------------------------------------------------------------------
const TRACE = {
  sessions: [
    [8.5 * HOUR, 12.5 * HOUR],
    [13.5 * HOUR, 18 * HOUR],
    [20 * HOUR, 22.5 * HOUR],
  ],
  meanGapMs: 4 * MIN, // between bursts, exponential
  writesPerBurst: [1, 6], // uniform
  writeBytes: [16 * KiB, 2 * MiB], // log-uniform per write
  readsPerBurst: [0, 8],
  readBytes: [16 * KiB, 4 * MiB],
  missFraction: 0.15,
  warmSetBytes: 128 * MiB, // read before the day: cached by ulobdev, in the page cache for the others
  burstSpanMs: 20 * S, // a burst's requests spread over this long
};

function rng(seed) {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

function makeTrace(seed) {
  const r = rng(seed);
  const uniform = ([a, b]) => a + Math.floor(r() * (b - a + 1));
  const logUniform = ([a, b]) => Math.round(Math.exp(Math.log(a) + r() * (Math.log(b) - Math.log(a))) / 4096) * 4096 || 4096;
  const events = [];
  let nextNew = TRACE.warmSetBytes; // new files are laid out after the warm set
  const readBefore = [[0, TRACE.warmSetBytes]];
  let writeAt = 32 * 1024 * MiB;
  for (const [from, to] of TRACE.sessions) {
    for (let t = from + -Math.log(1 - r()) * TRACE.meanGapMs; t < to; t += -Math.log(1 - r()) * TRACE.meanGapMs) {
      for (let i = 0, n = uniform(TRACE.writesPerBurst); i < n; i++) {
        const bytes = logUniform(TRACE.writeBytes);
        events.push({ at: Math.round(t + r() * TRACE.burstSpanMs), op: 'write', offset: writeAt, bytes });
        writeAt += bytes;
      }
      for (let i = 0, n = uniform(TRACE.readsPerBurst); i < n; i++) {
        const bytes = logUniform(TRACE.readBytes);
        let offset;
        if (r() < TRACE.missFraction) {
          offset = nextNew;
          nextNew += bytes;
          readBefore.push([offset, bytes]);
          events.push({ at: Math.round(t + r() * TRACE.burstSpanMs), op: 'read', offset, bytes, miss: true });
        } else {
          const [start, len] = readBefore[Math.floor(r() * readBefore.length)];
          offset = start + Math.floor((r() * Math.max(0, len - bytes)) / 4096) * 4096;
          events.push({ at: Math.round(t + r() * TRACE.burstSpanMs), op: 'read', offset, bytes: Math.min(bytes, len), miss: false });
        }
      }
    }
  }
  return events.sort((a, b) => a.at - b.at);
}

// --- the policies ------------------------------------------------------------------------------
const { DiskModel } = await import('../dist/writeback/disk-model.js');
const { simulate } = await import('../dist/writeback/power-sim.js');

const START = new Date('2026-03-02T00:00:00').getTime();

/**
 * Runs `fn(clock, advance)` under a fake clock starting at midnight. advance(ms) moves the clock in
 * 1 s steps, fires the timers due (sinon's synchronous tick) and lets every microtask run after
 * each step (one real setImmediate): the whole simulation is timers and microtasks (in-memory
 * files, synchronous SQLite), so this is exact to the second and much faster than tickAsync,
 * which yields a real timer turn per fired timer.
 */
async function underFakeClock(fn) {
  const clock = FakeTimers.install({ now: START, toFake: ['setTimeout', 'clearTimeout', 'setInterval', 'clearInterval', 'Date'] });
  const advance = async (ms) => {
    for (let left = ms; left > 0; ) {
      const d = Math.min(1000, left);
      clock.tick(d);
      left -= d;
      await new Promise((resolve) => setImmediate(resolve));
    }
    if (ms === 0) await new Promise((resolve) => setImmediate(resolve));
  };
  try {
    return await fn(clock, advance);
  } finally {
    clock.uninstall();
  }
}

async function ulobdev(trace) {
  return underFakeClock(async (clock, advance) => {
    const r = await simulate({
      diskBytes: DISK_BYTES,
      blockSize: 4096, // the daemon's default (cache/layout.ts DEFAULT_BLOCK_SIZE)
      disk: { standbyTimeoutMs: 10 * MIN },
      policy: { cron: '*/30 * * * *', spindown: true, opportunistic: true, tickMs: 5000 },
      trace: trace.map(({ at, op, offset, bytes }) => ({ at, op, offset, bytes })),
      cached: [[0, TRACE.warmSetBytes]],
      durationMs: DAY,
      advance,
    });
    return {
      spinUps: r.disk.spinUps,
      spinUpsBy: r.disk.spinUpsBy,
      standbyHours: r.disk.ms.standby / HOUR,
      maxAtRiskBytes: r.maxDirtyBytes,
      maxUnflushedMs: r.maxUnflushedMs,
      flushes: r.flushes,
      flushReasons: r.flushReasons,
      selfCaused: r.events['spinup-self'] ?? 0,
    };
  });
}

/**
 * A policy that is not ulobdev, on the same disk model: `writeDelay(state)` says when dirty data
 * goes to the disk. Reads of the page cache (warm set, files read earlier) never touch the disk;
 * misses do, at once.
 */
async function kernelPolicy(trace, { expireMs, flushOnRead, quietMs }) {
  return underFakeClock(async (clock, advance) => {
    const disk = new DiskModel({ standbyTimeoutMs: 10 * MIN });
    const dirty = []; // { at, bytes }
    let maxAtRisk = 0;
    let maxUnflushed = 0;
    let lastIo = 0;
    const writeBack = async () => {
      if (dirty.length === 0) return;
      const bytes = dirty.reduce((n, d) => n + d.bytes, 0);
      const oldest = dirty[0].at;
      dirty.length = 0;
      await disk.access('write', bytes);
      maxUnflushed = Math.max(maxUnflushed, Date.now() - oldest);
    };
    let next = 0;
    for (let t = 0; t < DAY; ) {
      while (next < trace.length && trace[next].at <= t) {
        const e = trace[next++];
        lastIo = Date.now();
        if (e.op === 'write') dirty.push({ at: Date.now(), bytes: e.bytes });
        else if (e.miss) {
          const read = disk.access('read', e.bytes);
          if (flushOnRead) void read.then(writeBack);
          await advance(0);
        }
      }
      maxAtRisk = Math.max(maxAtRisk, dirty.reduce((n, d) => n + d.bytes, 0));
      // What is due: older than the expiry, or (bcache-like) the disk has been quiet long enough.
      const now = Date.now();
      if (dirty.length > 0 && (now - dirty[0].at >= expireMs || (quietMs !== undefined && now - lastIo >= quietMs))) void writeBack();
      const until = Math.min(DAY, t + 5 * S, next < trace.length ? trace[next].at : Infinity);
      await advance(until - t);
      t = until;
    }
    const r = disk.report();
    disk.close();
    return { spinUps: r.spinUps, spinUpsBy: r.spinUpsBy, standbyHours: r.ms.standby / HOUR, maxAtRiskBytes: maxAtRisk, maxUnflushedMs: maxUnflushed, flushes: null, selfCaused: 0 };
  });
}

// --- run -----------------------------------------------------------------------------------------
const trace = makeTrace(Number(opts.seed));
const writes = trace.filter((e) => e.op === 'write');
const misses = trace.filter((e) => e.op === 'read' && e.miss);
process.stderr.write(`trace: ${trace.length} requests, ${writes.length} writes (${(writes.reduce((n, e) => n + e.bytes, 0) / MiB).toFixed(0)} MiB), ${misses.length} reads of uncached files\n`);

const started = Date.now();
const results = {};
process.stderr.write('ulobdev ...\n');
results.ulobdev = await ulobdev(trace);
process.stderr.write('disk alone, hdparm -S 120 ...\n');
results['hdparm -S 120'] = await kernelPolicy(trace, { expireMs: 30 * S, flushOnRead: false });
process.stderr.write('laptop_mode ...\n');
results['laptop_mode 10 min'] = await kernelPolicy(trace, { expireMs: 10 * MIN, flushOnRead: true });
process.stderr.write('bcache-like ...\n');
results['write back when idle'] = await kernelPolicy(trace, { expireMs: Infinity, flushOnRead: false, quietMs: 30 * S });

const fmtMin = (ms) => `${(ms / MIN).toFixed(1)} min`;
const rows = Object.entries(results).map(([policy, r]) => ({
  policy,
  spinUps: r.spinUps,
  why: Object.entries(r.spinUpsBy).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`).join(', '),
  standby: `${r.standbyHours.toFixed(1)} h`,
  atRisk: `${(r.maxAtRiskBytes / MiB).toFixed(1)} MiB`,
  window: fmtMin(r.maxUnflushedMs),
  vs: r === results.ulobdev ? '' : `${(r.spinUps / Math.max(1, results.ulobdev.spinUps)).toFixed(1)}x`,
}));
printTable(
  [
    { key: 'policy', title: 'policy' },
    { key: 'spinUps', title: 'spin-ups' },
    { key: 'why', title: 'caused by' },
    { key: 'standby', title: 'in standby', align: 'right' },
    { key: 'atRisk', title: 'most at risk', align: 'right' },
    { key: 'window', title: 'longest unflushed', align: 'right' },
    { key: 'vs', title: 'spin-ups vs ulobdev', align: 'right' },
  ],
  rows,
  {
    title: `A simulated day (seed ${opts.seed}): ${trace.length} requests in bursts, 10 h of use; disk standby timer 10 min everywhere`,
    notes: [
      `ulobdev: ${results.ulobdev.flushes} flushes (${Object.entries(results.ulobdev.flushReasons).map(([k, n]) => `${k} ${n}`).join(', ')}), ${results.ulobdev.selfCaused} spin-ups caused by its own queries.`,
      'at risk: dirty data the disk lacks (on flash for ulobdev and bcache, in RAM for the kernel policies).',
    ],
  },
);
writeJson(opts.json, {
  machine: { cpus: cpus().length, cpu: cpus()[0]?.model, memory: totalmem(), kernel: release(), node: process.version },
  params: { seed: Number(opts.seed), trace: TRACE, diskBytes: DISK_BYTES, source: 'Riska and Riedel, Disk Drive Level Workload Characterization, USENIX ATC 2006 (desktop/notebook: idle, bursty)' },
  requests: trace.length,
  results,
  seconds: (Date.now() - started) / 1000,
});
