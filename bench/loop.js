#!/usr/bin/env node
// The module-free /dev/loopN frontend against its limit and against nbdkit, side by side in one run.
//
//   npx tsc -p tsconfig.json && sudo node bench/loop.js [--size 256M] [--seconds 5] [--reps 2]
//        [--rows a,b,...] [--dir /var/tmp] [--json bench/results/loop.json] [--profile] [--strace]
//
// Three loop devices, each fio'd the same way (libaio, direct=1, 1 s ramp, --seconds), one after
// the other, rotating which goes first, --reps times; the best run of each is kept:
//   limit    `losetup --direct-io=on` on a plain copy of the backing file: what a loop device
//            over a local file does, the ceiling for both others.
//   ulobdev  `ulobdev -c C -b B --writeback --daemon /dev/loopN DISK` as a user runs it (nbdfuse +
//            loop, our NBD server and engine). Every block is read once first, so reads are hits.
//   nbdkit   `nbdkit file` on another copy of the backing file, exported by nbdfuse and bound with
//            `losetup --direct-io=on`: the same transport as ulobdev's, with nbdkit's server.
// Rows: 4 KiB random read QD16, 1 MiB read QD4, 4 KiB random write QD16 and 1 MiB write QD4 into
// dirty blocks (a write pass makes every block dirty first), and 4 KiB random write QD16 into clean
// blocks ("first write": before each ulobdev run `ulobdev flush` cleans every block, so each write
// records a durable dirty intent first; the others see the same workload). Ratios are ulobdev /
// limit and ulobdev / nbdkit. With --profile the ulobdev daemon runs under `node --cpu-prof` and the
// profile is written next to the JSON. With --strace each server (all its threads) runs under
// `strace -c -f` during its fio runs and the syscalls per request are printed (the rates of such
// runs are not comparable: strace slows every syscall). Not a test: no assertions; the exit code is 0 unless the
// bench breaks. Loops, mounts and processes it made are removed on every way out.
import { execFileSync, spawn } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { cpus, loadavg, release, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { printTable, writeJson } from './lib/table.js';

const MiB = 1 << 20;
const { values: opts } = parseArgs({
  options: {
    size: { type: 'string', default: '256M' },
    seconds: { type: 'string', default: '5' },
    reps: { type: 'string', default: '2' },
    rows: { type: 'string', default: '' },
    dir: { type: 'string', default: '/var/tmp' },
    json: { type: 'string', default: fileURLToPath(new URL('./results/loop.json', import.meta.url)) },
    profile: { type: 'boolean', default: false },
    strace: { type: 'boolean', default: false },
  },
});
const SIZE = Number(/^(\d+)M$/i.exec(opts.size)?.[1] ?? NaN) * MiB;
const SECONDS = Number(opts.seconds);
const REPS = Number(opts.reps);
if (!(SIZE >= 64 * MiB)) throw new Error('--size must be like 256M (at least 64M)');
if (process.getuid?.() !== 0) throw new Error('bench/loop.js needs root (loop devices, FUSE mounts)');
const root = fileURLToPath(new URL('..', import.meta.url));
const CLI = join(root, 'dist/cli/ulobdev.js');
if (!existsSync(CLI)) throw new Error('build first: npx tsc -p tsconfig.json');

const ROWS = [
  { id: 'randread-4k', workload: '4 KiB random read, QD16', rw: 'randread', bs: '4k', qd: 16, unit: 'IOPS' },
  { id: 'read-1m', workload: '1 MiB read, QD4', rw: 'read', bs: '1m', qd: 4, unit: 'MB/s' },
  { id: 'randwrite-4k', workload: '4 KiB random write, QD16 (dirty blocks)', rw: 'randwrite', bs: '4k', qd: 16, unit: 'IOPS' },
  { id: 'write-1m', workload: '1 MiB write, QD4 (dirty blocks)', rw: 'write', bs: '1m', qd: 4, unit: 'MB/s' },
  { id: 'firstwrite-4k', workload: '4 KiB random write, QD16 (first write: clean → dirty)', rw: 'randwrite', bs: '4k', qd: 16, unit: 'IOPS', clean: true },
].filter((r) => !opts.rows || opts.rows.split(',').includes(r.id));

const log = (m) => process.stderr.write(`${m}\n`);
const run = (cmd, args, o = {}) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], ...o });
const live = { loops: [], mounts: [], children: [], daemon: null, dir: null };

