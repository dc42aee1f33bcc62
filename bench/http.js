#!/usr/bin/env node
// bench/http.js: one ext4 image on one nginx (127.0.0.1), exposed through a loop device by three
// tools in turn — ulohttp; nbdkit's curl plugin + cache filter through nbdfuse; httpdirfs — each
// with no added latency and with DELAY ms per direction (a delaying TCP proxy). Workloads, each
// on cold caches: sequential read of a big file, listing + reading the small files, fio 4 KiB
// random reads at iodepth 32 on another big file. Bytes fetched come from nginx's access log.
//
//   node bench/http.js [--big 256M] [--files 2000] [--fio-seconds 10] [--delay 20] [--cap 20]
//                      [--only ulohttp,nbdkit,httpdirfs] [--json bench/results/http.json]
//                      [--cpu-prof DIR]   (ulohttp's daemon writes a V8 CPU profile there at detach)
//                      [--base DIR]       (tool `base`: ulohttp from another checkout's dist/, for a
//                                          same-run A/B on one image: --only base,ulohttp,ulohttp,base)
// Needs root, nginx-light, nbdkit (curl plugin), nbdfuse, httpdirfs, fio, and a built dist/.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, promises as fsp, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { loadavg } from 'node:os';
import { printTable, writeJson } from './lib/table.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const { values: opt } = parseArgs({
  options: {
    big: { type: 'string', default: '256M' },
    files: { type: 'string', default: '2000' },
    'fio-seconds': { type: 'string', default: '10' },
    delay: { type: 'string', default: '20' },
    cap: { type: 'string', default: '20' },
    only: { type: 'string', default: 'ulohttp,nbdkit,httpdirfs' },
    json: { type: 'string', default: join(ROOT, 'bench/results/http.json') },
    dir: { type: 'string', default: '/var/tmp' },
    'cpu-prof': { type: 'string' },
    base: { type: 'string' },
  },
});
const MiB = 1 << 20;
const BIG = parseInt(opt.big, 10) * (/G$/i.test(opt.big) ? 1024 : 1) * MiB;
const FILES = Number(opt.files);
const FIO_S = Number(opt['fio-seconds']);
const DELAY = Number(opt.delay);
const CAP_S = Number(opt.cap);
const log = (...a) => process.stderr.write(`[http-bench] ${a.join(' ')}\n`);
function sh(cmd, args, o = {}) {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], ...o });
  } catch (err) {
    throw new Error(`${cmd} failed: ${String(err.stderr || err.message).trim().split('\n').pop()}`);
  }
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

if (process.getuid() !== 0) throw new Error('bench/http.js needs root (loop devices, mounts)');
const work = mkdtempSync(join(opt.dir, 'ulohttp-bench-'));
const cleanups = [];
async function cleanup() {
  for (const fn of cleanups.splice(0).reverse()) {
    try {
      await fn();
    } catch (err) {
      log('cleanup:', err.message.split('\n')[0]);
    }
  }
  rmSync(work, { recursive: true, force: true });
}
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(sig, () => cleanup().finally(() => process.exit(130)));

// --- the image ---------------------------------------------------------------------------------

function makeImage() {
  const tree = join(work, 'tree');
  mkdirSync(join(tree, 'small'), { recursive: true });
  const chunk = randomBytes(MiB);
  for (const name of ['big.bin', 'rand.bin']) {
    const parts = [];
    for (let i = 0; i < BIG / MiB; i++) {
      chunk.writeUInt32LE(i, 0);
      parts.push(Buffer.from(chunk));
    }
    writeFileSync(join(tree, name), Buffer.concat(parts));
  }
  let smallBytes = 0;
  for (let i = 0; i < FILES; i++) {
    const d = join(tree, 'small', `d${Math.floor(i / 100)}`);
    if (i % 100 === 0) mkdirSync(d);
    const size = 1024 + ((i * 7919) % 15360);
    writeFileSync(join(d, `f${i}`), randomBytes(size));
    smallBytes += size;
  }
  const www = join(work, 'www');
  mkdirSync(www);
  const sizeMiB = Math.ceil((2 * BIG + smallBytes + FILES * 4096) / MiB * 1.15) + 64;
  sh('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', '-d', tree, join(www, 'disk.img'), `${sizeMiB}M`]);
  rmSync(tree, { recursive: true, force: true });
  return { path: join(www, 'disk.img'), www, smallBytes };
}

