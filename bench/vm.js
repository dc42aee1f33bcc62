#!/usr/bin/env node
// The kernel data paths side by side in one guest (qemu, software emulation): fio on /dev/uloop0
// with every block cached, on the in-tree loop device over the same cache file (direct I/O and
// buffered), on dm-writecache and on bcache (writeback, cache set on a loop over a file of the
// device's size) over the same kind of backing file, on ulobdev's ublk frontend (/dev/ublkb0, the
// kernel's ublk_drv and the addon's io_uring server) and its /dev/loopN frontend (FUSE + loop), and
// optionally on ulobdev's NBD frontend through nbd.ko (same cache).
//
//   node bench/vm.js [--size 128M] [--seconds 5] [--kernel 6.12] [--devices LIST] [--workloads LIST] [--rounds N] [--perf | --perf-stat] [--json PATH] [--keep]
//
// Boots the VM of the tests (scripts/vm/prepare.sh, scripts/vm/init) once. In the guest everything
// lives on an ext4 filesystem on a brd RAM disk, so the numbers are CPU cost (of an emulated CPU),
// not disk speed; only the ratios mean something. bench/README.md explains the rows. Not a test:
// exit code 0 unless the bench itself breaks.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { printTable, writeJson } from './lib/table.js';

const MiB = 1024 * 1024;
const QD = 16;

function fail(message) {
  process.stderr.write(`bench/vm.js: ${message}\n`);
  process.exit(2);
}