function cleanup() {
  if (live.daemon && live.profiled) {
    // The profile is written when the daemon exits by itself: detach, then wait for it.
    try {
      run('node', [CLI, 'detach', '--run-dir', live.daemon.runDir, 'benchloop'], { timeout: 120_000 });
      live.daemon = null;
      const until = Date.now() + 30_000;
      const exited = () => {
        try {
          const stat = readFileSync(`/proc/${live.profiled.pid}/stat`, 'utf8');
          return stat.slice(stat.lastIndexOf(')') + 2)[0] === 'Z';
        } catch {
          return true;
        }
      };
      while (!exited() && Date.now() < until) execFileSync('sleep', ['0.2']);
    } catch (err) {
      log(`ulobdev detach failed: ${String(err.stderr ?? err.message).trim()}`);
    }
  }
  for (const loop of live.loops.splice(0)) {
    try {
      run('losetup', ['-d', loop]);
    } catch {}
  }
  if (live.daemon) {
    try {
      run('node', [CLI, 'detach', '--run-dir', live.daemon.runDir, 'benchloop'], { timeout: 120_000 });
    } catch (err) {
      log(`ulobdev detach failed: ${String(err.stderr ?? err.message).trim()}`);
    }
    live.daemon = null;
  }
  for (const m of live.mounts.splice(0)) {
    try {
      run('fusermount3', ['-u', m]);
    } catch {}
  }
  for (const c of live.children.splice(0)) {
    if (c.exitCode === null) c.kill('SIGTERM');
  }
  try {
    if (live.dir) rmSync(live.dir, { recursive: true, force: true });
  } catch (err) {
    log(`could not remove ${live.dir}: ${err.message}`);
  }
  live.dir = null;
}
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(sig, () => (cleanup(), process.exit(130)));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function waitFor(cond, what, ms = 20_000) {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

function losetup(file) {
  const dev = run('losetup', ['--direct-io=on', '-f', '--show', file]).trim();
  live.loops.push(dev);
  return dev;
}

/** CPU seconds (user + system, all threads) the processes have used so far. */
function cpuSeconds(pids) {
  let ticks = 0;
  for (const pid of pids) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      ticks += Number(f[11]) + Number(f[12]);
    } catch {}
  }
  return ticks / 100;
}

/**
 * The same CPU time split by where it is spent, in seconds: per process (`server`, `nbdfuse`) its
 * user and system time, and for the server also its main thread's (the event loop) apart from
 * its other threads (libuv's threadpool, V8's GC and compiler threads).
 */
