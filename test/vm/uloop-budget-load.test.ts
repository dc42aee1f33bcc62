// A cache budget on /dev/uloopN under the two loads a fresh review (session 8, review8 K1 and K2)
// broke it with, in one guest boot (6.12 unless ULOBVM_KERNEL says otherwise), 16 MiB budget
// over a 256 MiB disk, io_timeout_s=60:
//  - K1, a buffered writer onto the raw device (through the block device's page cache, no FLUSH
//    of its own): `dd bs=1M count=64` of random data over missing blocks, then `sync`. Before the
//    BARRIER ioctl the daemon's only way to take the kernel's pending blocks was `sync DEVICE`,
//    whose fsync writes the page cache back first: those writes waited for a ROOM the daemon
//    answered only after that fsync, until io_timeout_s failed them (`lost async page write`, 47
//    MiB gone, dd exit 0). Now: sync exits 0, no request timed out, no I/O error in the kernel log,
//    the 64 MiB read back equal after drop_caches and reach the disk equal after a flush, and the
//    cache file's st_blocks, sampled every 0.5 s, stays within the budget plus 512 KiB.
//  - K2, concurrent large reads: every other 64 KiB of the first 32 MiB read in (16 MiB: the
//    budget), then fio 1 MiB random reads at depth 32 over those 32 MiB for 30 s. EVICT leaving
//    the whole range of every request still preparing let the requests keep every clean block
//    between them, and reads failed with EIO after 8 s ("full of dirty data" with nothing dirty).
//    Now fio exits 0 with no error, and the region reads back equal to the disk.
// (Development only, behind ULOB_UNSAFE_ULOOP_BUDGET=1, until session 10 lifted the refusal.)
// K1's peak was 20-21 MiB for 16 MiB (three runs) until a ROOM's answer raised the
// limit in the kernel (the daemon raised it first and other writes took that room); then 16.0.
import { beforeAll, describe, expect, it } from 'vitest';
import { expectCleanKernel, prepareVm, ROOT, runInVm, TCG_STARVATION, type VmResult } from '../support/vm.js';

const MiB = 1 << 20;
const BUDGET = 16 * MiB;
const SLACK = 512 * 1024;
let run: VmResult;

