#!/usr/bin/env node
// A cache smaller than the disk (issue 12): hit ratio and throughput of a skewed read workload
// (fio random_distribution=zipf:1.1, 4 KiB, QD16, direct) over a disk 8x the cache, for ulobdev
// (--cache-size) on each of its three paths: /dev/nbd0 (the kernel NBD client on the daemon's NBD
// server: every request through the daemon), /dev/uloop0 (uloop.ko serves hits in the kernel, the
// daemon fills misses and evicts) and /dev/ublkb0 (the ublk
// server in native code serves hits, the daemon's engine misses and evictions; ublk_drv, 6.0+);
// against dm-cache (the smq policy lvmcache uses, 64 KiB cache blocks as lvmcache's default chunk)
// and bcache (writethrough; sequential cutoff and congestion bypass off; buckets of cache/1024, at
// most 512 KiB: bcache refuses a cache set of 512 buckets or fewer, "ca->sb.nbuckets is too small",
// so a 32 MiB cache needs 32 KiB buckets), each with the same cache size, in one guest, in the order
// --only gives (run it twice with the order reversed to see what order does).
//
//   node bench/budget.js [--disk 256M] [--warm-ios 40000] [--ios 20000] [--only nbd,uloop,ublk,dmcache,bcache] [--bcache-bucket K] [--eviction-unit K] [--json bench/results/budget.json] [--keep]
//   node bench/budget.js --time [--warm 30] [--seconds 30] ...   (the old mode: phases of a time)
//
// The "disk" is a file on a RAM disk behind dm-delay (5 ms per read and write), so a miss costs
// what a seek does and hits are CPU-bound (an emulated CPU: only the ratios mean something).
// By default every cache sees the same requests: one zipf:1.1 offsets sequence is drawn once on the
// host (fio, ioengine=null, randseed 42, --write_iolog) and split in two; each cache replays the first
// --warm-ios requests (warm-up), then, after a pause of PAUSE_SECONDS, the next --ios (measured),
// with fio --read_iolog at QD16. So a slow cache is not behind a fast one for having seen fewer
// requests. The counters are taken after each pause, and the hit ratio is over the measured phase
// alone. (--time runs each phase for a time instead, as before: a faster cache sees more requests.)
// Rows: the cache's own hit ratio (ulobdev status, dm-cache status, bcache stats_total), the
// requests it counted in the measured phase, the bytes read from the disk per byte fio read (unit
// fills and promotions read more than asked), IOPS and latency; then the
// hits phase (uniform reads over 4 MiB, brought in first: the throughput of hits, with the disk's
// bytes to show they were hits). Not a test: exit code 0 unless the bench itself breaks.
import { drawZipfReads } from './lib/zipf-draw.js';
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
      disk: { type: 'string', default: '256M' },
      time: { type: 'boolean', default: false },
      warm: { type: 'string', default: '30' },
      seconds: { type: 'string', default: '30' },
      'warm-ios': { type: 'string', default: '40000' },
      ios: { type: 'string', default: '20000' },
      'eviction-unit': { type: 'string' },
      delay: { type: 'string', default: '5' },
      json: { type: 'string', default: fileURLToPath(new URL('./results/budget.json', import.meta.url)) },
      keep: { type: 'boolean', default: false },
      only: { type: 'string', default: 'nbd,uloop,ublk,dmcache,bcache' },
      'bcache-bucket': { type: 'string' },
      'cpu-prof': { type: 'boolean', default: false },
      perf: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  }));
} catch (err) {
  fail(`${err.message}; see --help`);
}
if (opts.help) {
  process.stdout.write(
    'usage: node bench/budget.js [--disk 256M] [--warm-ios 40000] [--ios 20000] [--time --warm 30 --seconds 30] [--delay 5] [--only LIST] [--bcache-bucket K] [--eviction-unit K] [--json PATH] [--keep]\n' +
      '  --disk     the disk in MiB (suffix M, 256M to 1024M); every cache gets 1/8 of it\n' +
      '  --warm-ios requests of the warm-up (the same sequence for every cache)\n' +
      '  --ios      requests measured (the sequence continued); the hit ratio is over these\n' +
      '  --time     phases of a time instead of a number of requests (--warm, --seconds)\n' +
      '  --warm     with --time: seconds of the workload before the measured run\n' +
      '  --seconds  with --time: seconds measured\n' +
      '  --eviction-unit  ulobdev --eviction-unit in KiB (default: ulobdev\'s own, 256)\n' +
      '  --delay    ms dm-delay adds to every read and write of the disk\n' +
      '  --only     the caches to run, in this order, of nbd,uloop,ublk (ulobdev on /dev/nbd0, /dev/uloop0, /dev/ublkb0),dmcache,bcache\n' +
      '  --bcache-bucket  bcache bucket size in KiB (default: the cache / 1024, at most 512; bcache needs more than 512 buckets)\n' +
      '  --perf     the guest\'s CPU profile over each measured hits phase (perf record -a, cpu-clock: TCG has no PMU), kept as perf-KEY.txt in the scratch directory (--keep) and summed up in the JSON\n' +
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
const TIMED = opts.time;
const WARM_IOS = Number(opts['warm-ios']);
const IOS = Number(opts.ios);
for (const [name, v] of [['--warm-ios', WARM_IOS], ['--ios', IOS]]) if (!(Number.isInteger(v) && v >= 1 && v <= 1_000_000)) fail(`${name} must be a whole number from 1 to 1000000`);
const UNIT_KB = opts['eviction-unit'] === undefined ? undefined : Number(opts['eviction-unit']);
if (UNIT_KB !== undefined && !(Number.isInteger(UNIT_KB) && UNIT_KB >= 64 && UNIT_KB <= 1024 && (UNIT_KB & (UNIT_KB - 1)) === 0)) fail('--eviction-unit must be a power of two KiB from 64 to 1024');
/** Seconds between the warm-up and the measured phase, and after it, before the counters are read:
 * bcache folds its counters into stats_total every accounting_delay (300/22 s, drivers/md/bcache/stats.c). */
const PAUSE_SECONDS = 15;
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

const TITLES = {
  nbd: 'ulobdev --cache-size (nbd)',
  uloop: 'ulobdev --cache-size (uloop)',
  ublk: 'ulobdev --cache-size (ublk)',
  dmcache: 'dm-cache smq',
  bcache: 'bcache',
};
/** ulobdev's paths: key -> the device the daemon makes. */
const ULOB = { nbd: '/dev/nbd0', uloop: '/dev/uloop0', ublk: '/dev/ublkb0' };
const ORDER = opts.only.split(',');
for (const k of ORDER) if (!(k in TITLES)) fail(`--only takes ${Object.keys(TITLES).join(', ')}, not ${k}`);
if (new Set(ORDER).size !== ORDER.length) fail('--only names a cache twice');
const ONLY = new Set(ORDER);
const CACHES = ORDER.map((key) => ({ key, title: TITLES[key] }));
// bcache: make-bcache's default 512 KiB buckets give a 32 MiB cache set 64 buckets; the kernel's
// cache_alloc() refuses a set whose bucket count rounded up to a power of two is under 1024
// ("ca->sb.nbuckets is too small"). The cache / 1024 (a power of two at most that, at most
// 512 KiB) keeps 1024 buckets or more at any --disk.
const BUCKET_KB = opts['bcache-bucket'] === undefined ? Math.min(512, 2 ** Math.floor(Math.log2(CACHE_MB))) : Number(opts['bcache-bucket']);
if (!(Number.isInteger(BUCKET_KB) && BUCKET_KB >= 4 && BUCKET_KB <= 2048 && (BUCKET_KB & (BUCKET_KB - 1)) === 0)) fail('--bcache-bucket must be a power of two KiB from 4 to 2048');

/** A fio replay of the iolog `log` (in the guest's scratch mount) onto `dev`, QD16, direct. */
const replay = (dev, tag, log) =>
  `fio --name=${tag} --read_iolog=/mnt/${log} --replay_redirect=${dev} --replay_no_stall=1 --direct=1 --ioengine=libaio ` +
  `--iodepth=16 --output-format=json --output=/mnt/fio-${tag}.json > /dev/null`;
/** A fio run of `seconds`: 4 KiB random reads at QD16, zipf:1.1 unless `extra` says otherwise. */
const fio = (dev, tag, seconds, extra = '--random_distribution=zipf:1.1') =>
  `fio --name=${tag} --filename=${dev} --rw=randread ${extra} --bs=4k --direct=1 --ioengine=libaio ` +
  `--iodepth=16 --time_based --runtime=${seconds} --randseed=42 --output-format=json --output=/mnt/fio-${tag}.json > /dev/null`;
/**
 * The hits phase: uniform 4 KiB random reads over 4 MiB in the middle of the disk (an eighth of
 * the smallest budget), brought in by one sequential pass of 4 KiB reads (the same 1,024 requests
 * for every cache: a cache that fills only what is asked needs some 7,000 random reads to touch
 * all 1,024 blocks, which a slow path does not make in 10 s), then HOT_SECONDS of the uniform
 * reads (dm-cache's smq promotes a block only after several hits), then HOT_SECONDS measured: the throughput of hits, with the disk's read bytes
 * around it to show they were hits.
 */
const HOT_SECONDS = 10;
const HOT = `--offset=${DISK_MB / 2}M --size=4M`;

// In the guest: $R an ext4 filesystem on a RAM disk; the disk /dev/mapper/hdd is a file there behind
// a loop device and dm-delay; each cache's flash is another file there behind a loop device.
const SECTORS = DISK_MB * 2048;
/** The guest's RAM disk: the disk, one cache each (ulobdev's files are removed after its run, but
 * brd keeps pages once written), dm-cache's metadata, room for ext4 and fio's output. */
const RAMDISK_MB = DISK_MB + CACHE_MB * CACHES.length + 16 + 256;
/** Each cache's part of the guest's script: set up, measure (warm-up, measured run), keep its own counts, tear down. */
const SECTIONS = {
  nbd: 'step nbd\nulob nbd /dev/nbd0',
  // uloop.ko as the uloop VM tests load it (prepare.sh builds it for the guest's kernel).
  uloop: 'step uloop\ninsmod $ULOOP_KO\nulob uloop /dev/uloop0\nrmmod uloop || true',
  // ublk_drv: the daemon loads it (src/bdev/ublk.ts); the guest's kernel is Debian 13's 6.12.
  ublk: 'step ublk\nulob ublk /dev/ublkb0',
  dmcache: `step dmcache
META=$(flash dmc.meta 16M); CD=$(flash dmc.cache ${CACHE_MB}M)
dd if=/dev/zero of=$META bs=4k count=1 oflag=direct status=none
dmsetup create --noudevsync dmc --table "0 ${SECTORS} cache $META $CD /dev/mapper/hdd 128 1 writethrough smq 0" && dmsetup mknodes dmc
measure /dev/mapper/dmc dmcache snap_dmc
hot /dev/mapper/dmc dmcache
dmsetup remove dmc; losetup -d $META $CD; rm -f $R/dmc.meta $R/dmc.cache`,
  // Stopped and unregistered at the end so that a cache after it can open the disk (its bcache
  // superblock stays in the disk's first 8 KiB: random data to the others all the same).
  bcache: `step bcache
BC=$(flash bc.cache ${CACHE_MB}M)
make-bcache --block 4k --bucket ${BUCKET_KB}k -C $BC -B /dev/mapper/hdd > /dev/null
echo $BC > /sys/fs/bcache/register; echo /dev/mapper/hdd > /sys/fs/bcache/register
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/bcache0 ] && break; sleep 1; done
echo 0 > /sys/block/bcache0/bcache/sequential_cutoff
for f in /sys/fs/bcache/*/congested_read_threshold_us /sys/fs/bcache/*/congested_write_threshold_us; do echo 0 > $f; done
measure /dev/bcache0 bcache snap_bc
hot /dev/bcache0 bcache
echo 1 > /sys/block/bcache0/bcache/stop
for d in /sys/fs/bcache/*-*-*; do echo 1 > $d/unregister; done
for i in $(seq 1 30); do [ -e /sys/block/bcache0 ] || [ -n "$(ls -d /sys/fs/bcache/*-*-* 2>/dev/null)" ] || break; sleep 1; done
losetup -d $BC; rm -f $R/bc.cache`,
};
const script = `
U="node ${ROOT}/dist/cli/ulobdev.js"
step() { echo "== $1 $(cut -d' ' -f1 /proc/uptime)"; }
hddread() { awk '{print $3 * 512}' /sys/block/dm-$(dmsetup info -c --noheadings -o minor hdd | tr -d ' ')/stat; }
measure() { # DEV TAG SNAP: warm-up, pause, counters, measured run (the disk's bytes read around it), pause, counters
  ${TIMED ? fio('$1', '$2-warm', WARM) : replay('$1', '$2-warm', 'warm.iolog')}
  sleep ${PAUSE_SECONDS}; $3 $2 warm
  echo "$2 hdd-before $(hddread)"
  ${TIMED ? fio('$1', '$2', SECONDS) : replay('$1', '$2', 'measured.iolog')}
  echo "$2 hdd-after $(hddread)"
  sleep ${PAUSE_SECONDS}; $3 $2 measured
}
# The caches' own counters, TAG PHASE (after the pause: bcache's stats_total lags by up to 13.6 s)
snap_ulob() { $U status $UDEV --json > /mnt/$1-status-$2.json; }
snap_dmc() { dmsetup status dmc > /mnt/dmcache-status-$2.txt; }
snap_bc() { for f in cache_hits cache_misses cache_bypass_hits cache_bypass_misses; do echo "bcache $2 $f $(cat /sys/block/bcache0/bcache/stats_total/$f)"; done; }
hot() { # DEV TAG: the hits phase (after the cache's counters were taken)
  fio --name=$2-hotseq --filename=$1 --rw=read --bs=4k --direct=1 --ioengine=libaio --iodepth=16 ${HOT} --output=/dev/null > /dev/null
  ${fio('$1', '$2-hotwarm', HOT_SECONDS, HOT)}
  echo "$2 hdd-hot-before $(hddread)"
  ${opts.perf ? `perf record -q -a -e cpu-clock -F 997 -o /tmp/perf-$2.data -- ` : ''}${fio('$1', '$2-hot', HOT_SECONDS, HOT)}
  echo "$2 hdd-hot-after $(hddread)"${
    opts.perf
      ? `
  perf report -q -i /tmp/perf-$2.data --stdio --no-children --sort comm,dso --percent-limit 0.3 > /mnt/perf-$2-comm.txt 2>/dev/null || true
  perf report -q -i /tmp/perf-$2.data --stdio --no-children --sort sym --percent-limit 0.3 > /mnt/perf-$2.txt 2>/dev/null || true
  rm -f /tmp/perf-$2.data`
      : ''
  }
}
modprobe brd rd_nr=1 rd_size=${RAMDISK_MB * 1024}
modprobe crc32c_generic; modprobe ext4; modprobe loop; modprobe nbd
modprobe dm-delay; modprobe dm-cache; modprobe dm-cache-smq; modprobe bcache
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/ram0 && mkdir -p /tmp/r && mount /dev/ram0 /tmp/r
R=/tmp/r
head -c $(( ${DISK_MB} << 20 )) /dev/urandom > $R/disk.img
LD=$(losetup --direct-io=on -f --show $R/disk.img)
dmsetup create --noudevsync hdd --table "0 ${SECTORS} delay $LD 0 ${DELAY}" && dmsetup mknodes hdd
flash() { truncate -s $2 $R/$1 && losetup --direct-io=on -f --show $R/$1; }

${opts['cpu-prof'] ? `U="node --cpu-prof --cpu-prof-dir=/mnt/prof ${ROOT}/dist/cli/ulobdev.js"; mkdir -p /mnt/prof` : ''}
ulob() { # KEY DEV: ulobdev --cache-size on DEV, measured, status kept, detached
  $U -c $R/$1.cache -b $R/$1.bitmap --cache-size ${CACHE_MB}M${UNIT_KB ? ` --eviction-unit ${UNIT_KB}K` : ''} --daemon $2 /dev/mapper/hdd >/dev/null
  UDEV=$2; measure $2 $1 snap_ulob
  hot $2 $1
  $U detach $2 >/dev/null
  cp /run/ulobdev/$(basename $2).log /mnt/$1-daemon.log 2>/dev/null || true
  rm -f $R/$1.cache $R/$1.bitmap
}

${CACHES.map((c) => SECTIONS[c.key]).join('\n')}
step done
`;



process.stderr.write('bench/budget.js: preparing the VM (scripts/vm/prepare.sh)\n');
const out = execFileSync('bash', [join(ROOT, 'scripts/vm/prepare.sh')], {
  encoding: 'utf8',
  stdio: ['ignore', 'pipe', 'inherit'],
  timeout: 900_000,
  env: { ...process.env, ...(ONLY.has('uloop') ? {} : { ULOOP_VM_NO_MODULE: '1' }) },
});
const vm = Object.fromEntries(out.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));

const base = join(ROOT, '.vm', 'run');
mkdirSync(base, { recursive: true });
const scratch = mkdtempSync(join(base, 'budget-'));
writeFileSync(join(scratch, 'cmd.sh'), `set -e\nULOOP_KO=${vm.ULOOP_KO ?? ''}\n${script}\n`);
let sequence;
if (!TIMED) sequence = drawSequence(scratch);
const memoryMb = 1024 + RAMDISK_MB;

/**
 * Draws the requests every cache replays: fio's own zipf:1.1 (randseed 42) over a sparse file of the
 * disk's size, ioengine=null (nothing read), --write_iolog; the first WARM_IOS reads go to
 * warm.iolog, the next IOS to measured.iolog, in fio's version 2 iolog (no timestamps), on the file
 * name "disk" that each replay redirects to its device. Returns { distinctWarm, distinctMeasured, ... }.
 */
function drawSequence(dir) {
  const reads = drawZipfReads(dir, DISK_MB, WARM_IOS + IOS);
  if (reads.length < WARM_IOS + IOS) fail(`fio drew ${reads.length} requests, not ${WARM_IOS + IOS}`);
  const write = (name, part) => writeFileSync(join(dir, name), ['fio version 2 iolog', 'disk add', 'disk open', ...part.map((r) => `disk read ${r}`), 'disk close', ''].join('\n'));
  const warm = reads.slice(0, WARM_IOS);
  const measured = reads.slice(WARM_IOS, WARM_IOS + IOS);
  write('warm.iolog', warm);
  write('measured.iolog', measured);
  return { distinctWarm: new Set(warm).size, distinctMeasured: new Set(measured).size, distinctAll: new Set([...warm, ...measured]).size };
}
// Single-threaded TCG, as test/support/vm.ts runs it: with a host thread per vCPU Debian 13's
// kernels sometimes die at boot ("Oops: int3" in sched_clock_cpu, about 1 boot in 15).
const args = [
  '-accel', 'tcg,thread=single', '-cpu', 'max', '-smp', '2', '-m', String(memoryMb),
  '-nographic', '-no-reboot', '-monitor', 'none',
  '-kernel', vm.KERNEL, '-initrd', vm.INITRD,
  '-append', `console=ttyS0 panic=-1 loglevel=4 ulobvm.modules=${vm.MODULES} ulobvm.project=${ROOT}`,
  '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
  '-virtfs', `local,path=${scratch},mount_tag=scratch,security_model=none`,
];
const load = { start: loadavg() };
const started = Date.now();
process.stderr.write(`bench/budget.js: booting (${memoryMb} MiB, 2 vCPUs); ${CACHES.length} caches x ${TIMED ? `${WARM + SECONDS} s` : `${WARM_IOS} + ${IOS} requests`} + ${2 * HOT_SECONDS + 2 * PAUSE_SECONDS} s\n`);
// setpriv --pdeathsig: the guest dies with this process however it ends (as test/support/vm.ts).
const qemu = spawn('setpriv', ['--pdeathsig', 'KILL', 'qemu-system-x86_64', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
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
// Replays as slow as 20 requests a second (nbd under load ran 56-379 IOPS) still finish.
const perCacheSeconds = (TIMED ? WARM + SECONDS : (WARM_IOS + IOS) / 20) + 2 * HOT_SECONDS + 2 * PAUSE_SECONDS;
const timer = setTimeout(stop, 900_000 + CACHES.length * perCacheSeconds * 3000);
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
/**
 * Each cache's own read counters after the warm-up and after the measured phase ({ hits, misses },
 * counted from its start: nothing ran on it before the warm-up), and for ulobdev its space.
 */
function counters(key, phase) {
  if (key in ULOB) {
    // On uloop and ublk the counts are the kernel's or the ublk server's: the hits they served
    // themselves and the misses they sent to the daemon (src/daemon/daemon.ts, status()).
    const st = JSON.parse(read(`${key}-status-${phase}.json`));
    return { hits: st.readHits, misses: st.readMisses, evictedBytes: st.evictedBytes, usedBytes: st.usedBytes, budgetBytes: st.budgetBytes };
  }
  if (key === 'dmcache') {
    // dm-cache status: <meta used>/<total> <block size> <used>/<total> <read hits> <read misses> <write hits> <write misses> ...
    const f = read(`dmcache-status-${phase}.txt`).trim().split(/\s+/);
    return { hits: Number(f[7]), misses: Number(f[8]) };
  }
  const b = (k) => Number(new RegExp(`^bcache ${phase} ${k} (\\d+)$`, 'm').exec(guestOut)?.[1] ?? NaN);
  return { hits: b('cache_hits') + b('cache_bypass_hits'), misses: b('cache_misses') + b('cache_bypass_misses') };
}
/** The hits phase of `key`: IOPS, latency, and the disk's bytes read per byte read (0 when all were hits). */
function hotResult(key) {
  const text = read(`fio-${key}-hot.json`);
  if (!text) return undefined;
  const j = JSON.parse(text).jobs[0].read;
  const disk = hdd(key, 'hot-after') - hdd(key, 'hot-before');
  return {
    iops: Math.round(j.iops),
    latP50us: Math.round(j.clat_ns.percentile['50.000000'] / 1000),
    latP99us: Math.round(j.clat_ns.percentile['99.000000'] / 1000),
    diskBytesPerReadByte: Number((disk / j.io_bytes).toFixed(3)),
    // --perf: the guest's samples by command and object, and by symbol (the top lines, "12.34% fio [kernel.kallsyms]").
    ...(opts.perf ? { perfByComm: perfLines(`perf-${key}-comm.txt`, 25), perfBySymbol: perfLines(`perf-${key}.txt`, 40) } : {}),
  };
}
/** The first `n` lines of a perf report kept in the scratch directory, whitespace squeezed. */
function perfLines(name, n) {
  return read(name).split('\n').map((l) => l.trim().replace(/\s+/g, ' ')).filter(Boolean).slice(0, n);
}
const results = {};
for (const c of CACHES) {
  const j = JSON.parse(read(`fio-${c.key}.json`)).jobs[0].read;
  const warm = JSON.parse(read(`fio-${c.key}-warm.json`)).jobs[0].read;
  const diskBytes = hdd(c.key, 'after') - hdd(c.key, 'before');
  const w = counters(c.key, 'warm');
  const e = counters(c.key, 'measured');
  const hits = e.hits - w.hits;
  const misses = e.misses - w.misses;
  results[c.key] = {
    // The measured phase alone: the counters after it less those after the warm-up.
    hitRatio: Number((hits / (hits + misses)).toFixed(3)),
    hits,
    misses,
    requests: hits + misses,
    warmHitRatio: Number((w.hits / (w.hits + w.misses)).toFixed(3)),
    warmRequests: w.hits + w.misses,
    fioRequests: j.total_ios,
    seconds: Number((j.runtime / 1000).toFixed(1)),
    iops: Math.round(j.iops),
    latP50us: Math.round(j.clat_ns.percentile['50.000000'] / 1000),
    latP99us: Math.round(j.clat_ns.percentile['99.000000'] / 1000),
    readBytes: j.io_bytes,
    warmReadBytes: warm.io_bytes,
    diskReadBytes: diskBytes,
    diskBytesPerReadByte: Number((diskBytes / j.io_bytes).toFixed(3)),
    hot: hotResult(c.key),
    ...(c.key in ULOB ? { evictedBytes: e.evictedBytes, measuredEvictedBytes: e.evictedBytes - w.evictedBytes, usedBytes: e.usedBytes, warmUsedBytes: w.usedBytes, budgetBytes: e.budgetBytes } : {}),
  };
}
const best = Math.max(results.dmcache?.hitRatio ?? 0, results.bcache?.hitRatio ?? 0);
const rows = CACHES.map((c) => ({
  cache: c.title,
  hitRatio: results[c.key].hitRatio.toFixed(3),
  requests: results[c.key].requests.toLocaleString('en-US'),
  warmHitRatio: results[c.key].warmHitRatio.toFixed(3),
  seconds: results[c.key].seconds,
  disk: results[c.key].diskBytesPerReadByte.toFixed(3),
  iops: results[c.key].iops.toLocaleString('en-US'),
  ratio: results.dmcache ? (results[c.key].iops / results.dmcache.iops).toFixed(2) : '',
  p50: results[c.key].latP50us,
  p99: results[c.key].latP99us,
  hotIops: results[c.key].hot?.iops.toLocaleString('en-US'),
  hotDisk: results[c.key].hot?.diskBytesPerReadByte.toFixed(3),
  hotDm: results.dmcache?.hot ? (results[c.key].hot.iops / results.dmcache.hot.iops).toFixed(2) : '',
  hotBc: results.bcache?.hot ? (results[c.key].hot.iops / results.bcache.hot.iops).toFixed(2) : '',
  hotP50: results[c.key].hot?.latP50us,
}));
printTable(
  [
    { key: 'cache', title: TIMED ? `zipf:1.1 4 KiB randread QD16, ${SECONDS} s after ${WARM} s` : `zipf:1.1 4 KiB QD16, ${IOS} requests after ${WARM_IOS}` },
    { key: 'hitRatio', title: 'hit ratio', align: 'right' },
    { key: 'requests', title: 'requests', align: 'right' },
    { key: 'warmHitRatio', title: 'warm-up', align: 'right' },
    { key: 'seconds', title: 's', align: 'right' },
    { key: 'disk', title: 'disk B/read B', align: 'right' },
    { key: 'iops', title: 'IOPS', align: 'right' },
    { key: 'ratio', title: '/dm-cache', align: 'right' },
    { key: 'p50', title: 'p50 µs', align: 'right' },
    { key: 'p99', title: 'p99 µs', align: 'right' },
    { key: 'hotIops', title: 'hits IOPS', align: 'right' },
    { key: 'hotDisk', title: 'disk B/B', align: 'right' },
    { key: 'hotDm', title: '/dm-cache', align: 'right' },
    { key: 'hotBc', title: '/bcache', align: 'right' },
    { key: 'hotP50', title: 'p50 µs', align: 'right' },
  ],
  rows,
  {
    title: `In the guest (qemu TCG, 2 vCPUs, ${memoryMb} MiB; Debian ${vm.KVER}); ${DISK_MB} MiB disk (dm-delay ${DELAY} ms), ${CACHE_MB} MiB of cache each; host load ${load.start.map((x) => x.toFixed(1)).join(' ')}`,
    notes: [
      `hits IOPS: uniform 4 KiB random reads QD16 over 4 MiB at ${DISK_MB / 2} MiB, ${HOT_SECONDS} s after ${HOT_SECONDS} s of the same (disk B/B 0: every read a hit)`,
      TIMED
        ? `hit ratio: each cache's own count of read requests served from flash in the ${SECONDS} s measured (requests: what it counted; warm-up: its ratio over the ${WARM} s before); goal: ulobdev >= the best of dm-cache and bcache (${best.toFixed(3)})`
        : `hit ratio: each cache's own count of read requests served from flash over the same ${IOS} requests (fio zipf:1.1 randseed 42, replayed; requests: what the cache counted), after the same ${WARM_IOS} (warm-up: its ratio there); ${sequence.distinctWarm} distinct 4 KiB blocks in the warm-up, ${sequence.distinctMeasured} in the measured phase, ${sequence.distinctAll} in both (the cache holds ${CACHE_MB * 256}); goal: ulobdev >= the best of dm-cache and bcache (${best.toFixed(3)})`,
      ...Object.keys(ULOB)
        .filter((k) => results[k])
        .map((k) => {
          const r = results[k];
          const goal = best === 0 ? 'no dm-cache or bcache row to compare' : r.hitRatio >= best ? `goal met (${r.hitRatio.toFixed(3)} >= ${best.toFixed(3)})` : `goal NOT met (${r.hitRatio.toFixed(3)} < ${best.toFixed(3)})`;
          return `${TITLES[k]}: ${goal}; ${(r.evictedBytes / 1048576).toFixed(1)} MiB evicted (${(r.measuredEvictedBytes / 1048576).toFixed(1)} in the measured phase), ${(r.warmUsedBytes / 1048576).toFixed(1)} of ${r.budgetBytes / 1048576} MiB used after the warm-up, ${(r.usedBytes / 1048576).toFixed(1)} after`;
        }),
      ONLY.has('bcache') && `bcache: ${BUCKET_KB} KiB buckets (${(CACHE_MB * 1024) / BUCKET_KB} of them; make-bcache's default 512 KiB leaves too few)`,
      `order in the guest: ${ORDER.join(', ')}; wall time ${(wallMs / 1000).toFixed(0)} s; host load at the end ${load.end.map((x) => x.toFixed(1)).join(' ')}`,
    ].filter(Boolean),
  },
);
writeJson(opts.json, {
  bench: 'budget',
  date: new Date().toISOString(),
  machine: { cpus: cpus().length, cpuModel: cpus()[0]?.model, loadAverage: load, guest: { kernel: vm.KVER, memoryMb, vcpus: 2, accel: 'tcg,thread=single' } },
  params: { diskMiB: DISK_MB, cacheMiB: CACHE_MB, mode: TIMED ? 'time' : 'ios', ...(TIMED ? { warmSeconds: WARM, seconds: SECONDS } : { warmIos: WARM_IOS, ios: IOS, randseed: 42, sequence }), pauseSeconds: PAUSE_SECONDS, evictionUnitKiB: UNIT_KB ?? 256, delayMs: DELAY, bs: 4096, iodepth: 16, distribution: 'zipf:1.1', order: ORDER, bcacheBucketKiB: ONLY.has('bcache') ? BUCKET_KB : undefined },
  results,
  goal: { bestOtherHitRatio: best, met: Object.fromEntries(Object.keys(ULOB).filter((k) => results[k]).map((k) => [k, best > 0 && results[k].hitRatio >= best])) },
  guest: { steps: [...guestOut.matchAll(/^== (\S+) ([\d.]+)$/gm)].map((x) => [x[1], Number(x[2])]) },
  wallSeconds: Math.round(wallMs / 1000),
});
if (opts.keep) process.stderr.write(`bench/budget.js: scratch kept in ${scratch}\n`);
else rmSync(scratch, { recursive: true, force: true });
