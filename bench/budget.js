#!/usr/bin/env node
// A cache smaller than the disk (issue 12): hit ratio and throughput of a skewed read workload
// (fio random_distribution=zipf:1.1, 4 KiB, QD16, direct) over a disk 8x the cache, for ulobdev
// (--cache-size, through /dev/nbd0: the kernel NBD client on ulobdev's NBD server; /dev/uloopN takes
// no budget yet), dm-cache (the smq policy lvmcache uses, 64 KiB cache blocks as lvmcache's default
// chunk) and bcache (writethrough, 64 KiB buckets: a small cache set has too few 512 KiB ones;
// sequential cutoff and congestion bypass off), each with the same
// cache size, in one guest.
//
//   node bench/budget.js [--disk 512M] [--warm 30] [--seconds 30] [--json bench/results/budget.json] [--keep]
//
// The "disk" is a file on a RAM disk behind dm-delay (5 ms per read and write), so a miss costs
// what a seek does and hits are CPU-bound (an emulated CPU: only the ratios mean something). Each
// cache first runs the workload for --warm seconds, then for --seconds measured. Rows: the cache's
// own hit ratio (ulobdev status, dm-cache status, bcache stats_total), the bytes read from the disk
// per byte fio read (unit fills and promotions read more than asked), IOPS and latency. Not a
// test: exit code 0 unless the bench itself breaks.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { printTable, writeJson } from './lib/table.js';

function fail(message) {
  process.stderr.write(`bench/budget.js: ${message}\n`);
  process.exit(2);
}

let opts;
try {
  ({ values: opts } = parseArgs({
    options: {
      disk: { type: 'string', default: '512M' },
      warm: { type: 'string', default: '30' },
      seconds: { type: 'string', default: '30' },
      delay: { type: 'string', default: '5' },
      json: { type: 'string', default: fileURLToPath(new URL('./results/budget.json', import.meta.url)) },
      keep: { type: 'boolean', default: false },
      only: { type: 'string', default: 'ulobdev,dmcache,bcache' },
      'cpu-prof': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  }));
} catch (err) {
  fail(`${err.message}; see --help`);
}
if (opts.help) {
  process.stdout.write(
    'usage: node bench/budget.js [--disk 512M] [--warm 30] [--seconds 30] [--delay 5] [--json PATH] [--keep]\n' +
      '  --disk     the disk in MiB (suffix M, 256M to 1024M); every cache gets 1/8 of it\n' +
      '  --warm     seconds of the workload before the measured run\n' +
      '  --seconds  seconds measured\n' +
      '  --delay    ms dm-delay adds to every read and write of the disk\n' +
      '  --only     the caches to run, of ulobdev,dmcache,bcache\n' +
      '  --cpu-prof the ulobdev daemon (and its CLI calls) run with node --cpu-prof (execArgv: NODE_OPTIONS refuses it); profiles are kept in the scratch directory (--keep)\n',
  );
  process.exit(0);
}
const m = /^(\d+)M$/.exec(opts.disk);
if (!m) fail('--disk must look like 512M');
const DISK_MB = Number(m[1]);
if (DISK_MB < 256 || DISK_MB > 1024) fail('--disk must be from 256M to 1024M');
const CACHE_MB = DISK_MB / 8;
const WARM = Number(opts.warm);
const SECONDS = Number(opts.seconds);
const DELAY = Number(opts.delay);
for (const [name, v] of [['--warm', WARM], ['--seconds', SECONDS]]) if (!(Number.isInteger(v) && v >= 1 && v <= 600)) fail(`${name} must be a whole number from 1 to 600`);
if (!(Number.isInteger(DELAY) && DELAY >= 0 && DELAY <= 100)) fail('--delay must be a whole number of ms from 0 to 100');

const ROOT = fileURLToPath(new URL('..', import.meta.url));
for (const f of ['dist/cli/ulobdev.js', 'build/Release/ulob_native.node']) {
  if (!existsSync(join(ROOT, f))) fail(`${f} is missing; build first (make build)`);
}
if (process.getuid?.() !== 0) fail('needs root (scripts/vm/prepare.sh installs packages)');
for (const tool of ['make-bcache', 'fio', 'dmsetup']) {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore', env: { ...process.env, PATH: `${process.env.PATH}:/usr/sbin:/sbin` } });
  } catch {
    fail(`${tool} is missing on the host (the guest runs the host's programs): apt-get install bcache-tools fio dmsetup`);
  }
}

