#!/usr/bin/env node
// Write-back and hydration against dd on the same backing file, in one run.
//
//   npx tsc -p tsconfig.json && node bench/flush.js [--size 256M] [--dir /var/tmp] [--json bench/results/flush.json]
//
// Rows: flushDirty of contiguous dirty data vs `dd bs=4M conv=fdatasync` of the same bytes; 4 KiB
// dirty blocks at random offsets flushed sorted and coalesced (flushDirty) vs the same blocks
// written in random order and synced; hydration (Hydrator, no rate limit) vs `dd` sequential read,
// both after dropping the page cache (needs root; without it the reads come from memory). Goals:
// ratio >= 0.9 for flush and hydration. Not a test: no assertions.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, openSync, closeSync, fdatasyncSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { printTable, writeJson } from './lib/table.js';

const { values: opts } = parseArgs({
  options: { size: { type: 'string', default: '256M' }, dir: { type: 'string', default: '/var/tmp' }, json: { type: 'string', default: new URL('./results/flush.json', import.meta.url).pathname } },
});
const MiB = 1 << 20;
const SIZE = Number(/^(\d+)M$/i.exec(opts.size)?.[1] ?? 256) * MiB;
const RANDOM_BLOCKS = 4096;

const { CacheEngine } = await import('../dist/cache/engine.js');
const { CacheStore } = await import('../dist/cache/store.js');
const { openBacking } = await import('../dist/source/backing.js');
const { flushDirty } = await import('../dist/writeback/flusher.js');
const { Hydrator } = await import('../dist/writeback/hydrate.js');

const dir = mkdtempSync(join(opts.dir, 'ulob-bench-flush-'));
const disk = join(dir, 'disk.img');
writeFileSync(disk, Buffer.alloc(0));
execFileSync('truncate', ['-s', String(SIZE), disk]);

function dropCaches() {
  try {
    writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch {
    return false;
  }
}

async function open(name) {
  const source = await openBacking(disk, { writable: true });
  const store = await CacheStore.open({ paths: { cache: join(dir, `${name}.cache`), bitmap: join(dir, `${name}.bitmap`), metadata: join(dir, `${name}.meta`) }, backing: source, mode: 'writeback' });
  return { engine: new CacheEngine(store, source, { autoCommitMs: 0 }), source };
}

const mbs = (bytes, ms) => Math.round(bytes / MiB / (ms / 1000));
const rows = [];

// 1. Contiguous flush vs dd.
{
  const { engine, source } = await open('seq');
  const chunk = randomBytes(4 * MiB);
  for (let off = 0; off < SIZE; off += chunk.length) await engine.write(off, chunk);
  await engine.flush();
  const t = performance.now();
  const r = await flushDirty(engine);
  const ours = performance.now() - t;
  await engine.close();
  await source.close();
  const src = join(dir, 'src.bin');
  execFileSync('dd', [`if=/dev/urandom`, `of=${src}`, 'bs=4M', `count=${SIZE / (4 * MiB)}`, 'status=none']);
  const t2 = performance.now();
  execFileSync('dd', [`if=${src}`, `of=${disk}`, 'bs=4M', 'conv=fdatasync,notrunc', 'status=none']);
  const dd = performance.now() - t2;
  rmSync(src);
  rows.push({ workload: `flush ${r.bytes / MiB} MiB contiguous`, ours: mbs(r.bytes, ours), baseline: mbs(SIZE, dd), baselineName: 'dd bs=4M conv=fdatasync', ratio: +(dd / ours).toFixed(2) });
}

// 2. Random 4 KiB dirty blocks: sorted+coalesced vs unsorted.
{
  const { engine, source } = await open('rnd');
  const blocks = new Set();
  while (blocks.size < RANDOM_BLOCKS) blocks.add(Math.floor(Math.random() * (SIZE / 4096)));
  const list = [...blocks];
  const data = randomBytes(4096);
  for (const b of list) await engine.write(b * 4096, data);
  await engine.flush();
  const t = performance.now();
  await flushDirty(engine);
  const ours = performance.now() - t;
  await engine.close();
  await source.close();
  const fd = openSync(disk, 'r+');
  const t2 = performance.now();
  for (const b of list) writeSync(fd, data, 0, 4096, b * 4096);
  fdatasyncSync(fd);
  const unsorted = performance.now() - t2;
  closeSync(fd);
  rows.push({ workload: `flush ${RANDOM_BLOCKS} random 4 KiB blocks`, ours: mbs(RANDOM_BLOCKS * 4096, ours), baseline: mbs(RANDOM_BLOCKS * 4096, unsorted), baselineName: 'same blocks unsorted + fdatasync', ratio: +(unsorted / ours).toFixed(2) });
}

// 3. Hydration vs dd read.
let dropped = false;
{
  const { engine, source } = await open('hyd');
  dropped = dropCaches();
  const t = performance.now();
  await new Hydrator(engine, { quietMs: 0 }).start();
  const ours = performance.now() - t;
  await engine.close();
  await source.close();
  dropCaches();
  const t2 = performance.now();
  execFileSync('dd', [`if=${disk}`, 'of=/dev/null', 'bs=1M', 'status=none']);
  const dd = performance.now() - t2;
  rows.push({ workload: `hydrate ${SIZE / MiB} MiB`, ours: mbs(SIZE, ours), baseline: mbs(SIZE, dd), baselineName: 'dd bs=1M read', ratio: +(dd / ours).toFixed(2) });
}

rmSync(dir, { recursive: true, force: true });
printTable(
  [
    { key: 'workload', title: 'workload' },
    { key: 'ours', title: 'ulobdev MB/s' },
    { key: 'baseline', title: 'baseline MB/s' },
    { key: 'baselineName', title: 'baseline' },
    { key: 'ratio', title: 'ratio' },
  ],
  rows,
  { title: `bench/flush.js, backing file on ${opts.dir}`, notes: [dropped ? 'page cache dropped before each read row' : 'page cache NOT dropped (not root): read rows are memory speed'] },
);
writeJson(opts.json, { at: new Date().toISOString(), size: SIZE, rows });
