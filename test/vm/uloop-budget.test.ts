// Zeroes and a cache budget on /dev/uloopN (issues 14-4a and 12), in one guest boot:
//  - fallocate --punch-hole, blkdiscard -z and blkdiscard (ZERO upcalls) on clean, dirty-pending
//    and dirty-recorded blocks, and a punch that is not block-aligned: each range reads zeros at
//    once, its neighbours keep their bytes, and after `flush --wait` the disk holds zeros there;
//  - ext4's zeroout: mkfs with lazy inode-table init and a mount with init_itable=0 send
//    WRITE_ZEROES (ZERO upcalls); fsck is clean;
//  - --cache-size 16M over a 128 MiB disk:
//    ext4 on /dev/uloop0, a 48 MiB file copied in (cp, sync)
//    and 4 files of 4 MiB written with fsync; all read back equal (sha256) after drop_caches, and
//    again after kill -9 of the daemon, the same command (re-attach) and drop_caches (the daemon
//    is killed holding 2 MiB of fills it answered and never recorded: its commit waits at a gate,
//    engine:commit-staged; the re-attach evicts them from the kernel and punches them); fio verify
//    writes a file while the files are read back at the same time; the cache file's st_blocks,
//    sampled every 0.5 s while a daemon runs (before the kill and after the re-attach), never
//    passes the budget plus 512 KiB (the kernel's credit: CREDIT, ROOM); a budget flush
//    ran and blocks were evicted; after unmount and flush the device equals the disk, detach, and
//    fsck of the bare disk is clean.
// A planted bug each of these caught is named in the report of the branch that added the test.
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';
import { expectCleanKernel } from './uloop-tools.js';