// --- servers -----------------------------------------------------------------------------------

async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

async function waitPort(port) {
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise((r) => {
      const c = net.connect(port, '127.0.0.1', () => (c.destroy(), r(true)));
      c.on('error', () => r(false));
    });
    if (ok) return;
    await sleep(50);
  }
  throw new Error(`nothing listens on ${port}`);
}

function stopChild(child) {
  if (child.exitCode !== null) return Promise.resolve();
  return new Promise((r) => {
    child.once('exit', r);
    process.kill(child.pid, 'SIGTERM');
  });
}

async function startNginx(www) {
  const dir = join(work, 'nginx');
  mkdirSync(dir);
  const port = await freePort();
  const conf = join(dir, 'nginx.conf');
  writeFileSync(conf, `daemon off; user root root; worker_processes 1; pid ${dir}/nginx.pid; error_log ${dir}/error.log warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; sendfile on; tcp_nopush on;
  log_format bytes '$body_bytes_sent $connection $http_range';
  client_body_temp_path ${dir}/b; proxy_temp_path ${dir}/p; fastcgi_temp_path ${dir}/f; uwsgi_temp_path ${dir}/u; scgi_temp_path ${dir}/s;
  server { listen 127.0.0.1:${port}; root ${www}; autoindex on; access_log ${dir}/access.log bytes; location / { } } }
`);
  const child = spawn('nginx', ['-c', conf, '-p', dir], { stdio: 'ignore' });
  cleanups.push(() => stopChild(child));
  await waitPort(port);
  const logPath = join(dir, 'access.log');
  const lines = () => (existsSync(logPath) ? readFileSync(logPath, 'utf8').split('\n').filter(Boolean) : []);
  return {
    port,
    bytesSent: () => lines().reduce((n, l) => n + (parseInt(l, 10) || 0), 0),
    /** Requests logged so far: [bytes sent, Range header, nginx's connection serial number]. */
    requests: () =>
      lines().map((l) => {
        const [bytes, conn, ...range] = l.split(' ');
        return [parseInt(bytes, 10) || 0, range.join(' '), Number(conn)];
      }),
  };
}

async function startDelayProxy(port, ms) {
  const child = spawn(process.execPath, [join(ROOT, 'bench/lib/delay-proxy.js'), String(port), String(ms)], { stdio: ['ignore', 'pipe', 'inherit'] });
  cleanups.push(() => stopChild(child));
  const p = await new Promise((r) => child.stdout.once('data', (d) => r(Number(String(d).trim()))));
  return p;
}

// --- contenders: each returns { loop, teardown } -------------------------------------------------

/** Starts a long-running helper in the background; returns a stop function (kill by PID). */
function bg(cmd, args, env = process.env) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], env });
  let err = '';
  child.stderr.on('data', (d) => (err = (err + d).slice(-2000)));
  const stop = () => stopChild(child);
  cleanups.push(stop);
  return { child, stop, stderr: () => err.trim().split('\n').pop() };
}

/** CPU time (user + system, ms, all threads) a process has used so far; undefined when it is gone. */
function cpuMs(pid) {
  try {
    // /proc/PID/stat: the fields after the command's closing parenthesis; utime and stime are 14 and 15.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(f[11]) + Number(f[12])) * 1000) / CLK_TCK;
  } catch {
    return undefined;
  }
}
const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;

/** The server's and nbdfuse's CPU ms so far ({} for a tool without them). */
function toolCpu(c) {
  const out = {};
  for (const [k, pid] of Object.entries(c.pids?.() ?? {})) {
    const ms = pid ? cpuMs(pid) : undefined;
    if (ms !== undefined) out[k] = ms;
  }
  return out;
}

function cpuDelta(a, b) {
  return Object.fromEntries(Object.keys(b).filter((k) => a[k] !== undefined).map((k) => [k, Math.round(b[k] - a[k])]));
}

const readPid = (path) => {
  try {
    return Number(readFileSync(path, 'utf8').trim()) || undefined;
  } catch {
    return undefined;
  }
};

function freeLoop() {
  return sh('losetup', ['-f']).trim();
}