const ONLY = new Set(opts.only.split(','));
for (const k of ONLY) if (!['ulobdev', 'dmcache', 'bcache'].includes(k)) fail(`--only takes ulobdev, dmcache and bcache, not ${k}`);
const CACHES = [
  { key: 'ulobdev', title: 'ulobdev --cache-size (nbd)' },
  { key: 'dmcache', title: 'dm-cache smq' },
  { key: 'bcache', title: 'bcache' },
].filter((c) => ONLY.has(c.key));

const fio = (dev, tag, seconds) =>
  `fio --name=${tag} --filename=${dev} --rw=randread --random_distribution=zipf:1.1 --bs=4k --direct=1 --ioengine=libaio ` +
  `--iodepth=16 --time_based --runtime=${seconds} --randseed=42 --output-format=json --output=/mnt/fio-${tag}.json > /dev/null`;

// In the guest: $R an ext4 filesystem on a RAM disk; the disk /dev/mapper/hdd is a file there behind
// a loop device and dm-delay; each cache's flash is another file there behind a loop device.
const SECTORS = DISK_MB * 2048;
const script = `
U="node ${ROOT}/dist/cli/ulobdev.js"
step() { echo "== $1 $(cut -d' ' -f1 /proc/uptime)"; }
hddread() { awk '{print $3 * 512}' /sys/block/dm-$(dmsetup info -c --noheadings -o minor hdd | tr -d ' ')/stat; }
measure() { # DEV TAG: warm up, then a measured run, with the disk's bytes read around it
  ${fio('$1', '$2-warm', WARM)}
  echo "$2 hdd-before $(hddread)"
  ${fio('$1', '$2', SECONDS)}
  echo "$2 hdd-after $(hddread)"
}
modprobe brd rd_nr=1 rd_size=$(( (${DISK_MB} + ${CACHE_MB} * 3 + 256) * 1024 ))
modprobe crc32c_generic; modprobe ext4; modprobe loop; modprobe nbd
modprobe dm-delay; modprobe dm-cache; modprobe dm-cache-smq; modprobe bcache
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/ram0 && mkdir -p /tmp/r && mount /dev/ram0 /tmp/r
R=/tmp/r
head -c $(( ${DISK_MB} << 20 )) /dev/urandom > $R/disk.img
LD=$(losetup --direct-io=on -f --show $R/disk.img)
dmsetup create --noudevsync hdd --table "0 ${SECTORS} delay $LD 0 ${DELAY}" && dmsetup mknodes hdd
flash() { truncate -s $2 $R/$1 && losetup --direct-io=on -f --show $R/$1; }

if ${ONLY.has('ulobdev')}; then
step ulobdev
${opts['cpu-prof'] ? `U="node --cpu-prof --cpu-prof-dir=/mnt ${ROOT}/dist/cli/ulobdev.js"` : ''}
$U -c $R/u.cache -b $R/u.bitmap --cache-size ${CACHE_MB}M --daemon /dev/nbd0 /dev/mapper/hdd >/dev/null
measure /dev/nbd0 ulobdev
$U status /dev/nbd0 --json > /mnt/ulobdev-status.json
$U detach /dev/nbd0 >/dev/null
fi

if ${ONLY.has('dmcache')}; then
step dmcache
META=$(flash dmc.meta 16M); CD=$(flash dmc.cache ${CACHE_MB}M)
dd if=/dev/zero of=$META bs=4k count=1 oflag=direct status=none
dmsetup create --noudevsync dmc --table "0 ${SECTORS} cache $META $CD /dev/mapper/hdd 128 1 writethrough smq 0" && dmsetup mknodes dmc
measure /dev/mapper/dmc dmcache
dmsetup status dmc > /mnt/dmcache-status.txt
dmsetup remove dmc; losetup -d $META $CD
fi

if ${ONLY.has('bcache')}; then
step bcache
BC=$(flash bc.cache ${CACHE_MB}M)
make-bcache --block 4k --bucket 64k -C $BC -B /dev/mapper/hdd > /dev/null
echo $BC > /sys/fs/bcache/register; echo /dev/mapper/hdd > /sys/fs/bcache/register
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/bcache0 ] && break; sleep 1; done
echo 0 > /sys/block/bcache0/bcache/sequential_cutoff
for f in /sys/fs/bcache/*/congested_read_threshold_us /sys/fs/bcache/*/congested_write_threshold_us; do echo 0 > $f; done
measure /dev/bcache0 bcache
for f in cache_hits cache_misses cache_bypass_hits cache_bypass_misses; do echo "bcache $f $(cat /sys/block/bcache0/bcache/stats_total/$f)"; done
fi
step done
`;