let opts;
try {
  ({ values: opts } = parseArgs({
    options: {
      size: { type: 'string', default: '128M' },
      seconds: { type: 'string', default: '5' },
      rounds: { type: 'string', default: '1' },
      json: { type: 'string', default: fileURLToPath(new URL('./results/vm.json', import.meta.url)) },
      keep: { type: 'boolean', default: false },
      kernel: { type: 'string', default: '6.12' },
      devices: { type: 'string', default: 'loop,loopbuf,uloop,ublk,ulobloop,writecache,bcache' },
      perf: { type: 'boolean', default: false },
      'perf-stat': { type: 'boolean', default: false },
      'ublk-batch': { type: 'string', default: '4,50' },
      workloads: { type: 'string', default: 'seqread,seqwrite,randread,randwrite' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  }));
} catch (err) {
  fail(`${err.message}; see --help`);
}
if (opts.help) {
  process.stdout.write(
    'usage: node bench/vm.js [--size 128M] [--seconds 5] [--kernel 6.12] [--devices LIST] [--workloads LIST] [--rounds N] [--perf | --perf-stat] [--ublk-batch K,US[/K,US...]] [--json PATH] [--keep]\n' +
      '  --size     size of the device in MiB (suffix M; 64M to 512M; the guest RAM disk holds 5x)\n' +
      '  --seconds  fio time per workload and device (after 1 s of ramp)\n' +
      '  --rounds   run every row this many times, the rows interleaved, every other round in reverse\n' +
      '             order (A B C, C B A, A B C: ABBA for any two rows), and report each\n' +
      '             row\'s best round (default 1; not with --perf / --perf-stat)\n' +
      '  --json     where the JSON result goes (default bench/results/vm.json)\n' +
      '  --keep     keep the scratch directory (fio JSON, guest output) and print its path\n' +
      '  --kernel   guest kernel: 6.1, 6.12 (default) or newest (scripts/vm/prepare.sh)\n' +
      '  --devices  comma-separated rows: loop (dio, the reference, always run), loopbuf, uloop, ublk,\n' +
      '             ublkcopy (ublk with ULOBDEV_UBLK_COPY=1: the copy path where zero copy exists),\n' +
      '             ublknocoop (ublk with ULOBDEV_UBLK_TASKRUN=0: rings without IORING_SETUP_COOP_TASKRUN),\n' +
      '             ublkbatch (ublk with ULOBDEV_UBLK_BATCH=K,US: a queue thread waiting for requests waits for K\n' +
      '             completions or US µs; one row per --ublk-batch value), ublknobatch (ULOBDEV_UBLK_BATCH=1),\n' +
      '             ulobloop (ulobdev on /dev/loopN), nbd, writecache, bcache (default: all but nbd)\n' +
      '  --perf     profile the uloop, ublk* and loop (dio) runs with perf in the guest (flat profile per workload;\n' +
      '             ublk also by thread, and its system calls and context switches per request)\n' +
      '  --perf-stat  only the counts of --perf, for every ublk row (system calls and context switches per request): no\n' +
      '             sampling, whose start-up takes minutes in a loaded TCG guest\n' +
      '  --workloads  comma-separated: seqread, seqwrite, randread, randwrite (default: all)\n' +
      '  --ublk-batch  the ublkbatch rows\' K,US values, several separated by / (default 4,50)\n',
  );
  process.exit(0);
}
const m = /^(\d+)M$/.exec(opts.size);
if (!m) fail('--size must look like 256M');
const SIZE_MB = Number(m[1]);
if (SIZE_MB < 64 || SIZE_MB > 512) fail('--size must be from 64M to 512M');
const SECONDS = Number(opts.seconds);
if (!(Number.isInteger(SECONDS) && SECONDS >= 1 && SECONDS <= 60)) fail('--seconds must be a whole number from 1 to 60');
const ROUNDS = Number(opts.rounds);
if (!(Number.isInteger(ROUNDS) && ROUNDS >= 1 && ROUNDS <= 5)) fail('--rounds must be a whole number from 1 to 5');
if (ROUNDS > 1 && (opts.perf || opts['perf-stat'])) fail('--rounds above 1 does not go with --perf or --perf-stat');
// --ublk-batch: one ublkbatch row per K,US (ULOBDEV_UBLK_BATCH's syntax; the server checks the range)
const BATCHES = opts['ublk-batch'].split('/').map((b) => b.trim());
for (const b of BATCHES) if (!/^\d+,\d+$/.test(b)) fail(`--ublk-batch: ${b} is not K,US`);
const batchKey = (b) => `ublkbatch${b.replace(',', 'x')}`;

const ROOT = fileURLToPath(new URL('..', import.meta.url));
for (const f of ['dist/cli/ulobdev.js', 'build/Release/ulob_native.node']) {
  if (!existsSync(join(ROOT, f))) fail(`${f} is missing; build first (make build)`);
}
if (process.getuid?.() !== 0) fail('needs root (scripts/vm/prepare.sh installs packages)');

const ALL_WORKLOADS = [
  { key: 'seqread', title: 'seq read 1 MiB', rw: 'read', bs: '1M', unit: 'MB/s' },
  { key: 'seqwrite', title: 'seq write 1 MiB', rw: 'write', bs: '1M', unit: 'MB/s' },
  { key: 'randread', title: 'rand read 4 KiB', rw: 'randread', bs: '4k', unit: 'IOPS' },
  { key: 'randwrite', title: 'rand write 4 KiB', rw: 'randwrite', bs: '4k', unit: 'IOPS' },
];
const wantedWorkloads = new Set(opts.workloads.split(',').map((w) => w.trim()).filter(Boolean));
for (const w of wantedWorkloads) if (!ALL_WORKLOADS.some((x) => x.key === w)) fail(`--workloads: unknown workload ${w} (use ${ALL_WORKLOADS.map((x) => x.key).join(', ')})`);
const WORKLOADS = ALL_WORKLOADS.filter((w) => wantedWorkloads.has(w.key));
if (WORKLOADS.length === 0) fail('--workloads: name at least one');
// --perf-stat: the ublk counts alone (implies nothing is sampled)
const PERF = opts.perf || opts['perf-stat'];
const ALL_DEVICES = [
  { key: 'loop', title: 'loop (dio)' },
  { key: 'loopbuf', title: 'loop (buffered)' },
  { key: 'uloop', title: 'uloop' },
  { key: 'ublk', title: 'ublk' },
  { key: 'ublkcopy', title: 'ublk (copy path)' },
  { key: 'ublknocoop', title: 'ublk (no COOP_TASKRUN)' },
  ...BATCHES.map((b) => ({ key: batchKey(b), title: `ublk (batch ${b.replace(',', ', ')} µs)` })),
  { key: 'ublknobatch', title: 'ublk (no batch)' },
  { key: 'ulobloop', title: 'ulobdev loopN' },
  { key: 'nbd', title: 'ulobdev nbd' },
  { key: 'writecache', title: 'dm-writecache' },
  { key: 'bcache', title: 'bcache' },
];
const wanted = new Set(['loop', ...opts.devices.split(',').map((d) => d.trim()).filter(Boolean).flatMap((d) => (d === 'ublkbatch' ? BATCHES.map(batchKey) : [d]))]);
for (const d of wanted) if (!ALL_DEVICES.some((x) => x.key === d)) fail(`--devices: unknown device ${d} (use ${ALL_DEVICES.map((x) => x.key).join(', ')})`);
const DEVICES = ALL_DEVICES.filter((d) => wanted.has(d.key));
if (!['6.1', '6.12', 'newest'].includes(opts.kernel)) fail('--kernel must be 6.1, 6.12 or newest');

// The guest script. $R is an ext4 filesystem on a RAM disk; B the backing file, C the cache file.
// The uloop and NBD rows run with every block present and dirty (read once, then written once),
// so reads and writes are all hits and no write needs a dirty intent; the loop rows then run on
// the very cache file they used; dm-writecache gets its own cache file, written through once so
// that its reads hit too.
// With --perf, the uloop and loop (dio) runs are sampled with perf (cpu-clock: TCG has no PMU; the
// guest's userspace is the host's, so its perf) and a flat profile by symbol goes to
// /mnt/perf-TAG-WORKLOAD.txt: where the emulated CPU's time goes, kernel and module symbols included.
// Each ublk run (ublk, ublkcopy, ublknocoop) is also sorted by thread name (fio, the server's queue threads, node) and counted
// (perf stat -a: io_uring_enter, pread64, pwrite64, futex system calls, context switches) into
// /mnt/perfstat-TAG-WORKLOAD.txt, beside the server's request count before and after
// (/mnt/reqs-TAG-WORKLOAD.txt: `ulobdev status` queueRequests summed), for calls per request.
// (every ublk row is counted: ublk, ublkcopy, ublknocoop, ublkbatch*, ublknobatch, each into its own files)
const PROFILED = new Set(['uloop', 'loop', 'ublk', 'ublkcopy', 'ublknocoop', ...BATCHES.map(batchKey), 'ublknobatch']);
const UBLK_STAT = ['io_uring_enter', 'pread64', 'pwrite64', 'futex'].map((c) => `syscalls:sys_enter_${c}`).concat('context-switches').join(',');
const fioJobs = (dev, tag) =>
  WORKLOADS.map((w) => {
    const fio =
      `fio --name=${w.key} --filename=${dev} --rw=${w.rw} --bs=${w.bs} --direct=1 --ioengine=libaio --iodepth=${QD} ` +
      `--time_based --ramp_time=1 --runtime=${SECONDS} --randrepeat=0 --output-format=json --output=/mnt/fio-${tag}-${w.key}.json > /dev/null`;
    // the guest's CPU time over the run (/proc/stat's first line before and after): CPU per request
    const cpu = (cmd) => `head -1 /proc/stat > /mnt/cpu-${tag}-${w.key}.txt\n${cmd}\nhead -1 /proc/stat >> /mnt/cpu-${tag}-${w.key}.txt`;
    if (!PERF || !PROFILED.has(tag)) return cpu(fio);
    const data = `/tmp/perf-${tag}-${w.key}.data`;
    const ublk = tag.startsWith('ublk');
    if (!opts.perf && !ublk) return cpu(fio);
    if (!opts.perf) return `ublkreqs > /mnt/reqs-${tag}-${w.key}.txt\n${cpu(`$PERF stat -a -x, -o /mnt/perfstat-${tag}-${w.key}.txt -e ${UBLK_STAT} -- ${fio}`)}\nublkreqs >> /mnt/reqs-${tag}-${w.key}.txt`;
    const record = `$PERF record -q -e cpu-clock -F 499 -a -g -o ${data} -- ${fio}`;
    return (
      (ublk ? `ublkreqs > /mnt/reqs-${tag}-${w.key}.txt\n$PERF stat -a -x, -o /mnt/perfstat-${tag}-${w.key}.txt -e ${UBLK_STAT} -- ${record}\nublkreqs >> /mnt/reqs-${tag}-${w.key}.txt\n` : `${record}\n`) +
      `$PERF report -i ${data} --stdio --no-children --sort ${ublk ? 'comm,sym' : 'sym'} --percent-limit 1 2>/dev/null | grep -v '^$' | grep -v '^#' | grep '%' | head -40 > /mnt/perf-${tag}-${w.key}.txt || true\n` +
      `rm -f ${data}`
    );
  }).join('\n');

const SECTIONS = {
  uloop: `
step uloop
# round 2 and later: the module is in already (a second insmod fails "File exists" under set -e)
grep -q "^uloop " /proc/modules || insmod $ULOOP_KO
$U $A /dev/uloop0 $B >/dev/null && fill /dev/uloop0
$U status /dev/uloop0 | sed -n 2p
${fioJobs('/dev/uloop0', 'uloop')}
$U detach /dev/uloop0 >/dev/null`,
  nbd: `
step nbd
modprobe nbd
$U $A /dev/nbd0 $B >/dev/null && fill /dev/nbd0
$U status /dev/nbd0 | sed -n 2p
${fioJobs('/dev/nbd0', 'nbd')}
$U detach /dev/nbd0 >/dev/null`,
  ublk: `
step ublk
$U $A /dev/ublkb0 $B >/dev/null && fill /dev/ublkb0
echo "ublk: $(ls /sys/block/ublkb0/mq | wc -l) hardware queues"
${fioJobs('/dev/ublkb0', 'ublk')}
$U detach /dev/ublkb0 >/dev/null`,
  // the same with ULOBDEV_UBLK_COPY=1: the copy path on a kernel that has zero copy (the two
  // compared in one guest; on 6.12 both rows are the copy path)
  ublkcopy: `
step ublkcopy
ULOBDEV_UBLK_COPY=1 $U $A /dev/ublkb0 $B >/dev/null && fill /dev/ublkb0
${fioJobs('/dev/ublkb0', 'ublkcopy')}
$U detach /dev/ublkb0 >/dev/null`,
  // the same with ULOBDEV_UBLK_TASKRUN=0: the queues' rings without IORING_SETUP_COOP_TASKRUN
  ublknocoop: `
step ublknocoop
ULOBDEV_UBLK_TASKRUN=0 $U $A /dev/ublkb0 $B >/dev/null && fill /dev/ublkb0
${fioJobs('/dev/ublkb0', 'ublknocoop')}
$U detach /dev/ublkb0 >/dev/null`,
  ...Object.fromEntries(
    [...BATCHES.map((b) => [batchKey(b), b]), ['ublknobatch', '1']].map(([key, b]) => [
      key,
      `
step ${key}
ULOBDEV_UBLK_BATCH=${b} $U $A /dev/ublkb0 $B >/dev/null && fill /dev/ublkb0
$U status /dev/ublkb0 --json | grep -o '"batchWait[A-Za-z]*": *[0-9]*' | tr '\\n' ' ' | sed 's/^/${key}: /'; echo
${fioJobs('/dev/ublkb0', key)}
$U detach /dev/ublkb0 >/dev/null`,
    ]),
  ),
  ulobloop: `
step ulobloop
$U $A /dev/loop7 $B >/dev/null && fill /dev/loop7
${fioJobs('/dev/loop7', 'ulobloop')}
$U detach /dev/loop7 >/dev/null`,
  loop: `
step loop
[ -f $C ] || dd if=/dev/zero of=$C bs=1M count=${SIZE_MB} status=none
L=$(losetup --direct-io=on -f --show $C)
grep -q 1 /sys/block/\${L#/dev/}/loop/dio && echo "$L direct-io on"
${fioJobs('$L', 'loop')}
losetup -d $L`,
  loopbuf: `
step loopbuf
L=$(losetup -f --show $C)
${fioJobs('$L', 'loopbuf')}
losetup -d $L`,
  writecache: `
step writecache
modprobe dm-writecache
dd if=/dev/zero of=$W bs=1M count=$(( ${SIZE_MB} * 2 )) status=none
LB=$(losetup --direct-io=on -f --show $B); LW=$(losetup --direct-io=on -f --show $W)
dmsetup create --noudevsync ulobwc --table "0 $(( ${SIZE_MB} * 2048 )) writecache s $LB $LW 4096 4 high_watermark 90 low_watermark 80" && dmsetup mknodes ulobwc
fill /dev/mapper/ulobwc
dmsetup status ulobwc
${fioJobs('/dev/mapper/ulobwc', 'writecache')}
dmsetup remove ulobwc; losetup -d $LW $LB`,
  // bcache in writeback mode with everything through the cache: no sequential bypass, no
  // congestion bypass; the cache set lives on a loop over a file as large as the device (64 KiB
  // buckets: with the default 512 KiB a 128 MiB cache has too few and bcache refuses it).
  bcache: `
step bcache
modprobe bcache
dd if=/dev/zero of=$K bs=1M count=${SIZE_MB} status=none
LB=$(losetup --direct-io=on -f --show $B); LK=$(losetup --direct-io=on -f --show $K)
make-bcache --wipe-bcache --writeback --block 4k --bucket 64k -B $LB -C $LK > /dev/null
echo $LB > /sys/fs/bcache/register; echo $LK > /sys/fs/bcache/register 2>/dev/null || true
i=0; while [ ! -e /sys/block/bcache0/bcache/cache_mode ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
[ -b /dev/bcache0 ] || mknod /dev/bcache0 b $(cut -d: -f1 /sys/block/bcache0/dev) $(cut -d: -f2 /sys/block/bcache0/dev)
echo writeback > /sys/block/bcache0/bcache/cache_mode
echo 0 > /sys/block/bcache0/bcache/sequential_cutoff
CS=$(ls -d /sys/fs/bcache/*-*-*-*-* | head -1)
echo 0 > $CS/congested_read_threshold_us; echo 0 > $CS/congested_write_threshold_us
fill /dev/bcache0
echo "bcache: $(cat /sys/block/bcache0/bcache/cache_mode | tr -d '\n'), dirty $(cat /sys/block/bcache0/bcache/dirty_data), state $(cat /sys/block/bcache0/bcache/state)"
${fioJobs('/dev/bcache0', 'bcache')}
echo 1 > /sys/block/bcache0/bcache/stop; echo 1 > $CS/unregister
i=0; while [ -e $CS ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
losetup -d $LK $LB`,
};
// uloop, nbd, ublk and ulobloop first: they fill the cache file $C that the loop rows then run on.
const ORDER = ['uloop', 'nbd', 'ublk', 'ublkcopy', 'ublknocoop', ...BATCHES.map(batchKey), 'ublknobatch', 'ulobloop', 'loop', 'loopbuf', 'writecache', 'bcache'];

const script = `
U="node ${ROOT}/dist/cli/ulobdev.js"
PERF=$(ls /usr/bin/perf_* 2>/dev/null | tail -1); [ -n "$PERF" ] || PERF=$(command -v perf || true)
${PERF ? '[ -n "$PERF" ] || { echo "no perf on the host (apt install linux-perf)"; exit 1; }' : ''}
step() { echo "== $1 $(cut -d' ' -f1 /proc/uptime)"; }
${PERF ? 'mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true' : ''}
# requests the ublk server has been handed so far (all queues)
ublkreqs() { $U status /dev/ublkb0 --json | node -e 'const j=JSON.parse(require("fs").readFileSync(0,"utf8"));const u=(Array.isArray(j)?j[0]:j).ublk;console.log(u.queueRequests.reduce((a,b)=>a+b,0))'; }
modprobe brd rd_nr=1 rd_size=$(( ${SIZE_MB} * 1024 * 6 ))
modprobe -q crc32c_generic || true; modprobe ext4; modprobe loop; modprobe fuse
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/ram0 && mkdir -p /tmp/r && mount /dev/ram0 /tmp/r
R=/tmp/r; B=$R/disk.img; C=$R/c.cache; W=$R/wc.cache; K=$R/bcache.cache
# the guest's root is read-only: ulobdev's disk records (and default caches) go to the RAM disk
export ULOBDEV_STATE_DIR=$R/state
dd if=/dev/zero of=$B bs=1M count=${SIZE_MB} conv=fsync status=none
A="-c $C -b $R/c.bitmap --writeback --daemon"
# read every block once (present), then write every whole MiB once (dirty); bcache0 is 8 KiB short of
# its backing device (its superblock), so the count comes from the device
fill() { dd if=$1 of=/dev/null bs=1M iflag=direct status=none && dd if=/dev/zero of=$1 bs=1M count=$(( $(blockdev --getsize64 $1) / 1048576 )) oflag=direct conv=fsync status=none; }
${Array.from({ length: ROUNDS }, (_, r) => {
  // round 1 writes /mnt/fio-TAG-WORKLOAD.json, round N (2+) /mnt/fio-rN-TAG-WORKLOAD.json (and
  // cpu-*.txt alike); the even rounds run the rows in reverse (ABBA: a drift of the host's load over
  // the run falls on every row alike). Round 1 keeps ORDER: its first rows fill $C for the loop rows.
  const rows = ORDER.filter((k) => wanted.has(k));
  const text = (r % 2 ? rows.reverse() : rows).map((k) => SECTIONS[k]).join('\n');
  return r === 0 ? text : text.replaceAll('/mnt/fio-', `/mnt/fio-r${r + 1}-`).replaceAll('/mnt/cpu-', `/mnt/cpu-r${r + 1}-`).replaceAll('\nstep ', `\nstep r${r + 1}-`);
}).join('\n')}
step done
`;

// ---------------------------------------------------------------------------------------------
// One boot, as test/support/vm.ts does it (that file is TypeScript for vitest; these few lines are
// repeated here so that the bench runs on plain node).

process.stderr.write('bench/vm.js: preparing the VM (scripts/vm/prepare.sh)\n');
const out = execFileSync('bash', [join(ROOT, 'scripts/vm/prepare.sh'), opts.kernel], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], timeout: 900_000 });
const vm = Object.fromEntries(out.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
if (wanted.has('uloop') && !existsSync(vm.ULOOP_KO)) fail(`${vm.ULOOP_KO} is missing after prepare.sh`);

const base = join(ROOT, '.vm', 'run');
mkdirSync(base, { recursive: true });
const scratch = mkdtempSync(join(base, 'bench-'));
writeFileSync(join(scratch, 'cmd.sh'), `set -e\nULOOP_KO=${vm.ULOOP_KO}\n${script}\n`);
const memoryMb = 1024 + SIZE_MB * 6;
const args = [
  '-accel', 'tcg', '-cpu', 'max', '-smp', '2', '-m', String(memoryMb),
  '-nographic', '-no-reboot', '-monitor', 'none',
  '-kernel', vm.KERNEL, '-initrd', vm.INITRD,
  '-append', `console=ttyS0 panic=-1 loglevel=4 ulobvm.modules=${vm.MODULES} ulobvm.project=${ROOT.replace(/\/$/, '')}`,
  '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
  '-virtfs', `local,path=${scratch},mount_tag=scratch,security_model=none`,
];
const load = { start: loadavg() };
const started = Date.now();
process.stderr.write(`bench/vm.js: booting (${memoryMb} MiB, 2 vCPUs), ${DEVICES.length} devices × ${WORKLOADS.length} workloads × ${SECONDS + 1} s\n`);
const qemu = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
const stop = () => qemu.kill('SIGKILL');
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(sig, () => { stop(); rmSync(scratch, { recursive: true, force: true }); process.exit(130); });
let consoleText = '';
qemu.stdout.setEncoding('utf8').on('data', (s) => (consoleText += s));
qemu.stderr.setEncoding('utf8').on('data', (s) => (consoleText += s));
const timer = setTimeout(stop, 600_000 + 40 * (SECONDS + 1) * 1000);
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

// A kernel splat makes the numbers meaningless (same patterns as test/support/vm.ts findSplats).
const splat = /\bBUG[: ]|kernel BUG at|\bWARNING:|\bOops\b|general protection fault|\bKASAN\b|\bUBSAN\b|\bKFENCE\b|possible (circular|recursive) locking|list_(add|del) corruption|blocked for more than \d+ seconds|Call Trace:/;
const splats = `${read('dmesg.log')}\n${consoleText}`.split('\n').filter((l) => splat.test(l));
if (splats.length) {
  process.stderr.write(`--- guest kernel splat, scratch ${scratch} ---\n${splats.join('\n')}\n`);
  process.exit(1);
}

// ---------------------------------------------------------------------------------------------
// Results

const results = {};
for (const d of DEVICES) {
  results[d.key] = {};
  for (const w of WORKLOADS) {
    // each round's numbers; the row reports its best round (by bandwidth, the same order as IOPS)
    const rounds = Array.from({ length: ROUNDS }, (_, r) => {
      const j = JSON.parse(read(`fio-${r ? `r${r + 1}-` : ''}${d.key}-${w.key}.json`)).jobs[0];
      const side = w.rw.includes('read') ? j.read : j.write;
      // /proc/stat cpu line: user nice system idle iowait irq softirq steal (USER_HZ); busy = all but idle and iowait
      const [t0, t1] = read(`cpu-${r ? `r${r + 1}-` : ''}${d.key}-${w.key}.txt`)
        .trim()
        .split('\n')
        .map((l) => l.trim().split(/\s+/).slice(1, 9).map(Number));
      const busy = t0 && t1 ? t1.reduce((a, v, i) => a + (i === 3 || i === 4 ? 0 : v - t0[i]), 0) / 100 : NaN;
      const total = t0 && t1 ? t1.reduce((a, v, i) => a + v - t0[i], 0) / 100 : NaN;
      // the requests over the same span: fio's ramp second at the measured rate, then the run
      const ios = side.iops * (SECONDS + 1);
      return {
        iops: Math.round(side.iops),
        mbps: Math.round(side.bw_bytes / 1e6),
        latP50us: Math.round(side.clat_ns.percentile['50.000000'] / 1000),
        latP99us: Math.round(side.clat_ns.percentile['99.000000'] / 1000),
        // the guest's 2 vCPUs: busy share over the run, and busy CPU µs per request
        cpuBusy: Number((busy / total).toFixed(3)),
        cpuUsPerRequest: ios > 0 ? Math.round((busy * 1e6) / ios) : null,
      };
    });
    const best = rounds.reduce((a, b) => (b.mbps > a.mbps || (b.mbps === a.mbps && b.iops > a.iops) ? b : a));
    results[d.key][w.key] = ROUNDS > 1 ? { ...best, rounds: rounds.map((x) => x.iops), cpuUsPerRequestRounds: rounds.map((x) => x.cpuUsPerRequest) } : best;
  }
}
const value = (d, w) => (w.unit === 'IOPS' ? results[d][w.key].iops : results[d][w.key].mbps);
const fmt = (n) => n.toLocaleString('en-US');
const rows = WORKLOADS.map((w) => {
  const row = { workload: `${w.title} (${w.unit})` };
  for (const d of DEVICES) {
    row[d.key] = fmt(value(d.key, w));
    if (d.key !== 'loop') row[`${d.key}Ratio`] = (value(d.key, w) / value('loop', w)).toFixed(2);
  }
  return row;
});
const columns = [{ key: 'workload', title: `fio QD${QD}, direct=1, ${SECONDS} s` }];
for (const d of DEVICES) {
  columns.push({ key: d.key, title: d.title, align: 'right' });
  if (d.key !== 'loop') columns.push({ key: `${d.key}Ratio`, title: '/loop', align: 'right' });
}
const steps = [...guestOut.matchAll(/^== (\S+) ([\d.]+)$/gm)].map((x) => [x[1], Number(x[2])]);
const info = guestOut.split('\n').filter((l) => l && !l.startsWith('== '));
// The issue's goals for uloop hits: reads ≥ 0.9× loop dio and ≥ 1.0× bcache; writes to dirty
// blocks ≥ 0.8× loop dio and ≥ 1.0× dm-writecache.
const GOALS = [
  ...['randread', 'seqread'].flatMap((w) => [
    { workload: w, against: 'loop', min: 0.9 },
    { workload: w, against: 'bcache', min: 1.0 },
  ]),
  ...['randwrite', 'seqwrite'].flatMap((w) => [
    { workload: w, against: 'loop', min: 0.8 },
    { workload: w, against: 'writecache', min: 1.0 },
  ]),
].filter((g) => wanted.has('uloop') && wanted.has(g.against) && wantedWorkloads.has(g.workload)).map((g) => ({ device: 'uloop', ...g }));
// Issue 15's goals for ublk: 4 KiB random reads ≥ 0.8× loop dio; every row ≥ 2× ulobdev's /dev/loopN frontend.
GOALS.push(
  ...[{ workload: 'randread', against: 'loop', min: 0.8 }, ...WORKLOADS.map((w) => ({ workload: w.key, against: 'ulobloop', min: 2.0 }))]
    .filter((g) => wanted.has('ublk') && wanted.has(g.against) && wantedWorkloads.has(g.workload))
    .map((g) => ({ device: 'ublk', ...g })),
);
const goals = GOALS.map((g) => {
  const ratio = value(g.device, WORKLOADS.find((w) => w.key === g.workload)) / value(g.against, WORKLOADS.find((w) => w.key === g.workload));
  return { ...g, ratio: Number(ratio.toFixed(3)), met: ratio >= g.min };
});
printTable(columns, rows, {
  title: `In the guest (qemu TCG, 2 vCPUs, ${memoryMb} MiB; Debian ${vm.KVER}); ${SIZE_MB} MiB device on a brd RAM disk; host: ${cpus().length} × ${cpus()[0]?.model}, load ${load.start.map((x) => x.toFixed(1)).join(' ')}`,
  notes: [
    `/loop: rate divided by the loop device's with --direct-io=on on the same kind of file`,
    ...(ROUNDS > 1
      ? [
          `each row: the best of ${ROUNDS} rounds, the rows interleaved (every other round reversed); every round's IOPS, then the guest's CPU µs per request:`,
          ...DEVICES.flatMap((d) =>
            WORKLOADS.map((w) => `  ${d.title}, ${w.title}: ${results[d.key][w.key].rounds.map(fmt).join(' / ')}; CPU µs/request ${results[d.key][w.key].cpuUsPerRequestRounds.join(' / ')}`),
          ),
        ]
      : DEVICES.flatMap((d) => WORKLOADS.map((w) => `  ${d.title}, ${w.title}: guest CPU ${(results[d.key][w.key].cpuBusy * 100).toFixed(0)} % busy, ${results[d.key][w.key].cpuUsPerRequest} µs/request`))),
    ...goals.map((g) => `goal ${g.device}/${g.against} ${g.workload} ≥ ${g.min.toFixed(2)}: ${g.ratio.toFixed(2)} ${g.met ? 'met' : 'MISSED'}`),
    ...info.map((l) => `guest: ${l}`),
    `wall time ${(wallMs / 1000).toFixed(0)} s`,
  ],
});
writeJson(opts.json, {
  bench: 'vm',
  date: new Date().toISOString(),
  machine: { cpus: cpus().length, cpuModel: cpus()[0]?.model, memoryGiB: Math.round(totalmem() / 2 ** 30), loadAverage: load, guest: { kernel: vm.KVER, memoryMb, vcpus: 2, accel: 'tcg' } },
  params: { sizeMiB: SIZE_MB, seconds: SECONDS, rounds: ROUNDS, rampSeconds: 1, iodepth: QD, ioengine: 'libaio', direct: true },
  results,
  goals,
  ratiosVsLoop: Object.fromEntries(DEVICES.filter((d) => d.key !== 'loop').map((d) => [d.key, Object.fromEntries(WORKLOADS.map((w) => [w.key, Number((value(d.key, w) / value('loop', w)).toFixed(3))]))])),
  guest: { steps, info },
  wallSeconds: Math.round(wallMs / 1000),
});
if (PERF) {
  for (const d of DEVICES.filter((x) => PROFILED.has(x.key))) {
    for (const w of WORKLOADS) {
      const text = read(`perf-${d.key}-${w.key}.txt`);
      if (text) process.stdout.write(`\n--- perf, ${d.title}, ${w.title}: share of samples by ${d.key.startsWith('ublk') ? 'thread and ' : ''}symbol (all CPUs) ---\n${text}`);
      if (!d.key.startsWith('ublk')) continue;
      // perf stat -x, lines: value,unit,event,...; the server's requests over the same span
      const counts = read(`perfstat-${d.key}-${w.key}.txt`)
        .split('\n')
        .map((l) => l.split(','))
        .filter((f) => f.length > 2 && /^\d+$/.test(f[0]));
      const [before, after] = read(`reqs-${d.key}-${w.key}.txt`).trim().split('\n').map(Number);
      const reqs = after - before;
      if (counts.length && reqs > 0) {
        const per = counts.map((f) => `${f[2].replace('syscalls:sys_enter_', '')} ${fmt(Number(f[0]))} (${(Number(f[0]) / reqs).toFixed(2)}/request)`);
        process.stdout.write(`--- perf stat, ${d.title}, ${w.title}: ${fmt(reqs)} requests served; system-wide: ${per.join(', ')} ---\n`);
      }
    }
  }
}
if (opts.keep) process.stderr.write(`bench/vm.js: scratch kept in ${scratch}\n`);
else rmSync(scratch, { recursive: true, force: true });