const MiB = 1 << 20;
const BUDGET = 16 * MiB;
let run: VmResult;
const BUDGET_RUN = `
    # --- a cache budget: 16 MiB over a 128 MiB disk, ext4 on the device.
    truncate -s 128M /tmp/bd.img
    B="$U -c /tmp/b.cache -b /tmp/b.bitmap --writeback --cache-size 16M --daemon $D /tmp/bd.img"
    # The first daemon only: a gate its fill commits wait at once /tmp/pause names it (below).
    ULOBDEV_PAUSE_FILE=/tmp/pause $B > /dev/null || echo "budget attach FAILED"
    mkfs.ext4 -q -b 4096 -E nodiscard $D && mount $D /tmp/m || echo "budget mkfs/mount FAILED"
    touch /tmp/go
    # st_blocks every 0.5 s, tagged 'live' while the first daemon runs, 'dead' from the kill to the
    # re-attach, 'again' once the second daemon runs.
    echo live > /tmp/phase
    ( while [ -e /tmp/go ]; do echo "$(cat /tmp/phase) $(stat -c %b /tmp/b.cache)"; sleep 0.5; done > /tmp/blocks ) &
    S=$!
    mkdir -p /tmp/src && head -c 48M /dev/urandom > /tmp/src/big
    for i in 1 2 3 4; do head -c 4M /dev/urandom > /tmp/src/s$i; done
    cp /tmp/src/big /tmp/m/big && sync
    for i in 1 2 3 4; do dd if=/tmp/src/s$i of=/tmp/m/s$i bs=1M conv=fsync status=none; done
    (cd /tmp/src && sha256sum big s1 s2 s3 s4 > /tmp/sums)
    echo 3 > /proc/sys/vm/drop_caches
    (cd /tmp/m && sha256sum -c --quiet /tmp/sums) && echo "checksums equal after drop_caches" || echo "checksums FAILED after drop_caches"
    pid() { node -e 'console.log(JSON.parse(require("fs").readFileSync("/run/ulobdev/uloop0.json","utf8")).pid)'; }
    # Fills the daemon answers (the kernel serves them) and never records: its commits wait at a
    # gate that never opens; 2 MiB of big's start (evicted by the reads since) are read, then kill -9.
    echo "engine:commit-staged /tmp/never" > /tmp/pause
    dd if=/tmp/m/big of=/dev/null bs=1M count=2 iflag=direct status=none || echo "gated read FAILED"
    sleep 1.5
    echo dead > /tmp/phase; kill -9 $(pid)
    k=0; while q | grep -q ' attached=1 ' && [ $k -lt 600 ]; do sleep 0.05; k=$((k+1)); done
    $B > /tmp/reattach.out 2>&1 && echo "re-attached after kill -9" || { echo "re-attach FAILED"; cat /tmp/reattach.out; }
    echo again > /tmp/phase
    echo "reattach reconcile: $(grep -o '/dev/uloop0: [0-9][0-9]* blocks [^"]*' $LOG | tr '\n' ';')"
    echo 3 > /proc/sys/vm/drop_caches
    (cd /tmp/m && sha256sum -c --quiet /tmp/sums) && echo "checksums equal after kill -9 and re-attach" || echo "checksums FAILED after re-attach"
    # fio verify writes while the files are read back (misses, evictions and hits racing writes).
    ( cd /tmp/m && for r in 1 2; do echo 3 > /proc/sys/vm/drop_caches; sha256sum -c --quiet /tmp/sums || exit 1; done ) > /tmp/readers.out 2>&1 &
    RD=$!
    fio --name=w --filename=/tmp/m/fio.dat --size=12M --bs=4k --rw=randwrite --direct=1 --ioengine=libaio --iodepth=8 \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --output=/tmp/fio.out > /dev/null 2>&1 && echo "fio verify passed" || { echo "fio FAILED"; grep -i -m5 'verify\|error\|err=' /tmp/fio.out; }
    wait $RD && echo "concurrent readers equal" || { echo "concurrent readers FAILED"; head -5 /tmp/readers.out; }
    rm /tmp/go; wait $S || true
    echo "max st_blocks live: $(sed -n 's/^live //p' /tmp/blocks | sort -n | tail -1) dead: $(sed -n 's/^dead //p' /tmp/blocks | sort -n | tail -1) again: $(sed -n 's/^again //p' /tmp/blocks | sort -n | tail -1) samples: $(wc -l < /tmp/blocks)"
    echo "st_blocks over time: $(awk '{printf "%s:%d ", substr($1,1,1), $2*512/1048576}' /tmp/blocks)"
    grep -q '"reason":"budget"' $LOG && echo "a budget flush ran"
    umount /tmp/m && echo "budget fs unmounted"
    $U flush --wait $D > /dev/null && echo "budget flushed"
    $U status --json $D > /tmp/status.json
    node -e 'const s=JSON.parse(require("fs").readFileSync("/tmp/status.json","utf8"));const j=Array.isArray(s)?s[0]:s;console.log("status: budgetBytes="+j.budgetBytes+" usedBytes="+j.usedBytes+" evictedBytes="+j.evictedBytes+" dirtyBytes="+j.dirtyBytes)'
    cmp $D /tmp/bd.img && echo "the budget device equals the disk after the flush"
    echo "st_blocks at the end: $(stat -c %b /tmp/b.cache)"
    $U detach $D > /dev/null && echo "budget detached"
    fsck.ext4 -fn /tmp/bd.img > /tmp/fsck2.out 2>&1 && echo "bare disk fsck clean" || { echo "bare disk fsck FAILED"; head -20 /tmp/fsck2.out; }
`;

