// FLUSH durability on /dev/uloopN with concurrent writers, recorded with dm-log-writes (issue 11,
// "Tests that would have caught all of this"). The cache file, bitmap and metadata live on an ext4
// on a log-writes target. WRITERS processes write /dev/uloop0 at once (O_DIRECT; whole 64 KiB
// blocks or single 4 KiB units; present clean blocks: intents; missing blocks written whole: the
// kernel's pending set; missing blocks written in part: fill first) and call fsync or fdatasync at
// random points; after each sync the writer puts a mark into the log (test/vm/uloop-race.c).
// Each mark is then replayed onto a blank device keeping only what a FLUSH (or FUA) covered
// (log-replay --strict: the least a power loss at that moment leaves); ext4 recovers its journal,
// the store opens as a daemon start opens it (its crash recovery included), and the device it
// gives (present blocks from the cache file, the rest from the disk) must hold, in every 4 KiB
// unit, a whole generation some writer wrote, at least the newest one acknowledged before that
// sync began (invariant 3), and nothing a sync did not cover (invariant 1: no present bit over
// data that never reached flash). The kernel's order in uloop_flush (take the pending set, then
// sync) is what this guards: syncing first hands over blocks written during the sync as present
// (issue 11 item 1). For the window to be hit, the cache filesystem's device is slow (dm-delay
// under dm-log-writes, as uloop-barrier.test.ts does: each sync takes hundreds of ms, and the
// other writers' whole-block writes to missing blocks land in it) and ext4 runs data=writeback
// (the daemon's own metadata fsync, a journal commit, then writes no cache-file pages out before
// the mark). Without these, one run on the planted order passed; with them the planted order
// fails at some mark with "wrong" units (a block recorded present over an unwritten extent).
// One daemon start on the last mark's replay checks that the device the checker computes is the
// device the daemon serves. ULOB_TEST_KO=PATH runs it on another build of uloop.ko (that is how the
// planted order was run, without touching kernel/).
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';
import { buildTool } from './uloop-tools.js';

const WRITERS = 4;
const OPS = 40; // writes per writer; about one in eight is followed by a sync and a mark
const BLOCKS = 256; // 16 MiB of 64 KiB blocks; the first 64 are read (present, clean) before the writers start
const DELAY_MS = 100; // dm-delay on the cache filesystem's writes
let run: VmResult;

// The checker: one Node process for every mark (a Node start costs 10-20 s under TCG).
const CHECK = `
import { execFileSync } from 'node:child_process';
import { openSync, writeSync, closeSync, readSync } from 'node:fs';
const { CacheStore } = await import('${ROOT}/dist/cache/store.js');
const { openBacking } = await import('${ROOT}/dist/source/backing.js');
const [replay, race, ...marks] = process.argv.slice(2);
const sh = (cmd) => execFileSync('sh', ['-c', cmd], { encoding: 'utf8' });
let bad = 0;
for (const mark of marks) {
  sh('rm -f /tmp/s.img && truncate -s 64M /tmp/s.img && ' + replay + ' /tmp/log.img /tmp/s.img ' + mark + ' --strict > /dev/null');
  const loop = sh('losetup -f --show /tmp/s.img').trim();
  sh('mount ' + loop + ' /tmp/rp');
  try {
    const source = await openBacking('/tmp/disk.img', { writable: false });
    const store = await CacheStore.open({
      paths: { cache: '/tmp/rp/d.cache', bitmap: '/tmp/rp/d.bitmap', metadata: '/tmp/rp/d.cache.meta' },
      backing: source, mode: 'writeback',
    });
    const bs = store.geometry.blockSize, view = openSync('/tmp/view.img', 'w'), disk = openSync('/tmp/disk.img', 'r');
    const buf = Buffer.alloc(bs);
    let present = 0, dirty = 0;
    for (let b = 0; b < store.geometry.blockCount; b++) {
      if (store.present.get(b)) { present++; await store.readData(buf, b * bs); }
      else if (store.dirty.get(b)) buf.fill(0); // a zeroed block
      else readSync(disk, buf, 0, bs, b * bs);
      if (store.dirty.get(b)) dirty++;
      writeSync(view, buf, 0, bs, b * bs);
    }
    closeSync(view); closeSync(disk);
    await store.abandon(); await source.close();
    try {
      console.log(sh(race + ' verify /tmp/view.img ' + (store.geometry.blockCount * bs / 4096) + ' /tmp/wl ' + mark).trim() + ' present ' + present + ' dirty ' + dirty);
    } catch (err) { bad++; console.log(String(err.stdout).trim() + ' present ' + present + ' dirty ' + dirty + ' FAILED'); }
  } finally {
    sh('umount /tmp/rp; losetup -d ' + loop);
  }
}
console.log('marks checked: ' + marks.length + ', failed: ' + bad);
process.exitCode = bad ? 1 : 0;
`;