process.stderr.write('bench/budget.js: preparing the VM (scripts/vm/prepare.sh)\n');
const out = execFileSync('bash', [join(ROOT, 'scripts/vm/prepare.sh')], {
  encoding: 'utf8',
  stdio: ['ignore', 'pipe', 'inherit'],
  timeout: 900_000,
  env: { ...process.env, ULOOP_VM_NO_MODULE: '1' },
});
const vm = Object.fromEntries(out.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));

const base = join(ROOT, '.vm', 'run');
mkdirSync(base, { recursive: true });
const scratch = mkdtempSync(join(base, 'budget-'));
writeFileSync(join(scratch, 'cmd.sh'), `set -e\n${script}\n`);
const memoryMb = 1024 + DISK_MB + CACHE_MB * 3 + 256;
const args = [
  '-accel', 'tcg', '-cpu', 'max', '-smp', '2', '-m', String(memoryMb),
  '-nographic', '-no-reboot', '-monitor', 'none',
  '-kernel', vm.KERNEL, '-initrd', vm.INITRD,
  '-append', `console=ttyS0 panic=-1 loglevel=4 ulobvm.modules=${vm.MODULES} ulobvm.project=${ROOT}`,
  '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
  '-virtfs', `local,path=${scratch},mount_tag=scratch,security_model=none`,
];
const load = { start: loadavg() };
const started = Date.now();
process.stderr.write(`bench/budget.js: booting (${memoryMb} MiB, 2 vCPUs); ${CACHES.length} caches x ${WARM + SECONDS} s\n`);
const qemu = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
const stop = () => qemu.kill('SIGKILL');
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    stop();
    rmSync(scratch, { recursive: true, force: true });
    process.exit(130);
  });
}
let consoleText = '';
qemu.stdout.setEncoding('utf8').on('data', (s) => (consoleText += s));
qemu.stderr.setEncoding('utf8').on('data', (s) => (consoleText += s));
const timer = setTimeout(stop, 900_000 + CACHES.length * (WARM + SECONDS) * 3000);
await new Promise((r) => qemu.on('close', r));
clearTimeout(timer);
load.end = loadavg();
const wallMs = Date.now() - started;

const read = (name) => (existsSync(join(scratch, name)) ? readFileSync(join(scratch, name), 'utf8') : '');
const guestOut = read('out.log');
if (read('rc').trim() !== '0') {
  process.stderr.write(`--- guest failed (rc ${read('rc').trim() || 'none'}), scratch ${scratch} ---\n${guestOut}\n--- kernel log ---\n${read('dmesg.log') || consoleText}\n`);
  process.exit(1);
}

// Results -------------------------------------------------------------------------------------