beforeAll(async () => {
  const vm = prepareVm();
  run = await runInVm(
    `
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; CTL=${vm.ULOOPCTL}; D=/dev/uloop0; LOG=/run/ulobdev/uloop0.log; M=1048576
    insmod ${vm.ULOOP_KO} io_timeout_s=600 reattach_timeout_s=300
    modprobe -q crc32c_generic || true; modprobe ext4
    head -c 64M /dev/urandom > /tmp/disk.img
    cp /tmp/disk.img /tmp/orig.img
    A="$U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --daemon $D /tmp/disk.img"
    $A > /dev/null || echo "attach FAILED"
    q() { $CTL query 0; }
    field() { q | tr ' ' '\\n' | sed -n "s/^$1=//p"; }
    echo "added: $(q)"
    # zeros OFF LEN FILE: LEN bytes at OFF of FILE are zeros
    zeros() { f=; [ $3 = $D ] && f=iflag=direct; dd if=$3 bs=512 skip=$(($1 / 512)) count=$(($2 / 512)) $f status=none | cmp -s -n $2 - /dev/zero; }
    same() { dd if=$D bs=512 skip=$(($1 / 512)) count=$(($2 / 512)) iflag=direct status=none > /tmp/a; dd if=/tmp/orig.img bs=512 skip=$(($1 / 512)) count=$(($2 / 512)) status=none > /tmp/b; cmp -s /tmp/a /tmp/b; }

    # --- zeroes: clean (read in), dirty and pending (written whole while missing), dirty and recorded
    # (read in, then rewritten: an INTENT), and a punch not aligned to blocks
    dd if=$D of=/dev/null bs=1M skip=16 count=1 iflag=direct status=none
    dd if=/dev/urandom of=$D bs=1M seek=20 count=1 oflag=direct status=none
    dd if=$D of=/dev/null bs=1M skip=24 count=1 iflag=direct status=none
    dd if=/dev/urandom of=$D bs=1M seek=24 count=1 oflag=direct conv=notrunc status=none && sync $D
    z0=$(field zero_bytes)
    fallocate --punch-hole -o 16M -l 1M $D && zeros $((16*M)) $M $D && echo "punch-hole on clean blocks reads zeros"
    blkdiscard -z -o $((20*M)) -l $M $D && zeros $((20*M)) $M $D && echo "blkdiscard -z on pending blocks reads zeros"
    blkdiscard -o $((24*M)) -l $M $D && zeros $((24*M)) $M $D && echo "discard on recorded dirty blocks reads zeros"
    fallocate --punch-hole -o $((28*M + 512)) -l 10240 $D && zeros $((28*M + 512)) 10240 $D && echo "unaligned punch reads zeros"
    same $((28*M)) 512 && same $((28*M + 10752)) 1536 && echo "the unaligned punch's neighbours are intact"
    echo "ZERO bytes seen by the kernel: $(( $(field zero_bytes) - z0 ))"
    # Zeros cost no flash: the cache file holds no data there.
    $U flush --wait $D > /dev/null && echo "flushed"
    zeros $((16*M)) $M /tmp/disk.img && zeros $((20*M)) $M /tmp/disk.img && zeros $((24*M)) $M /tmp/disk.img && zeros $((28*M + 512)) 10240 /tmp/disk.img && echo "the disk holds zeros after the flush"
    zeros $((16*M)) $M $D && zeros $((20*M)) $M $D && zeros $((24*M)) $M $D && echo "zeroed ranges still read zeros after the flush"
    # The disk image as the device should now be: the zeroed ranges in orig.img too.
    cp /tmp/disk.img /tmp/orig.img

    # --- ext4's zeroout: lazy inode-table init at mount sends WRITE_ZEROES
    z0=$(field zero_bytes)
    mkfs.ext4 -q -b 4096 -E lazy_itable_init=1,nodiscard $D && mkdir -p /tmp/m && mount -o init_itable=0 $D /tmp/m
    k=0; while [ $(field zero_bytes) -eq $z0 ] && [ $k -lt 300 ]; do sleep 0.1; k=$((k+1)); done
    head -c 4M /dev/urandom > /tmp/f && cp /tmp/f /tmp/m/f && sync
    sleep 2
    umount /tmp/m
    echo "ext4 zeroout bytes: $(( $(field zero_bytes) - z0 ))"
    fsck.ext4 -fn $D > /tmp/fsck.out 2>&1 && echo "fsck clean" || { echo "fsck FAILED"; head -20 /tmp/fsck.out; }
    $U detach $D > /dev/null && echo detached

${BUDGET_RUN}    rmmod uloop && echo unloaded
  `,
    { memoryMb: 2048, timeoutMs: 900_000 },
  );
}, 1_000_000);