beforeAll(async () => {
  const vm = prepareVm() as unknown as Record<string, string>;
  const race = buildTool('uloop-race');
  run = await runInVm(
    `
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; D=/dev/uloop0; R=${vm.LOG_REPLAY}; X=${race}
    insmod ${process.env.ULOB_TEST_KO || vm.ULOOP_KO}
    modprobe -q crc32c_generic || true; modprobe ext4; modprobe loop; modprobe dm-log-writes; modprobe dm-delay
    $X init /tmp/disk.img ${(BLOCKS * 65536) / 4096}
    truncate -s 64M /tmp/data.img && truncate -s 512M /tmp/log.img
    DD=$(losetup -f --show /tmp/data.img); LD=$(losetup -f --show /tmp/log.img)
    # writes (and flushes) to the cache filesystem take ${DELAY_MS} ms more: a sync lasts long enough for writes to land in it
    dmsetup create --noudevsync slow --table "0 $(blockdev --getsz $DD) delay $DD 0 0 $DD 0 ${DELAY_MS}" && dmsetup mknodes slow
    dmsetup create --noudevsync lw --table "0 $(blockdev --getsz $DD) log-writes /dev/mapper/slow $LD" && dmsetup mknodes lw
    mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/lw && mkdir -p /tmp/c /tmp/rp /tmp/wl
    mount -o data=writeback /dev/mapper/lw /tmp/c
    $U -c /tmp/c/d.cache -b /tmp/c/d.bitmap --writeback --block-size 64K --daemon $D /tmp/disk.img > /dev/null
    dd if=$D of=/dev/null bs=1M count=4 iflag=direct status=none
    t0=$(date +%s)
    $X write $D 65536 ${BLOCKS} ${WRITERS} ${OPS} /tmp/wl lw $(date +%s) && echo "writers done in $(( $(date +%s) - t0 )) s"
    MARKS=$(cat /tmp/wl/w*.log | awk '$1 == "F" { print $2 }' | tr '\\n' ' ')
    echo "marks: $(echo $MARKS | wc -w)"
    $U status $D | grep -i -m3 'dirty\\|present' || true
    $U detach $D > /dev/null && umount /tmp/c && dmsetup remove lw && dmsetup remove slow && losetup -d $DD && echo "log complete"
    t0=$(date +%s)
    CHECKED=0; node /mnt/check.mjs $R $X $MARKS || CHECKED=1
    echo "checked in $(( $(date +%s) - t0 )) s"
    # the daemon, started on the last mark's replay, serves the device the checker computed
    LAST=$(echo $MARKS | awk '{ print $NF }')
    rm -f /tmp/s.img && truncate -s 64M /tmp/s.img && $R /tmp/log.img /tmp/s.img $LAST --strict > /dev/null
    S=$(losetup -f --show /tmp/s.img) && mount $S /tmp/rp
    $U -c /tmp/rp/d.cache -b /tmp/rp/d.bitmap --daemon /dev/uloop1 /tmp/disk.img > /dev/null
    cmp /dev/uloop1 /tmp/view.img && echo "the daemon serves the checked device at mark $LAST"
    $U detach /dev/uloop1 > /dev/null; umount /tmp/rp; losetup -d $S; losetup -d $LD
    exit $CHECKED
  `,
    { memoryMb: 1536, timeoutMs: 480_000, files: { 'check.mjs': CHECK } },
  );
}, 900_000);

describe('FLUSH durability on /dev/uloopN with concurrent writers (dm-log-writes replay)', () => {
  it(`${WRITERS} writers with fsyncs at random points: at every sync's mark the replayed cache holds every write acknowledged before it, and nothing unsynced`, () => {
    expect(run.output).toContain('writers done');
    expect(run.output).toContain('log complete');
    const marks = Number(/marks: (\d+)/.exec(run.output)?.[1]);
    expect(marks).toBeGreaterThanOrEqual(WRITERS);
    const verified = run.output.match(/^verify \S+: units \d+ required \d+ wrong 0 stale 0 present \d+ dirty \d+$/gm) ?? [];
    expect(verified.length, run.output).toBe(marks);
    expect(run.output).toContain(`marks checked: ${marks}, failed: 0`);
    expect(run.output).toMatch(/the daemon serves the checked device at mark w\d+\.\d+/);
    expect(run.code).toBe(0);
  });
});