async function waitFile(path, proc, ms = 20_000) {
  for (let t = 0; t < ms; t += 100) {
    if (existsSync(path)) return;
    if (proc && proc.child.exitCode !== null) throw new Error(`${proc.child.spawnfile} exited: ${proc.stderr()}`);
    await sleep(100);
  }
  throw new Error(`${path} did not appear`);
}

const contenders = {
  /** ulohttp from the checkout --base names (built there): the A side of a same-run A/B. */
  base(url, dir) {
    if (!opt.base) throw new Error('tool base needs --base DIR (a built checkout)');
    return contenders.ulohttp(url, dir, resolve(opt.base));
  },
  async ulohttp(url, dir, root = ROOT) {
    let loop;
    const run = join(dir, 'run');
    // --cpu-prof: the daemon (a child of this command) is started with the command's execArgv
    // (Node refuses --cpu-prof in NODE_OPTIONS); the status and detach commands are not profiled.
    const prof = opt['cpu-prof'] ? ['--cpu-prof', `--cpu-prof-dir=${resolve(opt['cpu-prof'], `${basename(dir)}`)}`] : [];
    // The free loop device `losetup -f` named may be taken by another program before ulohttp
    // binds it (tests running beside the bench): then ask again.
    for (let attempt = 1; ; attempt++) {
      loop = freeLoop();
      try {
        sh(process.execPath, [...prof, join(root, 'dist/cli/ulohttp.js'), '-c', join(dir, 'c.cache'), '--daemon', '--run-dir', run, '--log-level', 'warn', loop, url]);
        break;
      } catch (err) {
        if (attempt >= 5 || !/is in use/.test(String(err.message))) throw err;
        log(`${loop} was taken before ulohttp bound it; trying another`);
      }
    }
    const status = () => {
      try {
        const st = JSON.parse(sh(process.execPath, [join(root, 'dist/cli/ulohttp.js'), 'status', '--json', '--run-dir', run]));
        return Array.isArray(st) ? st[0] : st;
      } catch {
        return undefined;
      }
    };
    const sourceStats = () => status()?.source;
    // The daemon's pid (status), and nbdfuse's (its pidfile in the daemon's run directory, run/NAME).
    let known;
    const pids = () => {
      if (!known) {
        const sub = readdirSync(run).find((d) => existsSync(join(run, d, 'nbdfuse.pid')));
        known = { server: status()?.pid, nbdfuse: sub ? readPid(join(run, sub, 'nbdfuse.pid')) : undefined };
      }
      return known;
    };
    return { loop, sourceStats, pids, teardown: async () => void sh(process.execPath, [join(root, 'dist/cli/ulohttp.js'), 'detach', loop, '--run-dir', run]) };
  },
  async nbdkit(url, dir) {
    const sock = join(dir, 'nbdkit.sock');
    const kit = bg('nbdkit', ['-f', '-U', sock, '--filter=cache', 'curl', url, 'cache-on-read=true'], { ...process.env, TMPDIR: dir });
    await waitFile(sock, kit);
    const mnt = join(dir, 'fuse');
    mkdirSync(mnt);
    const fuse = bg('nbdfuse', ['-r', '-P', join(dir, 'nbdfuse.pid'), join(mnt, 'disk'), '--unix', sock]);
    await waitFile(join(dir, 'nbdfuse.pid'), fuse);
    const loop = freeLoop();
    sh('losetup', ['--direct-io=on', '-r', loop, join(mnt, 'disk')]);
    return {
      loop,
      pids: () => ({ server: kit.child.pid, nbdfuse: readPid(join(dir, 'nbdfuse.pid')) }),
      teardown: async () => {
        sh('losetup', ['-d', loop]);
        await sleep(200);
        spawnSync('fusermount3', ['-u', mnt]);
        await fuse.stop();
        await kit.stop();
      },
    };
  },
  async httpdirfs(url, dir) {
    const mnt = join(dir, 'fuse');
    mkdirSync(mnt);
    mkdirSync(join(dir, 'cache'));
    const base = url.slice(0, url.lastIndexOf('/') + 1);
    const fs = bg('httpdirfs', ['-f', '--cache', '--cache-location', join(dir, 'cache'), '--no-range-check', base, mnt]);
    await waitFile(join(mnt, 'disk.img'), fs);
    const loop = freeLoop();
    sh('losetup', ['--direct-io=on', '-r', loop, join(mnt, 'disk.img')]);
    return {
      loop,
      teardown: async () => {
        sh('losetup', ['-d', loop]);
        await sleep(200);
        spawnSync('fusermount3', ['-u', mnt]);
        await fs.stop();
      },
    };
  },
};