const hdd = (tag, when) => Number(new RegExp(`^${tag} hdd-${when} (\\d+)$`, 'm').exec(guestOut)?.[1] ?? NaN);
const own = {};
{
  const st = ONLY.has('ulobdev') ? JSON.parse(read('ulobdev-status.json')) : {};
  own.ulobdev = { hits: st.readHits, misses: st.readMisses, evictedBytes: st.evictedBytes, usedBytes: st.usedBytes, budgetBytes: st.budgetBytes };
  // dm-cache status: <meta used>/<total> <block size> <used>/<total> <read hits> <read misses> <write hits> <write misses> ...
  const f = read('dmcache-status.txt').trim().split(/\s+/);
  own.dmcache = { hits: Number(f[7]), misses: Number(f[8]) };
  const b = (k) => Number(new RegExp(`^bcache ${k} (\\d+)$`, 'm').exec(guestOut)?.[1] ?? NaN);
  own.bcache = { hits: b('cache_hits') + b('cache_bypass_hits'), misses: b('cache_misses') + b('cache_bypass_misses') };
}
const results = {};
for (const c of CACHES) {
  const j = JSON.parse(read(`fio-${c.key}.json`)).jobs[0].read;
  const warm = JSON.parse(read(`fio-${c.key}-warm.json`)).jobs[0].read;
  const diskBytes = hdd(c.key, 'after') - hdd(c.key, 'before');
  results[c.key] = {
    iops: Math.round(j.iops),
    latP50us: Math.round(j.clat_ns.percentile['50.000000'] / 1000),
    latP99us: Math.round(j.clat_ns.percentile['99.000000'] / 1000),
    readBytes: j.io_bytes,
    warmReadBytes: warm.io_bytes,
    diskReadBytes: diskBytes,
    // Counted over warm-up and measured run together (the caches' counters cannot be reset).
    hitRatio: Number((own[c.key].hits / (own[c.key].hits + own[c.key].misses)).toFixed(3)),
    diskBytesPerReadByte: Number((diskBytes / j.io_bytes).toFixed(3)),
    ...own[c.key],
  };
}
const best = Math.max(results.dmcache?.hitRatio ?? 0, results.bcache?.hitRatio ?? 0);
const rows = CACHES.map((c) => ({
  cache: c.title,
  hitRatio: results[c.key].hitRatio.toFixed(3),
  disk: results[c.key].diskBytesPerReadByte.toFixed(3),
  iops: results[c.key].iops.toLocaleString('en-US'),
  ratio: results.dmcache ? (results[c.key].iops / results.dmcache.iops).toFixed(2) : '',
  p50: results[c.key].latP50us,
  p99: results[c.key].latP99us,
}));
printTable(
  [
    { key: 'cache', title: `zipf:1.1 4 KiB randread QD16, ${SECONDS} s after ${WARM} s` },
    { key: 'hitRatio', title: 'hit ratio', align: 'right' },
    { key: 'disk', title: 'disk B/read B', align: 'right' },
    { key: 'iops', title: 'IOPS', align: 'right' },
    { key: 'ratio', title: '/dm-cache', align: 'right' },
    { key: 'p50', title: 'p50 µs', align: 'right' },
    { key: 'p99', title: 'p99 µs', align: 'right' },
  ],
  rows,
  {
    title: `In the guest (qemu TCG, 2 vCPUs, ${memoryMb} MiB; Debian ${vm.KVER}); ${DISK_MB} MiB disk (dm-delay ${DELAY} ms), ${CACHE_MB} MiB of cache each; host load ${load.start.map((x) => x.toFixed(1)).join(' ')}`,
    notes: [
      `hit ratio: each cache's own count of read requests served from flash (warm-up included); goal: ulobdev >= the best of dm-cache and bcache (${best.toFixed(3)})`,
      results.ulobdev && `ulobdev: ${results.ulobdev.evictedBytes / 1048576} MiB evicted, ${(results.ulobdev.usedBytes / 1048576).toFixed(1)} of ${results.ulobdev.budgetBytes / 1048576} MiB used`,
      `wall time ${(wallMs / 1000).toFixed(0)} s`,
    ].filter(Boolean),
  },
);
writeJson(opts.json, {
  bench: 'budget',
  date: new Date().toISOString(),
  machine: { cpus: cpus().length, cpuModel: cpus()[0]?.model, loadAverage: load, guest: { kernel: vm.KVER, memoryMb, vcpus: 2, accel: 'tcg' } },
  params: { diskMiB: DISK_MB, cacheMiB: CACHE_MB, warmSeconds: WARM, seconds: SECONDS, delayMs: DELAY, bs: 4096, iodepth: 16, distribution: 'zipf:1.1' },
  results,
  guest: { steps: [...guestOut.matchAll(/^== (\S+) ([\d.]+)$/gm)].map((x) => [x[1], Number(x[2])]) },
  wallSeconds: Math.round(wallMs / 1000),
});
if (opts.keep) process.stderr.write(`bench/budget.js: scratch kept in ${scratch}\n`);
else rmSync(scratch, { recursive: true, force: true });