describe('zeroes and a cache budget on /dev/uloopN', () => {
  it('punch-hole, discard and write-zeroes read zeros at once and reach the disk as zeros', () => {
    expect(run.output).toContain('punch-hole on clean blocks reads zeros');
    expect(run.output).toContain('blkdiscard -z on pending blocks reads zeros');
    expect(run.output).toContain('discard on recorded dirty blocks reads zeros');
    expect(run.output).toContain('unaligned punch reads zeros');
    expect(run.output).toContain("the unaligned punch's neighbours are intact");
    // 3 MiB of whole blocks, and the one whole block inside the unaligned punch.
    expect(Number(/ZERO bytes seen by the kernel: (\d+)/.exec(run.output)?.[1])).toBeGreaterThanOrEqual(3 * MiB + 4096);
    expect(run.output).toContain('the disk holds zeros after the flush');
    expect(run.output).toContain('zeroed ranges still read zeros after the flush');
  });

  it('a 16 MiB budget under ext4: files read back equal after drop_caches and after kill -9 and re-attach, fio verify with readers, within the budget, device == disk, fsck clean', () => {
    expect(run.output, run.output).not.toContain('FAILED');
    expect(run.output).toContain('checksums equal after drop_caches');
    expect(run.output).toContain('re-attached after kill -9');
    expect(run.output).toContain('checksums equal after kill -9 and re-attach');
    expect(run.output).toContain('fio verify passed');
    expect(run.output).toContain('concurrent readers equal');
    expect(run.output).toContain('a budget flush ran');
    const timeline = /st_blocks over time: (.*)/.exec(run.output)?.[1] ?? '';
    // The numbers for the record (the run's output is dropped when it passes).
    console.log(run.output.split('\n').filter((l) => /^(max st_blocks|st_blocks|status:|reattach reconcile:)/.test(l)).join('\n'), `\nguest run ${run.ms} ms`);
    const live = Number(/max st_blocks live: (\d+)/.exec(run.output)?.[1]) * 512;
    const again = Number(/max st_blocks .* again: (\d+)/.exec(run.output)?.[1]) * 512;
    expect(live, timeline).toBeGreaterThan(0);
    // The daemon was killed holding fills it had answered and not recorded (its commit at the
    // gate): the re-attach found them in the kernel, evicted them there and punched them. Without
    // that pass the cache file stayed over the bound after the re-attach (16.77 MiB for 16 MiB +
    // 512 KiB in session 9, before the gate made the case certain).
    expect(Number(/reattach reconcile:.*?(\d+) blocks the dead daemon filled and never recorded/.exec(run.output)?.[1]), run.output).toBeGreaterThan(0);
    // The kernel writes whole missing blocks without asking the daemon (rule 4: cp's 48 MiB of new
    // blocks, ext4's journal) only within its credit (CREDIT, kernelCredit in src/bdev/uloop.ts):
    // past it each write waits for ROOM, which the daemon answers once it has made room (the first
    // run without the credit saw 55 MiB over the 16 MiB budget). So the cache file stays within the
    // budget plus one eviction unit (256 KiB) at every sample while a daemon runs, before the kill
    // and after the re-attach; slack for the sampling: BUDGET / 32 (512 KiB).
    const slack = BUDGET / 32;
    expect(live, `${timeline}\n${run.output}`).toBeLessThanOrEqual(BUDGET + slack);
    expect(again, `${timeline}\n${run.output}`).toBeLessThanOrEqual(BUDGET + slack);
    const st = Object.fromEntries((/^status: (.*)$/m.exec(run.output)?.[1] ?? '').split(' ').map((kv) => [kv.split('=')[0], Number(kv.split('=')[1])]));
    expect(st.budgetBytes).toBe(BUDGET);
    expect(st.evictedBytes).toBeGreaterThan(0);
    expect(st.dirtyBytes).toBe(0);
    expect(st.usedBytes).toBeLessThanOrEqual(BUDGET);
    expect(run.output, run.output).toContain('the budget device equals the disk after the flush');
    expect(Number(/st_blocks at the end: (\d+)/.exec(run.output)?.[1]) * 512).toBeLessThanOrEqual(BUDGET + BUDGET / 32);
    expect(run.output).toContain('budget detached');
    expect(run.output, run.output).toContain('bare disk fsck clean');
  });

  it("ext4's zeroout sends WRITE_ZEROES and the filesystem checks clean", () => {
    expect(Number(/ext4 zeroout bytes: (\d+)/.exec(run.output)?.[1])).toBeGreaterThan(0);
    expect(run.output).toContain('fsck clean');
    expect(run.output).toContain('detached');
    expect(run.output).toContain('unloaded');
    expectCleanKernel(run);
    expect(run.code).toBe(0);
  });
});