// --- workloads ---------------------------------------------------------------------------------

async function seqRead(path) {
  const fh = await fsp.open(path, 'r');
  const buf = Buffer.allocUnsafe(MiB);
  const t0 = performance.now();
  let bytes = 0;
  const deadline = t0 + CAP_S * 1000;
  for (;;) {
    const { bytesRead } = await fh.read(buf, 0, MiB, bytes);
    if (bytesRead === 0 || performance.now() > deadline) break;
    bytes += bytesRead;
  }
  const s = (performance.now() - t0) / 1000;
  await fh.close();
  return { bytes, seconds: s, complete: bytes >= BIG };
}

async function smallScan(dir) {
  const t0 = performance.now();
  const deadline = t0 + CAP_S * 1000;
  let bytes = 0;
  let files = 0;
  outer: for (const d of (await fsp.readdir(dir)).sort((a, b) => Number(a.slice(1)) - Number(b.slice(1)))) {
    const names = await fsp.readdir(join(dir, d));
    for (const n of names) {
      const data = await fsp.readFile(join(dir, d, n));
      bytes += data.length;
      files++;
      if (performance.now() > deadline) break outer;
    }
  }
  return { bytes, files, seconds: (performance.now() - t0) / 1000, complete: files === FILES };
}

function fio(file) {
  const out = sh('fio', ['--name=rand', `--filename=${file}`, '--readonly', '--rw=randread', '--bs=4k', '--iodepth=32', '--ioengine=libaio', '--direct=1', `--runtime=${FIO_S}`, '--time_based', '--output-format=json'], { timeout: (FIO_S + 60) * 1000 });
  const r = JSON.parse(out).jobs[0].read;
  return { bytes: r.io_bytes, iops: Math.round(r.iops), seconds: r.runtime / 1000 };
}

// --- main --------------------------------------------------------------------------------------

