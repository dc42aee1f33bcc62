#!/usr/bin/env node
// bench/http-source.js: ulohttp's HTTP source alone (no engine, no FUSE, no NBD) reading an image
// sequentially from nginx on 127.0.0.1, directly or through bench/lib/delay-proxy.js: what the
// source's readahead and transport can do at a given latency, apart from the rest of the stack.
// The reader asks PAR reads of CHUNK KiB at once and waits for all of them, as FUSE hands the
// daemon a 1 MiB read in 128 KiB parts. Prints MB/s, GETs in flight (sampled every 5 ms) and
// MB/s per 32 MiB of the read (how fast the window ramps up).
//
//   node bench/http-source.js [--dist dist] [--delay 20] [--mb 256] [--chunk 128] [--par 8]
// Needs nginx and a built dist/ (npx tsc -p tsconfig.json). Runs as any user.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const { values: opt } = parseArgs({
  options: {
    dist: { type: 'string', default: join(ROOT, 'dist') },
    delay: { type: 'string', default: '20' },
    mb: { type: 'string', default: '256' },
    chunk: { type: 'string', default: '128' },
    par: { type: 'string', default: '8' },
  },
});
const MiB = 1024 * 1024;
const { HttpSource } = await import(pathToFileURL(join(resolve(opt.dist), 'source/http.js')).href);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

const work = mkdtempSync(join(tmpdir(), 'ulohttp-source-bench-'));
const children = [];
try {
  const total = Number(opt.mb) * MiB;
  const block = randomBytes(MiB);
  const parts = [];
  for (let i = 0; i < total / MiB; i++) {
    block.writeUInt32LE(i, 0);
    parts.push(Buffer.from(block));
  }
  writeFileSync(join(work, 'disk.img'), Buffer.concat(parts));
  const port = await freePort();
  writeFileSync(
    join(work, 'nginx.conf'),
    // As root, nginx's workers would run as nobody and could not read the private temp dir.
    `daemon off; ${process.getuid?.() === 0 ? 'user root root; ' : ''}worker_processes 1; pid ${work}/nginx.pid; error_log ${work}/error.log warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; sendfile on; tcp_nopush on;
  client_body_temp_path ${work}/b; proxy_temp_path ${work}/p; fastcgi_temp_path ${work}/f; uwsgi_temp_path ${work}/u; scgi_temp_path ${work}/s;
  server { listen 127.0.0.1:${port}; root ${work}; location / { } } }`,
  );
  children.push(spawn('nginx', ['-c', join(work, 'nginx.conf'), '-p', work], { stdio: 'ignore' }));
  await sleep(300);
  let target = port;
  if (Number(opt.delay) > 0) {
    const proxy = spawn(process.execPath, [join(ROOT, 'bench/lib/delay-proxy.js'), String(port), opt.delay], { stdio: ['ignore', 'pipe', 'inherit'] });
    children.push(proxy);
    target = await new Promise((r) => proxy.stdout.once('data', (d) => r(Number(String(d).trim()))));
  }
  const src = await HttpSource.open(`http://127.0.0.1:${target}/disk.img`, {});
  const chunk = Number(opt.chunk) * 1024;
  const par = Number(opt.par);
  let maxIn = 0;
  let sumIn = 0;
  let samples = 0;
  const sampler = setInterval(() => {
    const n = Number(src.stats().inFlight);
    maxIn = Math.max(maxIn, n);
    sumIn += n;
    samples++;
  }, 5);
  const t0 = performance.now();
  const segments = [];
  let segStart = t0;
  for (let pos = 0; pos < total; pos += chunk * par) {
    if (pos > 0 && pos % (32 * MiB) === 0) {
      const now = performance.now();
      segments.push(Math.round((32 * MiB) / 1e6 / ((now - segStart) / 1000)));
      segStart = now;
    }
    const reads = [];
    for (let i = 0; i < par && pos + i * chunk < total; i++) reads.push(src.readAt(Buffer.allocUnsafe(chunk), pos + i * chunk));
    await Promise.all(reads);
  }
  const seconds = (performance.now() - t0) / 1000;
  clearInterval(sampler);
  const st = src.stats();
  console.log(
    JSON.stringify({
      delayMs: Number(opt.delay),
      MBps: +(total / seconds / 1e6).toFixed(1),
      meanInFlight: +(sumIn / Math.max(1, samples)).toFixed(1),
      maxInFlight: maxIn,
      requests: st.requests,
      demandRequests: st.demandRequests,
      prefetchRequests: st.prefetchRequests,
      MBpsPer32MiB: segments.join(' '),
    }),
  );
  await src.close();
} finally {
  for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
  await sleep(100);
  rmSync(work, { recursive: true, force: true });
}