function cpuSplit(pids) {
  const ticks = (path) => {
    try {
      const stat = readFileSync(path, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      return [Number(f[11]) / 100, Number(f[12]) / 100];
    } catch {
      return [0, 0];
    }
  };
  const [server, nbdfuse] = pids;
  const [su, ss] = ticks(`/proc/${server}/stat`);
  const [mu, ms] = ticks(`/proc/${server}/task/${server}/stat`);
  const [fu, fs] = ticks(`/proc/${nbdfuse}/stat`);
  return { serverMainUser: mu, serverMainSys: ms, serverOtherUser: su - mu, serverOtherSys: ss - ms, nbdfuseUser: fu, nbdfuseSys: fs };
}

/** cpuSplit(after) - cpuSplit(before), in µs per request. */
function splitPerIo(before, after, ios) {
  return Object.fromEntries(Object.keys(after).map((k) => [k, Math.round(((after[k] - before[k]) * 1e6) / ios)]));
}

/**
 * --strace: `strace -c -f` attached to the server (all its threads) for one fio run. Returns the stop
 * function, which detaches it and gives the calls of each syscall (errors included) from its
 * summary. strace slows every syscall, so a run's rate is not comparable; the counts are.
 */
function straceStart(pid, file) {
  const child = spawn('strace', ['-c', '-f', '-o', file, '-p', String(pid)], { stdio: 'ignore' });
  live.children.push(child);
  execFileSync('sleep', ['0.5']);
  return async () => {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGINT');
    await exited;
    const calls = {};
    for (const line of readFileSync(file, 'utf8').split('\n')) {
      const m = /^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$/.exec(line);
      if (m && m[3] !== 'total') calls[m[3]] = Number(m[1]);
    }
    return calls;
  };
}

function fio(dev, row) {
  const out = run('fio', [
    '--name=bench', `--filename=${dev}`, '--ioengine=libaio', '--direct=1', `--rw=${row.rw}`, `--bs=${row.bs}`, `--iodepth=${row.qd}`,
    '--ramp_time=1', `--runtime=${SECONDS}`, '--time_based', '--norandommap', '--randrepeat=0', '--group_reporting', '--output-format=json',
  ]);
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const side = row.rw.includes('read') ? job.read : job.write;
  return { value: row.unit === 'IOPS' ? Math.round(side.iops) : +(side.bw_bytes / 1e6).toFixed(0), ios: side.total_ios, seconds: side.runtime / 1000 };
}

const loadAtStart = loadavg().map((x) => +x.toFixed(2));
const results = Object.fromEntries(ROWS.map((r) => [r.id, { limit: [], ulobdev: [], nbdkit: [] }]));
/** CPU µs per request of the userspace side (server + its nbdfuse), per row and target. */
const cpuPerIo = Object.fromEntries(ROWS.map((r) => [r.id, { ulobdev: [], nbdkit: [] }]));
/** The same split by process, thread and user/system time (cpuSplit), per row and target. */
const cpuSplits = Object.fromEntries(ROWS.map((r) => [r.id, { ulobdev: [], nbdkit: [] }]));
/** The ulobdev daemon's dirty-intent rounds in each run (status `intents`, before and after). */
const intentRounds = Object.fromEntries(ROWS.map((r) => [r.id, []]));
/** --strace: the server's syscalls per request, per row and target. */
const syscalls = {};
try {
  live.dir = mkdtempSync(join(opts.dir, 'ulobloop-'));
  const d = live.dir;
  const disk = join(d, 'disk.img');
  log(`backing file of ${SIZE / MiB} MiB`);
  run('dd', ['if=/dev/urandom', `of=${disk}`, 'bs=4M', `count=${SIZE / (4 * MiB)}`, 'conv=fdatasync', 'status=none']);
  copyFileSync(disk, join(d, 'limit.img'));
  copyFileSync(disk, join(d, 'nbdkit.img'));

  // limit
  const limitDev = losetup(join(d, 'limit.img'));

  // nbdkit behind nbdfuse + loop, as ulobdev's own frontend does it
  const kitSock = join(d, 'kit.sock');
  const kit = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', kitSock, 'file', join(d, 'nbdkit.img')], { stdio: 'ignore' });
  live.children.push(kit);
  await waitFor(() => existsSync(kitSock), 'nbdkit');
  const kitMount = join(d, 'kitfuse');
  mkdirSync(kitMount);
  const fuse = spawn('nbdfuse', [join(kitMount, 'disk'), '--unix', kitSock], { stdio: 'ignore' });
  live.children.push(fuse);
  live.mounts.push(kitMount);
  await waitFor(() => existsSync(join(kitMount, 'disk')), 'nbdfuse');
  const kitDev = losetup(join(kitMount, 'disk'));

  // ulobdev, as a user starts it
  const runDir = join(d, 'run');
  const freeLoop = run('losetup', ['-f']).trim();
  // Its disk record goes to the bench's temp dir too: in /var/lib/ulobdev it would outlive the
  // disk file, whose inode a later run's disk.img may get, and that run's attach would be
  // refused for 256 MiB of dirty data in a cache that is gone (seen in session 9).
  const args = ['-c', join(d, 'u.cache'), '-b', join(d, 'u.bitmap'), '--writeback', '--name', 'benchloop', '--run-dir', runDir, '--state-dir', join(d, 'state'), '--log-level', 'warn', freeLoop, disk];
  if (opts.profile) {
    const profDir = dirname(opts.json);
    mkdirSync(profDir, { recursive: true });
    const child = spawn('node', ['--cpu-prof', `--cpu-prof-dir=${profDir}`, '--cpu-prof-name=loop-ulobdev.cpuprofile', CLI, ...args], { stdio: 'ignore' });
    live.children.push(child);
    live.profiled = child;
    live.daemon = { runDir, device: freeLoop };
    await waitFor(() => existsSync(join(runDir, 'benchloop.sock')) && run('losetup', ['-l', '-n', '-O', 'NAME']).includes(freeLoop), 'the ulobdev daemon', 60_000);
  } else {
    run('node', [CLI, '--daemon', ...args], { timeout: 60_000 });
    live.daemon = { runDir, device: freeLoop };
  }
  const ulobDev = freeLoop;
  const flush = () => run('node', [CLI, 'flush', '--run-dir', runDir, 'benchloop'], { timeout: 300_000 });
  log('reading every block once (ulobdev: all present), then writing every block once (all dirty)');
  for (const dev of [ulobDev, kitDev, limitDev]) {
    run('dd', [`if=${dev}`, 'of=/dev/null', 'bs=1M', 'iflag=direct', 'status=none']);
  }
  const fill = () => {
    for (const dev of [ulobDev, kitDev, limitDev]) run('dd', [`if=${disk}`, `of=${dev}`, 'bs=1M', 'oflag=direct', 'status=none']);
  };

  const targets = { limit: limitDev, ulobdev: ulobDev, nbdkit: kitDev };
  const status = () => {
    const st = JSON.parse(run('node', [CLI, 'status', '--json', '--run-dir', runDir, 'benchloop']));
    return Array.isArray(st) ? st[0] : st;
  };
  const intentsNow = () => status().intents;
  const daemonPid = status().pid;
  const ulobFusePid = Number(readFileSync(join(runDir, 'benchloop', 'nbdfuse.pid'), 'utf8'));
  const pids = { ulobdev: [daemonPid, ulobFusePid], nbdkit: [kit.pid, fuse.pid], limit: [] };
  const order = ['ulobdev', 'nbdkit', 'limit'];
  let dirty = false;
  for (let rep = 0; rep < REPS; rep++) {
    for (const row of ROWS) {
      if (!row.clean && !dirty) {
        fill();
        dirty = true;
      }
      const rot = order.map((_, i) => order[(i + rep + ROWS.indexOf(row)) % order.length]);
      for (const t of rot) {
        if (row.clean && t === 'ulobdev') {
          flush();
          dirty = false;
        }
        const intents0 = t === 'ulobdev' ? intentsNow() : null;
        const cpu0 = cpuSeconds(pids[t]);
        const split0 = t === 'limit' ? null : cpuSplit(pids[t]);
        const stopStrace = opts.strace && t !== 'limit' ? straceStart(pids[t][0], join(d, `strace-${t}.txt`)) : null;
        const r = fio(targets[t], row);
        const cpu = cpuSeconds(pids[t]) - cpu0;
        if (stopStrace) {
          const calls = await stopStrace();
          const perReq = Object.entries(calls)
            .map(([k, v]) => [k, +(v / r.ios).toFixed(2)])
            .filter(([, v]) => v >= 0.01)
            .sort((a, b) => b[1] - a[1]);
          (syscalls[row.id] ??= {})[t] = Object.fromEntries(perReq);
          log(`  ${t} syscalls per request (strace -c -f, ${r.ios} requests): ${perReq.map(([k, v]) => `${k} ${v}`).join(', ')}`);
        }
        results[row.id][t].push(r.value);
        let split = '';
        if (t !== 'limit') {
          cpuPerIo[row.id][t].push(Math.round((cpu * 1e6) / r.ios));
          const sp = splitPerIo(split0, cpuSplit(pids[t]), r.ios);
          cpuSplits[row.id][t].push(sp);
          split = ` [µs/req: server main ${sp.serverMainUser} usr + ${sp.serverMainSys} sys, other threads ${sp.serverOtherUser} + ${sp.serverOtherSys}; nbdfuse ${sp.nbdfuseUser} + ${sp.nbdfuseSys}]`;
        }
        let rounds = '';
        if (intents0) {
          // The daemon's intent rounds during this run (ramp included): first writes per WAL fsync.
          const i = intentsNow();
          const d = { rounds: i.rounds - intents0.rounds, blocks: i.blocks - intents0.blocks, syncMs: +(i.syncMs - intents0.syncMs).toFixed(1) };
          // Rounds whose start waited for the last round's writers, and waits that ran out (a
          // daemon from before the gather has neither).
          if (i.gathered !== undefined) Object.assign(d, { gathered: i.gathered - intents0.gathered, gatherTimeouts: i.gatherTimeouts - intents0.gatherTimeouts });
          if (d.rounds > 0) {
            intentRounds[row.id].push({ ...d, blocksPerRound: +(d.blocks / d.rounds).toFixed(2), msPerSync: +(d.syncMs / d.rounds).toFixed(2) });
            rounds = `; ${d.rounds} intent rounds, ${(d.blocks / d.rounds).toFixed(2)} blocks and ${(d.syncMs / d.rounds).toFixed(2)} ms of WAL fsync each`;
            if (d.gathered !== undefined) rounds += ` (${d.gathered} waited for writers, ${d.gatherTimeouts} ran out)`;
          }
        }
        log(`rep ${rep + 1} ${row.id} ${t}: ${r.value} ${row.unit}${t === 'limit' ? '' : `, ${Math.round((cpu * 1e6) / r.ios)} µs CPU per request${split}`}${rounds} (load ${loadavg()[0].toFixed(1)})`);
      }
    }
  }

  const loadAtEnd = loadavg().map((x) => +x.toFixed(2));
  const fmt = (v, unit) => `${v.toLocaleString('en-US')} ${unit}`;
  const table = ROWS.map((row) => {
    const best = Object.fromEntries(Object.entries(results[row.id]).map(([k, v]) => [k, Math.max(...v)]));
    return {
      workload: row.workload,
      limit: fmt(best.limit, row.unit),
      ulobdev: fmt(best.ulobdev, row.unit),
      nbdkit: fmt(best.nbdkit, row.unit),
      'ulobdev/limit': (best.ulobdev / best.limit).toFixed(2),
      'ulobdev/nbdkit': (best.ulobdev / best.nbdkit).toFixed(2),
      'CPU µs/req ulobdev': Math.min(...cpuPerIo[row.id].ulobdev),
      'CPU µs/req nbdkit': Math.min(...cpuPerIo[row.id].nbdkit),
      best,
      runs: results[row.id],
      cpuPerRequest: cpuPerIo[row.id],
      cpuSplitPerRequest: cpuSplits[row.id],
      ...(syscalls[row.id] ? { syscallsPerRequest: syscalls[row.id] } : {}),
      ...(intentRounds[row.id].length > 0 ? { intentRounds: intentRounds[row.id] } : {}),
    };
  });
  cleanup();
  printTable(
    ['workload', 'limit', 'ulobdev', 'nbdkit', 'ulobdev/limit', 'ulobdev/nbdkit', 'CPU µs/req ulobdev', 'CPU µs/req nbdkit'].map((k) => ({ key: k, title: k, align: k === 'workload' ? 'left' : 'right' })),
    table,
    {
      title: `bench/loop.js: fio libaio direct, ${SECONDS} s, best of ${REPS} interleaved runs; ${SIZE / MiB} MiB on ${opts.dir}`,
      notes: [
        'CPU µs/req: user + system time of the server and its nbdfuse per request (lowest of the runs); a load-independent measure of the work each request costs',
        `load average ${loadAtStart.join(' ')} at start, ${loadAtEnd.join(' ')} at end (${cpus().length} CPUs)`,
        ...ROWS.filter((row) => intentRounds[row.id].length > 0).map(
          (row) =>
            `${row.id}, ulobdev's dirty-intent rounds per run: ${intentRounds[row.id].map((x) => `${x.rounds} rounds of ${x.blocksPerRound} blocks, ${x.msPerSync} ms WAL fsync each`).join('; ')}`,
        ),
      ],
    },
  );
  writeJson(opts.json, {
    at: new Date().toISOString(),
    machine: { cpus: cpus().length, cpu: cpus()[0]?.model, memory: totalmem(), kernel: release(), node: process.version, loadAverage: { start: loadAtStart, end: loadAtEnd } },
    params: { size: SIZE, seconds: SECONDS, reps: REPS, dir: opts.dir },
    rows: table,
  });
} finally {
  cleanup();
}