beforeAll(async () => {
  const vm = prepareVm();
  run = await runInVm(
    `
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; CTL=${vm.ULOOPCTL}; D=/dev/uloop0; LOG=/run/ulobdev/uloop0.log
    insmod ${vm.ULOOP_KO} io_timeout_s=60 reattach_timeout_s=300
    field() { $CTL query 0 | tr ' ' '\\n' | sed -n "s/^$1=//p"; }
    # st_blocks of the cache file, and the kernel's present and pending blocks, every 0.2 s
    sample() { ( while [ -e /tmp/go ]; do echo "$(stat -c %b $1) $(field present) $(field pending)"; sleep 0.2; done > /tmp/blocks.$2 ) & }

    # --- K1: a buffered writer of whole missing blocks, then sync
    truncate -s 256M /tmp/k1.img
    head -c 64M /dev/urandom > /tmp/src
    $U -c /tmp/k1.cache -b /tmp/k1.bitmap --writeback --cache-size 16M --daemon $D /tmp/k1.img > /tmp/attach.out 2>&1 || { echo "k1 attach FAILED"; cat /tmp/attach.out; }
    touch /tmp/go; sample /tmp/k1.cache k1
    t0=$(date +%s)
    dd if=/tmp/src of=$D bs=1M seek=100 count=64 status=none && r=0 || r=$?; echo "k1 dd rc=$r"
    timeout 600 sync $D && r=0 || r=$?; echo "k1 sync rc=$r secs=$(( $(date +%s) - t0 ))"
    rm /tmp/go; wait
    echo "k1 timeouts=$(field timeouts) io_errors=$(field io_errors)"
    echo 3 > /proc/sys/vm/drop_caches
    dd if=$D bs=1M skip=100 count=64 iflag=direct status=none | cmp -s - /tmp/src && echo "k1 the device reads back equal"
    $U flush --wait $D > /dev/null && echo "k1 flushed"
    dd if=/tmp/k1.img bs=1M skip=100 count=64 status=none | cmp -s - /tmp/src && echo "k1 the disk holds the data"
    echo "k1 max st_blocks: $(sort -n /tmp/blocks.k1 | tail -1 | cut -d' ' -f1) samples: $(wc -l < /tmp/blocks.k1)"
    echo "k1 st_blocks MiB over time: $(awk '{printf "%d ", $1*512/1048576}' /tmp/blocks.k1)"
    echo "k1 kernel present/pending MiB over time: $(awk '{printf "%d/%d ", $2/256, $3/256}' /tmp/blocks.k1)"
    echo "k1 log: $(grep -c 'failed\\|CacheFull' $LOG || true) failure lines"; grep -m5 'failed\\|CacheFull' $LOG | cut -c1-300 || true
    $U detach $D > /dev/null && echo "k1 detached"

    # --- K2: concurrent 1 MiB reads over half-cached ranges
    head -c 256M /dev/urandom > /tmp/k2.img
    $U -c /tmp/k2.cache -b /tmp/k2.bitmap --writeback --cache-size 16M --daemon $D /tmp/k2.img > /tmp/attach.out 2>&1 || { echo "k2 attach FAILED"; cat /tmp/attach.out; }
    i=0; while [ $i -lt 512 ]; do dd if=$D of=/dev/null bs=64k skip=$i count=1 iflag=direct status=none; i=$((i+2)); done
    echo "k2 before: present=$(field present) dirty=$(field dirty)"
    touch /tmp/go; sample /tmp/k2.cache k2
    t0=$(date +%s)
    fio --name=r --filename=$D --size=32M --bs=1M --rw=randread --direct=1 --ioengine=libaio --iodepth=32 \\
        --time_based=1 --runtime=30 --output=/tmp/fio.out > /dev/null 2>&1 && r=0 || r=$?; echo "k2 fio rc=$r secs=$(( $(date +%s) - t0 ))"
    rm /tmp/go; wait
    grep -m2 'err=\\|READ:' /tmp/fio.out | cut -c1-200 || true
    echo "k2 timeouts=$(field timeouts) io_errors=$(field io_errors)"
    head -c 32M /tmp/k2.img > /tmp/k2.head
    dd if=$D bs=1M count=32 iflag=direct status=none | cmp -s - /tmp/k2.head && echo "k2 the region reads back equal"
    echo "k2 max st_blocks: $(sort -n /tmp/blocks.k2 | tail -1 | cut -d' ' -f1)"
    echo "k2 log: $(grep -c 'failed\\|CacheFull' $LOG || true) failure lines"; grep -m5 'failed\\|CacheFull' $LOG | cut -c1-300 || true
    echo "k2 budget flushes: $(grep -c '"reason":"budget"' $LOG || true)"
    $U detach $D > /dev/null && echo "k2 detached"
    echo "kernel: $(dmesg | grep -c 'lost async page write\\|I/O error\\|waited more than' || true) I/O error lines"
    dmesg | grep -m5 'lost async page write\\|I/O error\\|waited more than' || true
    rmmod uloop && echo unloaded
  `,
    { memoryMb: 2048, timeoutMs: 1_200_000, allowSplats: TCG_STARVATION },
  );
  console.log(run.output.split('\n').filter((l) => /^k[12] /.test(l)).join('\n'), `\nguest run ${run.ms} ms`);
}, 1_300_000);

describe('a cache budget on /dev/uloopN under review8 K1 and K2', () => {
  it('K1: a buffered writer onto the raw device, then sync: no EIO, no request timed out, data equal, within the budget', () => {
    expect(run.output, run.output).not.toContain('FAILED');
    expect(run.output).toContain('k1 dd rc=0');
    expect(run.output, run.output).toMatch(/k1 sync rc=0 secs=\d+/);
    expect(run.output, run.output).toContain('k1 timeouts=0 io_errors=0');
    expect(run.output, run.output).toContain('k1 the device reads back equal');
    expect(run.output).toContain('k1 flushed');
    expect(run.output, run.output).toContain('k1 the disk holds the data');
    const max = Number(/k1 max st_blocks: (\d+)/.exec(run.output)?.[1]) * 512;
    const timeline = /k1 st_blocks MiB over time: (.*)/.exec(run.output)?.[1] ?? '';
    expect(max, timeline).toBeGreaterThan(0);
    expect(max, timeline).toBeLessThanOrEqual(BUDGET + SLACK);
    expect(run.output).toContain('k1 detached');
  });

  it('K2: 1 MiB random reads at depth 32 over twice the budget: fio exits 0, no EIO, reads equal the disk', () => {
    expect(run.output, run.output).toMatch(/k2 fio rc=0 /);
    expect(run.output, run.output).toContain('k2 timeouts=0 io_errors=0');
    expect(run.output, run.output).toMatch(/k2 log: 0 failure lines/);
    expect(run.output, run.output).toContain('k2 the region reads back equal');
    expect(Number(/k2 max st_blocks: (\d+)/.exec(run.output)?.[1]) * 512).toBeLessThanOrEqual(BUDGET + SLACK);
    expect(run.output).toContain('k2 detached');
  });

  it('the kernel logged no I/O error and no splat', () => {
    expect(run.output, run.output).toContain('kernel: 0 I/O error lines');
    expect(run.output).toContain('unloaded');
    expectCleanKernel(run);
    expect(run.code).toBe(0);
  });
});
