#!/usr/bin/env node
// Same-process A/B of two builds' flushDirty, for a change to the flush: each side's dist (A=DIR,
// B=DIR: checkouts with `make build` done; B defaults to this one) on its own cache over its own
// copy of the disk, interleaved (ref, A, B, then B, A, ref, ...) in one process under the same load,
// with bench/flush.js's bare copy of the same blocks (pread + pwrite each, one fdatasync) beside.
//   sudo A=/path/to/main N=4096 SIZE=256 REPS=8 node bench/flush-ab.js
//   sudo A=/path/to/main N=1 SIZE=64 REPS=30 DROP=0 node bench/flush-ab.js     (the fixed cost)
// N dirty 4 KiB blocks at random offsets of a SIZE MiB disk; DROP=1 (default, root): sync, drop the
// page cache and read the cache file back in before each run, as bench/flush.js. Prints medians,
// quartiles and every run's ms. Not a test.
import { mkdtempSync, rmSync, openSync, closeSync, fdatasyncSync, readSync, writeSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { execFileSync } from 'node:child_process';
import { loadavg } from 'node:os';
const SIZE = Number(process.env.SIZE ?? 256) << 20;
const N = Number(process.env.N ?? 4096);
const REPS = Number(process.env.REPS ?? 12);
const DROP = process.env.DROP !== '0';
const dir = mkdtempSync('/var/tmp/ulob-abin-');
const cpuMs = () => { const f = readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' '); return (Number(f[11]) + Number(f[12])) * 10; };
async function side(name, root) {
  const { CacheEngine } = await import(`${root}/dist/cache/engine.js`);
  const { CacheStore } = await import(`${root}/dist/cache/store.js`);
  const { openBacking } = await import(`${root}/dist/source/backing.js`);
  const { flushDirty } = await import(`${root}/dist/writeback/flusher.js`);
  const disk = join(dir, `${name}.disk`);
  execFileSync('dd', ['if=/dev/urandom', `of=${disk}`, 'bs=4M', `count=${SIZE / (4 << 20)}`, 'conv=fdatasync', 'status=none']);
  const source = await openBacking(disk, { writable: true });
  const cache = join(dir, `${name}.cache`);
  const store = await CacheStore.open({ paths: { cache, bitmap: join(dir, `${name}.bitmap`), metadata: join(dir, `${name}.meta`) }, backing: source, mode: 'writeback' });
  const engine = new CacheEngine(store, source, { autoCommitMs: 0 });
  return { name, engine, source, flushDirty, disk, cache, ms: [], cpu: [] };
}
if (!process.env.A) {
  process.stderr.write('bench/flush-ab.js: A=DIR names the other checkout (built) to compare with\n');
  process.exit(1);
}
const A = await side('A', process.env.A);
const B = await side('B', process.env.B ?? new URL('..', import.meta.url).pathname.replace(/\/$/, ''));
const picked = new Set();
while (picked.size < N) picked.add(Math.floor(Math.random() * (SIZE / 4096)));
const list = [...picked];
const data = randomBytes(4096);
const ref = { ms: [], cpu: [] };
function samePages(file) {
  if (!DROP) return;
  execFileSync('sync'); writeFileSync('/proc/sys/vm/drop_caches', '3');
  execFileSync('dd', [`if=${file}`, 'of=/dev/null', 'bs=4M', 'status=none']);
}
async function runOurs(s) {
  for (const b of list) await s.engine.write(b * 4096, data);
  await s.engine.flush();
  samePages(s.cache);
  const c = cpuMs(); const t = performance.now();
  const r = await s.flushDirty(s.engine);
  s.ms.push(performance.now() - t); s.cpu.push(cpuMs() - c);
  if (r.cleaned !== N) throw new Error(`${s.name} cleaned ${r.cleaned}`);
}
async function runRef() {
  for (const b of list) await B.engine.write(b * 4096, data);
  await B.engine.flush();
  samePages(B.cache);
  const c = cpuMs(); const t = performance.now();
  const cfd = openSync(B.cache, 'r'); const dfd = openSync(B.disk, 'r+'); const buf = Buffer.allocUnsafe(4096);
  for (const b of list) { readSync(cfd, buf, 0, 4096, b * 4096); writeSync(dfd, buf, 0, 4096, b * 4096); }
  fdatasyncSync(dfd); closeSync(dfd); closeSync(cfd);
  ref.ms.push(performance.now() - t); ref.cpu.push(cpuMs() - c);
  await B.flushDirty(B.engine); // clean again for the next round
}
const load0 = loadavg().map((x) => x.toFixed(2));
for (let i = 0; i < REPS; i++) {
  const order = i % 2 ? [B, A, 'ref'] : ['ref', A, B];
  for (const s of order) s === 'ref' ? await runRef() : await runOurs(s);
}
const q = (xs, p) => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor(p * s.length))]; };
const fmt = (o) => `median ${q(o.ms, 0.5).toFixed(2)} ms (p25 ${q(o.ms, 0.25).toFixed(2)}, p75 ${q(o.ms, 0.75).toFixed(2)}, min ${Math.min(...o.ms).toFixed(2)}); CPU median ${q(o.cpu, 0.5)} ms`;
console.log(`N=${N} blocks, ${SIZE >> 20} MiB, ${REPS} reps interleaved, page cache dropped: ${DROP}; load ${load0.join(' ')} -> ${loadavg().map((x) => x.toFixed(2)).join(' ')}`);
console.log(`A ${process.env.A}: ${fmt(A)}`);
console.log(`B ${process.env.B ?? 'this checkout'}: ${fmt(B)}`);
console.log(`ref copy : ${fmt(ref)}`);
console.log(`ratio ref/ours (median): A ${(q(ref.ms, 0.5) / q(A.ms, 0.5)).toFixed(2)}  B ${(q(ref.ms, 0.5) / q(B.ms, 0.5)).toFixed(2)};  B/A time ${(q(B.ms, 0.5) / q(A.ms, 0.5)).toFixed(2)}`);
console.log(`A ms ${A.ms.map((x) => x.toFixed(1)).join(' ')}`);
console.log(`B ms ${B.ms.map((x) => x.toFixed(1)).join(' ')}`);
console.log(`ref ms ${ref.ms.map((x) => x.toFixed(1)).join(' ')}`);
for (const s of [A, B]) { await s.engine.close(); await s.source.close(); }
rmSync(dir, { recursive: true, force: true });
