#!/usr/bin/env node
// ulobdev's NBD server against nbdkit's file plugin, serving the same backing file, in one run.
//
//   npx tsc -p tsconfig.json && node bench/nbd.js [--size 512M] [--seconds 6] [--reps 4] [--json PATH]
//                                                  [--dir /var/tmp] [--loop-dio on|off] [--no-profile]
//
// Both servers listen on a Unix socket and are driven by the same clients with the same flags:
// nbdcopy (whole export to null:), fio's libnbd engine (the server alone), and fio on a loop device
// bound to an nbdfuse file (ulobdev's /dev/loopN path). ulobdev runs as the CLI starts it
// (`ulobdev -c C -b B --writeback --daemon URL FILE`), on fresh caches (cold: reads miss and fill
// from the backing file) and on a filled one (warm: all hits). The backing file holds random data
// and stays in the page cache for both. Writes land in ulobdev's cache file and in nbdkit's backing
// file: that is the comparison, and the table says so. A last phase profiles a foreground daemon
// with `node --cpu-prof`. bench/README.md explains each row. Not a test: exit code 0 unless the
// bench itself breaks; everything it started is stopped by PID and its scratch directory removed
// on every way out (normal end, error, SIGINT/SIGTERM/SIGHUP).
import { execFile, spawn, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import {
  closeSync, copyFileSync, cpSync, existsSync, fdatasyncSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, readdirSync, rmSync, statfsSync, symlinkSync, writeSync,
} from 'node:fs';
import { arch, cpus, loadavg, release, totalmem, type as osType, constants as osConstants } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { printTable, writeJson } from './lib/table.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const QD = 16;
const CHECK_READS = 8;
const CHECK_LEN = 64 * KiB;
const CLK_TCK = 100; // Linux's USER_HZ for /proc/<pid>/stat on every architecture Node runs on
const TOP_FRAMES = 8;

// ---------------------------------------------------------------------------------------------
// Arguments

function fail(message) {
  process.stderr.write(`bench/nbd.js: ${message}\n`);
  process.exit(2);
}

function parseSize(text, name) {
  const m = /^(\d+)\s*([KMG]?)(i?B)?$/i.exec(String(text).trim());
  if (!m) fail(`${name} must be a size like 512M, 1G or 67108864, got ${JSON.stringify(text)}`);
  return Number(m[1]) * { '': 1, K: KiB, M: MiB, G: 1024 * MiB }[m[2].toUpperCase()];
}

let opts;
try {
  ({ values: opts } = parseArgs({
    options: {
      size: { type: 'string', default: '512M' },
      seconds: { type: 'string', default: '6' },
      reps: { type: 'string', default: '4' },
      json: { type: 'string', default: fileURLToPath(new URL('./results/nbd.json', import.meta.url)) },
      dir: { type: 'string', default: '/var/tmp' },
      'loop-dio': { type: 'string', default: 'on' },
      'no-profile': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  }));
} catch (err) {
  fail(`${err.message}; see --help`);
}
if (opts.help) {
  process.stdout.write(
    'usage: node bench/nbd.js [--size 512M] [--seconds 6] [--reps 4] [--json PATH] [--dir /var/tmp] [--loop-dio on|off] [--no-profile]\n' +
      '  --size        size of the backing file (multiple of 1M, at least 64M)\n' +
      '  --seconds     fio time per server for the 4 KiB random-read loop rows (libnbd rows, warm 1 MiB reads: half)\n' +
      '  --reps        runs per server of each whole-device pass (nbdcopy warm, fio 1 MiB write warm)\n' +
      '  --json        where the JSON result goes (default bench/results/nbd.json)\n' +
      '  --dir         where the scratch directory goes (a real filesystem)\n' +
      '  --loop-dio    losetup --direct-io for the fio loop rows (default on; off = plain losetup, whose reads\n' +
      '                are then served from the FUSE file\'s page cache after the first touch)\n' +
      '  --no-profile  skip the node --cpu-prof phase (about 20 s)\n',
  );
  process.exit(0);
}
const SIZE = parseSize(opts.size, '--size');
const SECONDS = Number(opts.seconds);
const REPS = Number(opts.reps);
if (SIZE % MiB !== 0 || SIZE < 64 * MiB) fail('--size must be a multiple of 1M and at least 64M');
if (!(Number.isInteger(SECONDS) && SECONDS >= 2 && SECONDS <= 600)) fail('--seconds must be a whole number from 2 to 600');
if (!(Number.isInteger(REPS) && REPS >= 1 && REPS <= 50)) fail('--reps must be a whole number from 1 to 50');
const PROFILE = !opts['no-profile'];
if (!['on', 'off'].includes(opts['loop-dio'])) fail('--loop-dio must be on or off');
const LOOP_DIO = opts['loop-dio'] === 'on';

// ---------------------------------------------------------------------------------------------
// Preconditions: the built CLI, root, and the programs the clients and nbdkit come from.

const root = fileURLToPath(new URL('..', import.meta.url));
// The run uses a private copy of dist/ and the addon (see snapshotApp), so a rebuild in the working
// tree while the bench runs neither breaks it nor mixes two builds in one table.
let appRoot = root;
let CLI = join(root, 'dist/cli/ulobdev.js');
for (const f of ['dist/cli/ulobdev.js', 'build/Release/ulob_native.node']) {
  if (!existsSync(join(root, f))) fail(`${f} is missing; build first (npx node-gyp rebuild && npx tsc -p tsconfig.json)`);
}
if (process.getuid?.() !== 0) fail('needs root (losetup, FUSE mounts); run it as root');
const PROGRAMS = { nbdkit: 'nbdkit', nbdcopy: 'libnbd-bin', nbdfuse: 'libnbd-bin', fio: 'fio', losetup: 'util-linux', fusermount3: 'fuse3' };
{
  const missing = Object.keys(PROGRAMS).filter((p) => spawnSync('sh', ['-c', `command -v ${p}`]).status !== 0);
  if (missing.length) fail(`missing ${missing.join(', ')}; run scripts/install-test-deps.sh (apt-get install ${[...new Set(missing.map((p) => PROGRAMS[p]))].join(' ')})`);
}
if (!existsSync('/dev/fuse')) fail('/dev/fuse is missing (modprobe fuse)');

// ---------------------------------------------------------------------------------------------
// Everything started here is recorded, and stopped by PID on every way out.

const live = {
  scratch: undefined,
  loops: new Set(), // /dev/loopN bound by us
  mounts: new Set(), // nbdfuse mount directories
  children: new Set(), // child processes we spawned and that must not outlive us (nbdkit, nbdfuse, profiled daemon)
  daemons: new Set(), // { url, runDir, pid } of ulobdev daemons started with --daemon
};

function isAlive(pid) {
  if (!pid) return false;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/** PIDs of processes whose command line contains `text` (a path under our mkdtemp directory). */
function pidsRunning(text) {
  const pids = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${name}/cmdline`, 'utf8').includes(text)) pids.push(Number(name));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

function sleepSync(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function killQuietly(pid, signal) {
  try {
    process.kill(pid, signal);
  } catch {
    // gone already
  }
}

/** Synchronous, for 'exit' and signal handlers; the normal path tears down asynchronously first. */
function cleanupSync() {
  for (const dev of live.loops) spawnSync('losetup', ['-d', dev], { stdio: 'ignore', timeout: 10_000 });
  live.loops.clear();
  for (const mnt of live.mounts) {
    if (spawnSync('fusermount3', ['-u', mnt], { stdio: 'ignore', timeout: 10_000 }).status !== 0) {
      spawnSync('fusermount3', ['-u', '-z', mnt], { stdio: 'ignore', timeout: 10_000 });
    }
  }
  live.mounts.clear();
  const pids = [];
  for (const d of live.daemons) {
    if (d.pid) pids.push(d.pid);
    else pids.push(...pidsRunning(d.url)); // attach did not finish: find the daemon by its unique socket path
  }
  for (const c of live.children) pids.push(c.pid);
  live.daemons.clear();
  live.children.clear();
  for (const pid of pids) if (isAlive(pid)) killQuietly(pid, 'SIGTERM');
  const deadline = Date.now() + 15_000;
  while (pids.some(isAlive) && Date.now() < deadline) sleepSync(50);
  for (const pid of pids) if (isAlive(pid)) killQuietly(pid, 'SIGKILL');
  if (live.scratch) {
    try {
      rmSync(live.scratch, { recursive: true, force: true });
    } catch (err) {
      process.stderr.write(`bench/nbd.js: could not remove ${live.scratch}: ${err.message}\n`);
    }
    live.scratch = undefined;
  }
}

process.on('exit', cleanupSync);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    process.stderr.write(`\n${sig}: stopping servers, unbinding loop devices, removing ${live.scratch ?? 'nothing'}\n`);
    cleanupSync();
    process.exit(128 + osConstants.signals[sig]);
  });
}

// ---------------------------------------------------------------------------------------------
// Processes

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const round = (x, digits) => Math.round(x * 10 ** digits) / 10 ** digits;

function progress(text) {
  process.stderr.write(`  ${text}\n`);
}

/** Runs a program to completion (argument vector, no shell); rejects with its last stderr line. */
function runCmd(program, args, { timeoutMs = 300_000 } = {}) {
  return new Promise((resolveRun, reject) => {
    execFile(program, args, { timeout: timeoutMs, maxBuffer: 64 * MiB, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (!err) return resolveRun({ stdout, stderr });
      // Node's uncaught-error output ends with a version line; the error is further up.
      const lines = String(stderr).trim().split('\n').filter((l) => l.trim() && !/^Node\.js v/.test(l));
      const why = lines.find((l) => /Error|error:/.test(l)) ?? lines.pop() ?? err.message;
      reject(new Error(`${program} ${args.join(' ')}: ${why}`));
    });
  });
}

/** Starts a long-running helper we own; its stderr is kept (last 4 KiB) for error messages. */
function startChild(program, args, { stdout = 'ignore' } = {}) {
  const child = spawn(program, args, { stdio: ['ignore', stdout, 'pipe'] });
  let err = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => (err = (err + chunk).slice(-4096)));
  const exited = new Promise((r) => {
    child.once('error', (e) => {
      err += String(e.message);
      r(-1);
    });
    child.once('exit', (code, signal) => r(code ?? signal));
  });
  const handle = { child, pid: child.pid, exited, stderr: () => err, gone: false };
  void exited.then(() => {
    handle.gone = true;
    live.children.delete(handle);
  });
  live.children.add(handle);
  return handle;
}

async function stopChild(handle, signal = 'SIGTERM', timeoutMs = 10_000) {
  if (!handle.gone) killQuietly(handle.pid, signal);
  const timer = setTimeout(() => killQuietly(handle.pid, 'SIGKILL'), timeoutMs);
  await handle.exited;
  clearTimeout(timer);
}

async function waitForFile(path, handle, what, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (existsSync(path)) return;
    if (handle.gone) throw new Error(`${what} exited before it was ready: ${handle.stderr().trim().split('\n').pop() || 'no message'}`);
    await sleep(20);
  }
  throw new Error(`${what} was not ready within ${timeoutMs / 1000} s`);
}

async function waitGone(pid, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (isAlive(pid) && Date.now() < deadline) await sleep(20);
  return !isAlive(pid);
}

/**
 * CPU seconds of a process: its main thread (for Node: the event loop) and all its threads, those
 * that ended included (nbdkit starts threads per connection, and nbdcopy connects anew each run).
 */
function cpuOf(pid) {
  const seconds = (path) => {
    try {
      const stat = readFileSync(path, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      return (Number(f[11]) + Number(f[12])) / CLK_TCK; // utime, stime (fields 14, 15)
    } catch {
      return 0;
    }
  };
  return pid ? { main: seconds(`/proc/${pid}/task/${pid}/stat`), all: seconds(`/proc/${pid}/stat`) } : { main: 0, all: 0 };
}

// ---------------------------------------------------------------------------------------------
// The two servers, and the nbdfuse + loop frontend the fio rows use.

let scratch;
let backing;

async function startUlobdev(tag) {
  const dir = join(scratch, tag);
  mkdirSync(dir);
  const sock = join(dir, 'nbd.sock');
  const s = {
    kind: 'ulobdev', tag, dir, sock, url: `nbd+unix:///?socket=${sock}`, runDir: join(dir, 'run'), pid: null,
    cache: join(dir, 'cache.img'), bitmap: join(dir, 'cache.bitmap'),
  };
  // The daemon's control socket is RUN_DIR/<name from the URL>.sock: keep it under sun_path's 108 bytes.
  const control = join(s.runDir, `nbd-${s.url.replace(/^nbd\+unix:\/\//, '').replace(/[^A-Za-z0-9.-]+/g, '_').replace(/^_+|_+$/g, '')}.sock`);
  if (Buffer.byteLength(control) > 100) throw new Error(`--dir ${opts.dir} is too long for the daemon's control socket ${control}; use a shorter one`);
  live.daemons.add(s);
  const t0 = performance.now();
  try {
    await runCmd(process.execPath, [CLI, '-c', s.cache, '-b', s.bitmap, '--writeback', '--daemon', '--run-dir', s.runDir, s.url, backing], { timeoutMs: 60_000 });
  } catch (err) {
    // Opening a backing file stats the backing file of every bound loop device; one on a FUSE
    // mount whose server is gone blocks that stat for good.
    if (performance.now() - t0 >= 59_000) throw new Error(`ulobdev attach did not finish within 60 s (a loop device on a hung FUSE mount? see losetup -l): ${err.message}`);
    throw err;
  }
  s.attachMs = round(performance.now() - t0, 0);
  s.pid = (await ulobdevStatus(s)).pid;
  return s;
}

async function ulobdevStatus(s) {
  const { stdout } = await runCmd(process.execPath, [CLI, 'status', s.url, '--json', '--run-dir', s.runDir]);
  return JSON.parse(stdout);
}

async function stopUlobdev(s) {
  await runCmd(process.execPath, [CLI, 'detach', s.url, '--run-dir', s.runDir], { timeoutMs: 300_000 });
  if (!(await waitGone(s.pid, 30_000))) throw new Error(`ulobdev daemon ${s.pid} still runs 30 s after detach`);
  live.daemons.delete(s);
  rmSync(s.dir, { recursive: true, force: true }); // its cache is as large as the device
}

async function startNbdkit() {
  const dir = join(scratch, 'k');
  mkdirSync(dir);
  const sock = join(dir, 'nbd.sock');
  const pidfile = join(dir, 'nbdkit.pid');
  const handle = startChild('nbdkit', ['--exit-with-parent', '-f', '-P', pidfile, '-U', sock, 'file', backing]);
  await waitForFile(pidfile, handle, 'nbdkit');
  return { kind: 'nbdkit', dir, sock, url: `nbd+unix:///?socket=${sock}`, pid: handle.pid, handle };
}

async function attachLoop(server) {
  const mnt = join(server.dir, 'mnt');
  mkdirSync(mnt, { recursive: true });
  const file = join(mnt, 'disk');
  const pidfile = join(server.dir, 'nbdfuse.pid');
  rmSync(pidfile, { force: true });
  const fuse = startChild('nbdfuse', ['-P', pidfile, file, '--unix', server.sock]);
  live.mounts.add(mnt);
  await waitForFile(pidfile, fuse, 'nbdfuse');
  // losetup -f can lose a race for the free device with another process; try again then.
  let dev;
  for (let attempt = 1; !dev; attempt++) {
    try {
      dev = (await runCmd('losetup', ['-f', '--show', ...(LOOP_DIO ? ['--direct-io=on'] : []), file])).stdout.trim();
    } catch (err) {
      if (attempt >= 5) throw err;
      await sleep(200);
    }
  }
  live.loops.add(dev);
  return { dev, mnt, file, fuse, fusePid: fuse.pid };
}

async function detachLoop(loop) {
  await runCmd('losetup', ['-d', loop.dev]);
  // The loop driver lets go of the file only when its last opener closes it.
  const backingFile = `/sys/block/${loop.dev.slice('/dev/'.length)}/loop/backing_file`;
  const deadline = Date.now() + 10_000;
  while (existsSync(backingFile) && Date.now() < deadline) await sleep(20);
  live.loops.delete(loop.dev);
  await runCmd('fusermount3', ['-u', loop.mnt]);
  live.mounts.delete(loop.mnt);
  await stopChild(loop.fuse, 'SIGTERM', 5000);
}

// ---------------------------------------------------------------------------------------------
// Clients. Each returns { bytes, ops, seconds, mbps, iops, ... }.

const NBDCOPY_ARGS = ['--no-extents']; // defaults otherwise: 4 connections (both servers advertise multi-conn), threads = CPUs, 256 KiB requests, 16 MiB queue per connection

async function nbdcopy(url) {
  const t0 = performance.now();
  await runCmd('nbdcopy', [...NBDCOPY_ARGS, url, 'null:']);
  const seconds = (performance.now() - t0) / 1000;
  return { bytes: SIZE, ops: SIZE / (256 * KiB), seconds: round(seconds, 3), mbps: round(SIZE / seconds / 1e6, 1), iops: null };
}

const FIO_JOBS = {
  randread: { rw: 'randread', bs: '4k', qd: QD },
  randread1: { rw: 'randread', bs: '4k', qd: 1 },
  read: { rw: 'read', bs: '1M', qd: QD },
  write: { rw: 'write', bs: '1M', qd: QD, extra: ['--end_fsync=1'] },
  trim: { rw: 'trim', bs: '4M', qd: QD },
};

/**
 * fio on a loop device (`/dev/loopN`: libaio, O_DIRECT) or straight at the server through
 * libnbd (an NBD URL: fio's nbd engine, one connection, no kernel in between).
 */
function fioArgs(target, job, seconds) {
  const j = FIO_JOBS[job];
  const where = target.startsWith('nbd')
    ? ['--ioengine=nbd', `--uri=${target}`, `--size=${SIZE}`]
    : [`--filename=${target}`, '--ioengine=libaio', '--direct=1'];
  return [
    `--name=${job}`, ...where, `--iodepth=${j.qd}`, `--rw=${j.rw}`, `--bs=${j.bs}`,
    ...(j.extra ?? []), ...(seconds ? ['--time_based', `--runtime=${seconds}`] : []), '--output-format=json',
  ];
}

async function fio(target, job, seconds) {
  const { stdout } = await runCmd('fio', fioArgs(target, job, seconds));
  const result = JSON.parse(stdout.slice(stdout.indexOf('{')));
  const j = result.jobs[0];
  if (j.error) throw new Error(`fio ${job} on ${target} failed with error ${j.error}`);
  const rw = FIO_JOBS[job].rw;
  const d = rw.includes('write') ? j.write : rw === 'trim' ? j.trim : j.read;
  const seconds_ = d.runtime / 1000; // includes the end_fsync of write jobs
  const pct = (p) => round((d.clat_ns.percentile?.[p] ?? 0) / 1000, 0);
  return {
    bytes: d.io_bytes, ops: d.total_ios, seconds: seconds_, mbps: round(d.io_bytes / seconds_ / 1e6, 1), iops: round(d.total_ios / seconds_, 0),
    latencyUs: { p50: pct('50.000000'), p99: pct('99.000000') },
  };
}

/** One client run with the CPU the server (main thread apart) and nbdfuse spent meanwhile. */
async function measure(server, loop, fn) {
  const s0 = cpuOf(server.pid);
  const f0 = cpuOf(loop?.fusePid);
  const r = await fn();
  const s1 = cpuOf(server.pid);
  const f1 = cpuOf(loop?.fusePid);
  r.cpuSeconds = { serverMain: round(s1.main - s0.main, 2), serverAll: round(s1.all - s0.all, 2), nbdfuse: loop ? round(f1.all - f0.all, 2) : null };
  return r;
}

/** Runs of one side, summed: rates over the summed time, CPU as a share of one core over it. */
function combine(runs) {
  const sum = (f) => runs.reduce((n, r) => n + f(r), 0);
  const bytes = sum((r) => r.bytes);
  const ops = sum((r) => r.ops);
  const seconds = sum((r) => r.seconds);
  const cpu = (k) => (runs.every((r) => r.cpuSeconds?.[k] != null) ? round((100 * sum((r) => r.cpuSeconds[k])) / seconds, 0) : null);
  return {
    bytes, ops, seconds: round(seconds, 3), mbps: round(bytes / seconds / 1e6, 1), iops: round(ops / seconds, 0),
    cpuPercent: { serverMain: cpu('serverMain'), serverAll: cpu('serverAll'), nbdfuse: cpu('nbdfuse') },
    runs,
  };
}

/** `reps` runs per side in the order U K K U U K …, so a load that drifts hits both alike. */
async function alternate(reps, u, k) {
  const us = [];
  const ks = [];
  for (let i = 0; i < reps; i++) {
    if (i % 2 === 0) {
      us.push(await u());
      ks.push(await k());
    } else {
      ks.push(await k());
      us.push(await u());
    }
  }
  return { ulobdev: combine(us), nbdkit: combine(ks) };
}

// ---------------------------------------------------------------------------------------------
// Data check: the first bytes, the last bytes and random ranges read through each server's FUSE
// file equal the backing file. A server that serves wrong data has no number worth printing.

function checkSameData(label, file) {
  const offsets = [0, SIZE - CHECK_LEN];
  let x = 0x9e3779b9;
  for (let i = 0; i < CHECK_READS; i++) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    offsets.push((x % (SIZE / CHECK_LEN)) * CHECK_LEN);
  }
  const a = Buffer.alloc(CHECK_LEN);
  const b = Buffer.alloc(CHECK_LEN);
  const fa = openSync(file, 'r');
  const fb = openSync(backing, 'r');
  try {
    for (const off of offsets) {
      readSync(fa, a, 0, CHECK_LEN, off);
      readSync(fb, b, 0, CHECK_LEN, off);
      if (!a.equals(b)) throw new Error(`${label} served different bytes than the backing file at offset ${off}`);
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
}

// ---------------------------------------------------------------------------------------------
// CPU profile of a foreground daemon: samples are attributed to the windows in which each client
// ran (V8's profile clock and process.hrtime are both CLOCK_MONOTONIC, in µs here).

const hrUs = () => Number(process.hrtime.bigint() / 1000n);

const sourceMaps = new Map();

/** dist/…/x.js line/column (0-based) → src/…/x.ts:line through tsc's source map, or null. */
function originalPosition(path, line, column) {
  let map = sourceMaps.get(path);
  if (map === undefined) {
    map = null;
    try {
      const raw = JSON.parse(readFileSync(`${path}.map`, 'utf8'));
      map = { sources: raw.sources.map((s) => relative(appRoot, resolve(dirname(path), raw.sourceRoot || '', s))), lines: decodeMappings(raw.mappings) };
    } catch {
      // no map: the caller shows the dist/ position
    }
    sourceMaps.set(path, map);
  }
  const segs = map?.lines[line];
  if (!segs?.length) return null;
  let best = segs[0];
  for (const s of segs) if (s[0] <= column) best = s;
  return best.length >= 4 ? `${map.sources[best[1]]}:${best[2] + 1}` : null;
}

function decodeMappings(mappings) {
  const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
  const lines = [];
  let src = 0;
  let srcLine = 0;
  let srcCol = 0;
  let name = 0;
  for (const lineText of mappings.split(';')) {
    const segs = [];
    let genCol = 0;
    for (const segText of lineText.split(',')) {
      if (!segText) continue;
      const vals = [];
      let value = 0;
      let shift = 0;
      for (const ch of segText) {
        const digit = B64.indexOf(ch);
        value += (digit & 31) << shift;
        if (digit & 32) {
          shift += 5;
        } else {
          vals.push(value & 1 ? -(value >>> 1) : value >>> 1);
          value = 0;
          shift = 0;
        }
      }
      genCol += vals[0];
      if (vals.length >= 4) {
        src += vals[1];
        srcLine += vals[2];
        srcCol += vals[3];
        if (vals.length >= 5) name += vals[4];
        segs.push([genCol, src, srcLine, srcCol]);
      } else {
        segs.push([genCol]);
      }
    }
    lines.push(segs);
  }
  return lines;
}

function frameOf(callFrame) {
  const { functionName, url, lineNumber, columnNumber } = callFrame;
  const fn = functionName || '(anonymous)';
  if (!url) return { key: fn, category: categoryOf(fn, '') };
  let where;
  if (url.startsWith('file://')) {
    const path = fileURLToPath(url);
    const rel = [relative(appRoot, path), relative(root, path)].find((r) => !r.startsWith('..')) ?? path;
    where = (rel.startsWith('dist/') && originalPosition(path, lineNumber, columnNumber)) || `${rel}:${lineNumber + 1}`;
  } else {
    where = `${url}:${lineNumber + 1}`;
  }
  return { key: `${fn} ${where}`, category: categoryOf(fn, url), ours: url.includes('/dist/') };
}

function categoryOf(fn, url) {
  if (fn === '(idle)') return 'idle';
  if (fn === '(garbage collector)') return 'gc';
  if (fn === '(program)') return 'native';
  if (!url) return 'native';
  if (url.startsWith('node:')) return 'node';
  if (url.includes('/node_modules/')) return 'deps';
  if (url.includes('/dist/')) return 'ulobdev';
  return 'other';
}

function analyzeProfile(profile, windows) {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const frames = new Map();
  const frame = (id) => {
    let f = frames.get(id);
    if (!f) {
      f = frameOf(byId.get(id).callFrame);
      // Our functions on the stack of this node, each once (for inclusive time).
      const ours = new Set();
      for (let p = id; p !== undefined; p = parent.get(p)) {
        const pf = p === id ? f : frame(p);
        if (pf.ours) ours.add(pf.key);
      }
      f.oursOnStack = ours;
      frames.set(id, f);
    }
    return f;
  };
  const times = [];
  let t = profile.startTime;
  for (let i = 0; i < profile.samples.length; i++) {
    t += profile.timeDeltas[i];
    times.push(t);
  }
  return windows.map((w) => {
    const self = new Map();
    const inclusive = new Map();
    const cats = {};
    let total = 0;
    for (let i = 0; i < times.length; i++) {
      if (times[i] < w.startUs || times[i] > w.endUs) continue;
      const f = frame(profile.samples[i]);
      total++;
      cats[f.category] = (cats[f.category] ?? 0) + 1;
      if (f.category === 'idle') continue;
      self.set(f.key, (self.get(f.key) ?? 0) + 1);
      for (const k of f.oursOnStack) inclusive.set(k, (inclusive.get(k) ?? 0) + 1);
    }
    const share = (n) => (total ? round((100 * n) / total, 1) : 0);
    const top = (m) => [...m].sort((a, b) => b[1] - a[1]).slice(0, TOP_FRAMES).map(([frame_, n]) => ({ frame: frame_, percent: share(n) }));
    return {
      window: w.label,
      result: w.result,
      seconds: round((w.endUs - w.startUs) / 1e6, 2),
      samples: total,
      busyPercent: share(total - (cats.idle ?? 0)),
      categoriesPercent: Object.fromEntries(Object.entries(cats).map(([k, n]) => [k, share(n)])),
      topSelf: top(self),
      topInclusiveUlobdev: top(inclusive),
    };
  });
}

async function profileDaemon(dirForProfile) {
  const dir = join(scratch, 'p');
  mkdirSync(dir);
  const sock = join(dir, 'nbd.sock');
  const s = { kind: 'ulobdev', dir, sock, url: `nbd+unix:///?socket=${sock}`, runDir: join(dir, 'run') };
  const profDir = join(dir, 'prof');
  const handle = startChild(
    process.execPath,
    ['--cpu-prof', `--cpu-prof-dir=${profDir}`, '--cpu-prof-name=ulobdev.cpuprofile', CLI, '-c', join(dir, 'cache.img'), '-b', join(dir, 'cache.bitmap'),
      '--writeback', '--run-dir', s.runDir, s.url, backing],
    { stdout: 'pipe' },
  );
  s.pid = handle.pid;
  // In the foreground the CLI prints DEVICE once it serves.
  await new Promise((resolveReady, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error('the profiled daemon did not become ready within 60 s')), 60_000);
    handle.child.stdout.setEncoding('utf8');
    handle.child.stdout.on('data', (chunk) => {
      out += chunk;
      if (out.includes('\n')) {
        clearTimeout(timer);
        resolveReady();
      }
    });
    void handle.exited.then(() => {
      clearTimeout(timer);
      reject(new Error(`the profiled daemon exited: ${handle.stderr().trim().split('\n').pop()}`));
    });
  });
  // The clients talk to the server directly (nbdcopy, fio's libnbd engine): no FUSE or loop
  // device in between, so the server is as busy as it can be made.
  const windows = [];
  const mark = async (label, unit, fn) => {
    const startUs = hrUs();
    const result = await fn();
    windows.push({ label, startUs, endUs: hrUs(), result: { unit, value: unit === 'IOPS' ? result.iops : result.mbps } });
  };
  const seconds = Math.max(2, Math.round(SECONDS / 2));
  progress('profile: nbdcopy cold');
  await mark('nbdcopy, cold cache (1 run)', 'MB/s', () => nbdcopy(s.url));
  progress('profile: nbdcopy warm');
  await mark('nbdcopy, warm cache (2 runs)', 'MB/s', async () => combine([await nbdcopy(s.url), await nbdcopy(s.url)]));
  progress('profile: fio libnbd 4 KiB randread warm');
  await mark(`fio libnbd 4 KiB randread QD${QD}, warm (${seconds} s)`, 'IOPS', () => fio(s.url, 'randread', seconds));
  // TRIM evicts the clean blocks, so the next pass writes into missing blocks; `ulobdev flush`
  // then makes them clean again for the pass after.
  progress('profile: trim, fio libnbd 1 MiB seq write into missing blocks');
  await fio(s.url, 'trim');
  const afterTrim = await ulobdevStatus(s);
  await mark(`fio libnbd 1 MiB seq write QD${QD} + fsync, missing blocks (1 pass, cache ${afterTrim.cacheFillPercent}% filled before)`, 'MB/s', () => fio(s.url, 'write'));
  await runCmd(process.execPath, [CLI, 'flush', s.url, '--run-dir', s.runDir]);
  progress('profile: fio libnbd 1 MiB seq write into clean cached blocks');
  await mark(`fio libnbd 1 MiB seq write QD${QD} + fsync, clean cached blocks (1 pass)`, 'MB/s', () => fio(s.url, 'write'));
  // SIGTERM detaches; the process then ends normally and node writes the profile.
  await stopChild(handle, 'SIGTERM', 60_000);
  const path = join(profDir, 'ulobdev.cpuprofile');
  if (!existsSync(path)) return { error: `no profile written (daemon exit: ${handle.stderr().trim().split('\n').pop() ?? 'unknown'})` };
  const profile = JSON.parse(readFileSync(path, 'utf8'));
  const saved = join(dirForProfile, 'nbd-ulobdev.cpuprofile');
  mkdirSync(dirForProfile, { recursive: true });
  copyFileSync(path, saved);
  const intervalUs = round((profile.endTime - profile.startTime) / Math.max(1, profile.samples.length), 0);
  return { savedTo: saved, sampleIntervalUs: intervalUs, windows: analyzeProfile(profile, windows) };
}

// ---------------------------------------------------------------------------------------------

const FS_MAGIC = { 0xef53: 'ext2/3/4', 0x58465342: 'xfs', 0x9123683e: 'btrfs', 0x01021994: 'tmpfs', 0x794c7630: 'overlayfs', 0x2fc12fc1: 'zfs', 0xf2f52010: 'f2fs' };

/** dist/, the addon and package.json copied into the scratch directory; node_modules linked. */
function snapshotApp() {
  const app = join(scratch, 'app');
  cpSync(join(root, 'dist'), join(app, 'dist'), { recursive: true });
  mkdirSync(join(app, 'build/Release'), { recursive: true });
  copyFileSync(join(root, 'build/Release/ulob_native.node'), join(app, 'build/Release/ulob_native.node'));
  copyFileSync(join(root, 'package.json'), join(app, 'package.json'));
  symlinkSync(join(root, 'node_modules'), join(app, 'node_modules'));
  appRoot = app;
  CLI = join(app, 'dist/cli/ulobdev.js');
}

function version(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return (r.stdout || r.stderr || '').trim().split('\n')[0] || null;
}

async function main() {
  const dir = resolve(opts.dir);
  const fsType = FS_MAGIC[Number(statfsSync(dir).type)] ?? `0x${Number(statfsSync(dir).type).toString(16)}`;
  if (fsType === 'tmpfs') process.stderr.write(`warning: ${dir} is tmpfs; fdatasync is free there and the write rows mean little\n`);
  scratch = live.scratch = mkdtempSync(join(dir, 'ulobnbd-'));
  // Disk records of the bench's throw-away disks stay in the scratch directory (see bench/loop.js).
  process.env.ULOBDEV_STATE_DIR = join(scratch, 'state');
  const loadStart = loadavg().map((x) => round(x, 2));
  const t00 = performance.now();
  process.stderr.write(`bench/nbd.js: ${SIZE / MiB} MiB backing file, ${SECONDS} s per random-read row and side, ${REPS} reps, scratch ${scratch} (${fsType})\n`);
  const setup = {};
  snapshotApp();

  // The backing file: random data, synced, then read once so both servers start from a warm page cache.
  backing = join(scratch, 'backing.img');
  let t = performance.now();
  {
    const fd = openSync(backing, 'wx', 0o600);
    const chunk = Buffer.allocUnsafe(MiB);
    for (let o = 0; o < SIZE; o += MiB) writeSync(fd, randomFillSync(chunk), 0, MiB, o);
    fdatasyncSync(fd);
    closeSync(fd);
    const rfd = openSync(backing, 'r');
    for (let o = 0; o < SIZE; o += MiB) readSync(rfd, chunk, 0, MiB, o);
    closeSync(rfd);
  }
  setup.createBackingMs = round(performance.now() - t, 0);
  const residentPercent = () => {
    const r = spawnSync('fincore', ['--json', '--bytes', backing], { encoding: 'utf8' });
    try {
      const f = JSON.parse(r.stdout).fincore[0];
      return round((100 * Number(f.res)) / Number(f.size), 1);
    } catch {
      return null;
    }
  };
  const pageCache = { backingResidentPercentAtStart: residentPercent() };

  const rows = [];
  const notes = {};
  const add = (row) => {
    row.ratio = row.nbdkit.mbps > 0 ? round(row.ulobdev.mbps / row.nbdkit.mbps, 3) : null;
    rows.push(row);
  };

  const kit = await startNbdkit();
  const kitLoop = await attachLoop(kit);
  checkSameData('nbdkit', kitLoop.file);

  // --- session 1: fresh cache, then warm --------------------------------------------------------
  progress('ulobdev: attach (fresh cache)');
  let u = await startUlobdev('u1');
  setup.attachMs = u.attachMs;
  progress('nbdcopy cold');
  {
    const cold = await measure(u, null, () => nbdcopy(u.url));
    const k = await measure(kit, null, () => nbdcopy(kit.url));
    notes.afterColdNbdcopy = await ulobdevStatus(u).then((st) => ({ cacheFillPercent: st.cacheFillPercent }));
    add({ id: 'nbdcopy-cold', workload: 'nbdcopy whole export → null:, cold cache (misses fill)', unit: 'MB/s', cache: 'cold',
      ulobdev: combine([cold]), nbdkit: combine([k]), runsNote: '1 run each, nbdkit right after ulobdev' });
  }
  progress(`nbdcopy warm ×${REPS}`);
  add({ id: 'nbdcopy-warm', workload: 'nbdcopy whole export → null:, warm cache (all hits)', unit: 'MB/s', cache: 'warm',
    ...(await alternate(REPS, () => measure(u, null, () => nbdcopy(u.url)), () => measure(kit, null, () => nbdcopy(kit.url)))) });

  const half = Math.max(1, Math.round(SECONDS / 2));
  const quarter = Math.max(1, Math.round(SECONDS / 4));
  for (const [job, qd] of [['randread1', 1], ['randread', QD]]) {
    progress(`fio libnbd 4 KiB randread QD${qd} warm, ${quarter} s slices`);
    add({ id: `nbd-randread-4k-qd${qd}-warm`, workload: `fio libnbd 4 KiB randread QD${qd}, warm cache`, unit: 'IOPS', cache: 'warm',
      ...(await alternate(2, () => measure(u, null, () => fio(u.url, job, quarter)), () => measure(kit, null, () => fio(kit.url, job, quarter)))) });
  }

  let uLoop = await attachLoop(u);
  checkSameData('ulobdev', uLoop.file);
  progress(`fio loop 4 KiB randread warm, ${half} s slices`);
  add({ id: 'randread-4k-warm', workload: `fio loop 4 KiB randread QD${QD}, warm cache`, unit: 'IOPS', cache: 'warm',
    ...(await alternate(2, () => measure(u, uLoop, () => fio(uLoop.dev, 'randread', half)), () => measure(kit, kitLoop, () => fio(kitLoop.dev, 'randread', half)))) });
  progress(`fio loop 1 MiB seq read warm, ${quarter} s slices`);
  add({ id: 'read-1m-warm', workload: `fio loop 1 MiB seq read QD${QD}, warm cache`, unit: 'MB/s', cache: 'warm',
    ...(await alternate(2, () => measure(u, uLoop, () => fio(uLoop.dev, 'read', quarter)), () => measure(kit, kitLoop, () => fio(kitLoop.dev, 'read', quarter)))) });
  // Every ulobdev pass writes into clean cached blocks (each write records a durable dirty intent
  // first): `ulobdev flush` before each pass, outside the timed part, writes the previous pass back.
  progress(`fio loop 1 MiB seq write warm ×${REPS}`);
  const flushMs = [];
  add({ id: 'write-1m-warm', workload: `fio loop 1 MiB seq write QD${QD} + fsync, warm cache (clean → dirty)`, unit: 'MB/s', cache: 'warm',
    ...(await alternate(
      REPS,
      async () => {
        const t0 = performance.now();
        await runCmd(process.execPath, [CLI, 'flush', u.url, '--run-dir', u.runDir]);
        flushMs.push(round(performance.now() - t0, 0));
        return measure(u, uLoop, () => fio(uLoop.dev, 'write'));
      },
      () => measure(kit, kitLoop, () => fio(kitLoop.dev, 'write')),
    )) });
  setup.flushBeforeWriteMs = flushMs;
  await detachLoop(uLoop);
  await stopUlobdev(u);

  // --- cold rows: a fresh cache each, ulobdev then nbdkit right after --------------------------
  const coldFio = async (tag, id, workload, unit, job, seconds) => {
    progress(`ulobdev: attach (fresh cache); ${workload}`);
    u = await startUlobdev(tag);
    uLoop = await attachLoop(u);
    const a = await measure(u, uLoop, () => fio(uLoop.dev, job, seconds));
    await sleep(1200); // the engine commits fills 1 s after the first one; status counts committed blocks
    const st = await ulobdevStatus(u);
    const b = await measure(kit, kitLoop, () => fio(kitLoop.dev, job, seconds));
    add({ id, workload, unit, cache: 'cold', ulobdev: combine([a]), nbdkit: combine([b]), runsNote: '1 run each, nbdkit right after ulobdev',
      cacheFillPercentAfter: st.cacheFillPercent, dirtyBytesAfter: st.dirtyBytes });
    await detachLoop(uLoop);
    await stopUlobdev(u);
  };
  await coldFio('u2', 'randread-4k-cold', `fio loop 4 KiB randread QD${QD}, cold cache (4 KiB fills)`, 'IOPS', 'randread', SECONDS);
  await coldFio('u3', 'read-1m-cold', `fio loop 1 MiB seq read QD${QD}, cold cache (one pass)`, 'MB/s', 'read', 0);
  await coldFio('u4', 'write-1m-cold', `fio loop 1 MiB seq write QD${QD} + fsync, cold cache (missing → dirty)`, 'MB/s', 'write', 0);

  await detachLoop(kitLoop);
  await stopChild(kit.handle);
  pageCache.backingResidentPercentAtEnd = residentPercent();

  // --- profile ----------------------------------------------------------------------------------
  let profile = null;
  if (PROFILE) profile = await profileDaemon(dirname(resolve(opts.json)));

  setup.totalSeconds = round((performance.now() - t00) / 1000, 1);
  report({ rows, notes, setup, profile, fsType, loadStart, pageCache });
}

// ---------------------------------------------------------------------------------------------
// Output

const ORDER = ['nbdcopy-cold', 'nbdcopy-warm', 'nbd-randread-4k-qd1-warm', `nbd-randread-4k-qd${QD}-warm`, 'randread-4k-cold', 'randread-4k-warm', 'read-1m-cold', 'read-1m-warm', 'write-1m-cold', 'write-1m-warm'];

function fmt(side, unit) {
  const n = unit === 'IOPS' ? side.iops : side.mbps;
  return `${n.toLocaleString('en-US', { maximumFractionDigits: 0 })} ${unit}`;
}

function report({ rows, notes, setup, profile, fsType, loadStart, pageCache }) {
  rows.sort((a, b) => ORDER.indexOf(a.id) - ORDER.indexOf(b.id));
  const loadEnd = loadavg().map((x) => round(x, 2));
  const pct = (v) => (v == null ? '-' : `${v}%`);
  const lines = [
    '',
    'CPU while the client ran (% of one core; ulobdev main thread = its event loop, all = with the libuv threadpool):',
    ...rows.map((r) => `  ${r.workload}: ulobdev main ${pct(r.ulobdev.cpuPercent.serverMain)}, all ${pct(r.ulobdev.cpuPercent.serverAll)}; ` +
      `nbdkit ${pct(r.nbdkit.cpuPercent.serverAll)}` +
      (r.ulobdev.cpuPercent.nbdfuse != null ? `; nbdfuse ${pct(r.ulobdev.cpuPercent.nbdfuse)} / ${pct(r.nbdkit.cpuPercent.nbdfuse)}` : '')),
    '',
    ...rows.filter((r) => r.cacheFillPercentAfter !== undefined).map((r) => `After "${r.workload}": cache ${r.cacheFillPercentAfter}% filled, ${(r.dirtyBytesAfter / MiB).toFixed(0)} MiB dirty.`),
    `Cold rows: one run each, nbdkit right after ulobdev; warm rows: runs alternate ulobdev, nbdkit, nbdkit, ulobdev, … ` +
      `(nbdcopy and 1 MiB writes ${setup.flushBeforeWriteMs.length} runs each, time-based fio reads 2 slices each).`,
  ];
  if (profile?.windows) {
    lines.push('', `Profile of a separate foreground daemon (node --cpu-prof, ~${profile.sampleIntervalUs} µs samples, fresh cache; saved to ${relative(process.cwd(), profile.savedTo)}):`);
    for (const w of profile.windows) {
      const c = w.categoriesPercent;
      const rate = `${Math.round(w.result.value).toLocaleString('en-US')} ${w.result.unit}`;
      lines.push(`  ${w.window}, ${rate} while profiled: main thread busy ${w.busyPercent}% ` +
        `(native ${c.native ?? 0}%, GC ${c.gc ?? 0}%, node: ${c.node ?? 0}%, dependencies ${c.deps ?? 0}%, ulobdev ${c.ulobdev ?? 0}%)`);
      lines.push(`    top self: ${w.topSelf.slice(0, 5).map((f) => `${f.frame} ${f.percent}%`).join('; ')}`);
      lines.push(`    ulobdev inclusive: ${w.topInclusiveUlobdev.slice(0, 4).map((f) => `${f.frame} ${f.percent}%`).join('; ')}`);
    }
  } else if (profile?.error) {
    lines.push('', `Profile: ${profile.error}`);
  }

  printTable(
    [
      { key: 'workload', title: 'workload', align: 'left' },
      { key: 'ulobdev', title: 'ulobdev', align: 'right' },
      { key: 'nbdkit', title: 'nbdkit', align: 'right' },
      { key: 'ratio', title: 'ulobdev/nbdkit', align: 'right' },
    ],
    rows.map((r) => ({ workload: r.workload, ulobdev: fmt(r.ulobdev, r.unit), nbdkit: fmt(r.nbdkit, r.unit), ratio: r.ratio?.toFixed(2) })),
    {
      title:
        `ulobdev (write-back cache, NBD over a Unix socket) vs nbdkit file plugin, same ${SIZE / MiB} MiB backing file of random data on ${fsType}; ` +
        `${cpus().length} CPUs, node ${process.version}, load average ${loadStart.join(' ')} at start, ${loadEnd.join(' ')} at end\n` +
        `Backing file in the page cache for both (${pageCache.backingResidentPercentAtStart ?? '?'}% resident at start). nbdcopy ${NBDCOPY_ARGS.join(' ')} URL null: ` +
        `(default 4 connections). fio libnbd: fio's nbd engine, one connection. fio loop: libaio, direct=1, on /dev/loopN\n` +
        `bound to an nbdfuse file (losetup ${LOOP_DIO ? '--direct-io=on' : 'without --direct-io: repeat reads come from the FUSE file\'s page cache'}).\n` +
        'Writes: ulobdev in write-back mode puts them in its cache file (the backing file is untouched); nbdkit puts them in the backing file.\n' +
        'Both through the page cache; fsync at the end of each write pass reaches the disk on both sides. MB/s = 10^6 bytes/s.\n',
      notes: lines,
    },
  );

  const cpu = cpus();
  const json = resolve(opts.json);
  writeJson(json, {
    bench: 'nbd',
    date: new Date().toISOString(),
    machine: {
      cpus: cpu.length, cpuModel: cpu[0]?.model ?? null, memoryBytes: totalmem(), os: osType(), kernel: release(), arch: arch(), node: process.version,
      loadAverage: { start: loadStart, end: loadEnd }, scratchFs: fsType,
      versions: { nbdkit: version('nbdkit', ['--version']), nbdcopy: version('nbdcopy', ['--version']), nbdfuse: version('nbdfuse', ['--version']), fio: version('fio', ['--version']) },
    },
    params: {
      sizeBytes: SIZE, seconds: SECONDS, reps: REPS, queueDepth: QD, dir: resolve(opts.dir), loopDirectIo: LOOP_DIO,
      ulobdev: `node dist/cli/ulobdev.js -c CACHE -b BITMAP --writeback --daemon --run-dir DIR nbd+unix:///?socket=SOCK BACKING`,
      nbdkit: 'nbdkit --exit-with-parent -f -P PIDFILE -U SOCK file BACKING',
      nbdcopy: `nbdcopy ${NBDCOPY_ARGS.join(' ')} URL null:`,
      fioLoop: Object.fromEntries(Object.keys(FIO_JOBS).map((j) => [j, `fio ${fioArgs('/dev/loopN', j, FIO_JOBS[j].rw === 'randread' ? 'SECONDS' : 0).join(' ')}`])),
      fioLibnbd: Object.fromEntries(Object.keys(FIO_JOBS).map((j) => [j, `fio ${fioArgs('nbd+unix:///?socket=SOCK', j, FIO_JOBS[j].rw === 'randread' ? 'SECONDS' : 0).join(' ')}`])),
      frontend: `nbdfuse -P PIDFILE MNT/disk --unix SOCK; losetup -f --show${LOOP_DIO ? ' --direct-io=on' : ''} MNT/disk`,
    },
    pageCache,
    rows,
    notes,
    profile,
    setup,
  });
  process.stderr.write(`wrote ${json} (${setup.totalSeconds} s)\n`);
}

main()
  .catch((err) => {
    process.stderr.write(`bench/nbd.js failed: ${err?.stack ?? err}\n`);
    process.exitCode = 1;
  })
  .finally(cleanupSync);