async function main() {
  const loadAtStart = loadavg().map((x) => +x.toFixed(2));
  log(`image: 2 × ${BIG / MiB} MiB files + ${FILES} small files`);
  const img = makeImage();
  const nginx = await startNginx(img.www);
  const latencies = [...new Set([0, DELAY])];
  const ports = { 0: nginx.port, [DELAY]: await startDelayProxy(nginx.port, DELAY) };
  const rows = [];
  for (const [turn, name] of opt.only.split(',').entries()) {
    for (const lat of latencies) {
      // A tool may be listed more than once (interleaved A/B runs): each run gets its own directory.
      const dir = join(work, `${name}-${lat}-${turn}`);
      mkdirSync(dir);
      const url = `http://127.0.0.1:${ports[lat]}/disk.img`;
      log(`${name} at ${lat} ms`);
      const row = { tool: name, latencyMs: lat, startedAt: new Date().toISOString(), load: +loadavg()[0].toFixed(2) };
      let c;
      try {
        c = await contenders[name](url, dir);
        const mnt = join(dir, 'mnt');
        mkdirSync(mnt);
        sh('mount', ['-t', 'ext4', '-o', 'ro,noload', c.loop, mnt]);
        try {
          let b0 = nginx.bytesSent();
          const q0 = nginx.requests().length;
          const seqCpu0 = toolCpu(c);
          const seq = await seqRead(join(mnt, 'big.bin'));
          row.seqCpuMs = cpuDelta(seqCpu0, toolCpu(c));
          await sleep(300);
          let b1 = nginx.bytesSent();
          // Connection reuse: the GETs of the sequential read and the connections they came on.
          const seqGets = nginx.requests().slice(q0);
          row.seqRequests = seqGets.length;
          row.seqConnections = new Set(seqGets.map(([, , conn]) => conn)).size;
          Object.assign(row, { seqMBps: +(seq.bytes / seq.seconds / 1e6).toFixed(1), seqFetchedPerRead: +((b1 - b0) / seq.bytes).toFixed(2), seqComplete: seq.complete });
          b0 = b1;
          const r0 = nginx.requests().length;
          const stats0 = c.sourceStats?.();
          const cpu0 = toolCpu(c);
          // CLOCK_MONOTONIC µs, the clock of a --cpu-prof profile's startTime: cuts it to the scan.
          const mono0 = Number(process.hrtime.bigint() / 1000n);
          const small = await smallScan(join(mnt, 'small'));
          row.smallMonoUs = [mono0, Number(process.hrtime.bigint() / 1000n)];
          // CPU the tool's server process (and nbdfuse) used for the scan: less load-sensitive than the time.
          row.smallCpuMs = cpuDelta(cpu0, toolCpu(c));
          await sleep(300);
          b1 = nginx.bytesSent();
          // Where the small-file scan's bytes went: the GETs by size, and the tool's own counters.
          const smallGets = nginx.requests().slice(r0);
          const sizes = smallGets.map(([n]) => n);
          row.smallConnections = new Set(smallGets.map(([, , conn]) => conn)).size;
          const bySize = {};
          for (const n of sizes) {
            const k = n <= 4096 ? '<=4K' : n <= 65536 ? '<=64K' : n <= MiB ? '<=1M' : '>1M';
            bySize[k] = (bySize[k] ?? { requests: 0, bytes: 0 });
            bySize[k].requests++;
            bySize[k].bytes += n;
          }
          row.smallRequests = bySize;
          const stats1 = c.sourceStats?.();
          if (stats0 && stats1) {
            row.smallSourceStats = Object.fromEntries(
              ['demandRequests', 'prefetchRequests', 'bytesFetched', 'bytesRead', 'readaheadHitBytes', 'readaheadWastedBytes'].map((k) => [k, Number(stats1[k]) - Number(stats0[k])]),
            );
          }
          Object.assign(row, { smallSeconds: +small.seconds.toFixed(2), smallFiles: small.files, smallFetchedPerRead: +((b1 - b0) / small.bytes).toFixed(2) });
          b0 = b1;
          const f = fio(join(mnt, 'rand.bin'));
          await sleep(300);
          b1 = nginx.bytesSent();
          Object.assign(row, { fioIops: f.iops, fioAmplification: +((b1 - b0) / f.bytes).toFixed(2) });
        } finally {
          spawnSync('umount', [mnt]);
        }
      } catch (err) {
        row.error = String(err.message).split('\n')[0];
        log(`${name} at ${lat} ms failed: ${row.error}`);
      } finally {
        await c?.teardown().catch((e) => log('teardown:', e.message));
      }
      rows.push(row);
      log(JSON.stringify(row));
    }
  }
  const fmt = (r) => ({
    ...r,
    seq: r.seqMBps === undefined ? '' : `${r.seqMBps}${r.seqComplete ? '' : ` (cut at ${CAP_S} s)`}`,
    small: r.smallSeconds === undefined ? '' : `${r.smallSeconds}${r.smallFiles < FILES ? ` (${r.smallFiles} files, cut)` : ''}`,
  });
  printTable(
    [
      { key: 'tool', title: 'tool' },
      { key: 'latencyMs', title: 'ms/dir' },
      { key: 'seq', title: 'seq MB/s', align: 'right' },
      { key: 'seqFetchedPerRead', title: 'seq fetch/read' },
      { key: 'small', title: `${FILES} files s`, align: 'right' },
      { key: 'smallFetchedPerRead', title: 'small fetch/read' },
      { key: 'fioIops', title: 'rand 4K IOPS' },
      { key: 'fioAmplification', title: 'rand fetch/read' },
      { key: 'error', title: 'error' },
    ],
    rows.map(fmt),
    {
      title: `HTTP images: ${BIG / MiB} MiB sequential file, ${FILES} small files, fio ${FIO_S} s randread QD32; cold caches; nginx on 127.0.0.1, +${DELAY} ms per direction via a TCP proxy`,
      notes: [`fetch/read = bytes nginx sent / bytes the workload read. Workloads cut at ${CAP_S} s report what they did until then.`],
    },
  );
  writeJson(opt.json, { params: { big: BIG, files: FILES, fioSeconds: FIO_S, delayMs: DELAY, capSeconds: CAP_S }, rows, kernel: sh('uname', ['-r']).trim(), nproc: sh('nproc', []).trim(), loadAverage: { start: loadAtStart, end: loadavg().map((x) => +x.toFixed(2)) } });
}

try {
  await main();
} finally {
  await cleanup();
}
