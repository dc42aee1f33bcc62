// Zeroes and a cache budget on /dev/uloopN (issues 12 and 14-4a), in one guest boot:
//  - fallocate --punch-hole, blkdiscard -z and blkdiscard (ZERO upcalls) on clean, dirty-pending
//    and dirty-recorded blocks, and a punch that is not block-aligned: each range reads zeros at
//    once, its neighbours keep their bytes, and after `flush --wait` the disk holds zeros there;
//  - --cache-size 32M over a 192 MiB disk: fio --verify writes 64 MiB at random (whole blocks the
//    kernel writes without asking, rewrites through INTENTs) while readers verify 96 MiB that
//    were written into the disk before attach, so misses, budget flushes and evictions race hits
//    and writes; the daemon is killed (kill -9) mid-run, budget flushes running, and the same
//    command takes the device back (finishing an epoch commit the dead daemon left half done, if
//    the kill fell there: the uloop model covers that point exactly); no verify error, no I/O
//    error, a flush with reason `budget` ran, evictions happened, the cache file's st_blocks
//    (sampled every 0.5 s) stays within the budget plus slack while a daemon runs and is back
//    under it after the final flush, status matches the kernel's exact counts (QUERY), and after
//    a flush the device equals the disk;
//  - ext4's zeroout, on the budgeted device: mkfs with lazy inode-table init and a mount with
//    init_itable=0 send WRITE_ZEROES (ZERO upcalls); fsck is clean.
// A planted bug each of these caught is named in the report of the branch that added the test.
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';
import { expectCleanKernel, parseQuery } from './uloop-tools.js';

const MiB = 1 << 20;
const BUDGET = 32 * MiB;
let run: VmResult;

beforeAll(async () => {
  const vm = prepareVm();
  run = await runInVm(
    `
    U="node ${ROOT}/dist/cli/ulobdev.js"; CTL=${vm.ULOOPCTL}; D=/dev/uloop0; LOG=/run/ulobdev/uloop0.log; M=1048576
    # Long timeouts: a request queued while the killed daemon's successor starts (20-50 s in TCG)
    # must wait for it, not fail.
    insmod ${vm.ULOOP_KO} io_timeout_s=600 reattach_timeout_s=300
    modprobe -q crc32c_generic || true; modprobe ext4
    head -c 192M /dev/urandom > /tmp/disk.img
    # The readers' region carries fio's verify headers, written into the disk before attach.
    R="--offset=96M --size=96M --bs=64k --rw=write --verify=crc32c --verify_fatal=1"
    fio --name=prep --filename=/tmp/disk.img $R --do_verify=0 --output=/tmp/prep.out > /dev/null || { echo "prep FAILED"; cat /tmp/prep.out; }
    cp /tmp/disk.img /tmp/orig.img
    A="$U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --cache-size 32M --daemon $D /tmp/disk.img"
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

    # --- the budget under load: writers (verify) on [32M, 96M), readers (verify) on [96M, 192M)
    touch /tmp/go
    # st_blocks every 0.5 s, tagged by phase: 'live' until the kill, 'dead' from the kill to the
    # re-attach (the kernel then writes whole missing blocks with nobody to evict), 'after' from then.
    echo live > /tmp/phase
    ( while [ -e /tmp/go ]; do echo "$(cat /tmp/phase) $(stat -c %b /tmp/d.cache)"; sleep 0.5; done > /tmp/blocks ) &
    S=$!
    fio --filename=$D --direct=1 --ioengine=libaio --group_reporting --output=/tmp/fio.out \\
        --name=w --offset=32M --size=64M --bs=4k --rw=randwrite --iodepth=8 --rate=2m \\
          --verify=crc32c --verify_fatal=1 --do_verify=1 \\
        --name=r $R --verify_only --loops=2 --iodepth=4 > /dev/null 2>&1 && echo "fio verify passed" || { echo "fio FAILED"; grep -i -m5 'verify\\|error\\|err=' /tmp/fio.out; } &
    F=$!
    pid() { node -e 'console.log(JSON.parse(require("fs").readFileSync("/run/ulobdev/uloop0.json","utf8")).pid)'; }
    sleep 20
    echo "before kill: $(q)"
    echo dead > /tmp/phase; kill -9 $(pid)
    k=0; while q | grep -q ' attached=1 ' && [ $k -lt 600 ]; do sleep 0.05; k=$((k+1)); done
    $A > /tmp/reattach.out 2>&1 && echo "re-attached after kill -9" || { echo "re-attach FAILED"; cat /tmp/reattach.out; }
    echo after > /tmp/phase
    wait $F || true
    rm /tmp/go; wait $S || true
    echo "max st_blocks live: $(sed -n 's/^live //p' /tmp/blocks | sort -n | tail -1) dead: $(sed -n 's/^dead //p' /tmp/blocks | sort -n | tail -1) after: $(sed -n 's/^after //p' /tmp/blocks | sort -n | tail -1) samples: $(wc -l < /tmp/blocks)"
    echo "st_blocks over time: $(awk '{printf "%s:%d ", substr($1,1,1), $2*512/1048576}' /tmp/blocks)"
    echo "after fio: $(q)"
    grep -q '"reason":"budget"' $LOG && echo "a budget flush ran"
    $U flush --wait $D > /dev/null && echo "flushed after fio"
    echo "query before status: $(q)"; $U status --json $D > /tmp/status.json; echo "query after status: $(q)"
    node -e 'const s=JSON.parse(require("fs").readFileSync("/tmp/status.json","utf8"));const j=Array.isArray(s)?s[0]:s;console.log("status: budgetBytes="+j.budgetBytes+" usedBytes="+j.usedBytes+" allocatedBytes="+j.allocatedBytes+" cachedBytes="+j.cachedBytes+" evictedBytes="+j.evictedBytes+" dirtyBytes="+j.dirtyBytes+" zeroBytes="+j.zeroBytes)'
    # Clean now: the device must be the disk, block for block (this reads through misses and evictions).
    cmp $D /tmp/disk.img && echo "the device equals the disk after the flush"
    # The readers' region was never written: it is still what was there before attach.
    cmp -n $((96*M)) -i $((96*M)):$((96*M)) $D /tmp/orig.img && echo "the readers' region is unchanged"

    # --- ext4's zeroout: lazy inode-table init at mount sends WRITE_ZEROES
    z0=$(field zero_bytes)
    mkfs.ext4 -q -b 4096 -E lazy_itable_init=1,nodiscard $D && mkdir -p /tmp/m && mount -o init_itable=0 $D /tmp/m
    k=0; while [ $(field zero_bytes) -eq $z0 ] && [ $k -lt 300 ]; do sleep 0.1; k=$((k+1)); done
    head -c 4M /dev/urandom > /tmp/f && cp /tmp/f /tmp/m/f && sync
    sleep 2
    umount /tmp/m
    echo "ext4 zeroout bytes: $(( $(field zero_bytes) - z0 ))"
    fsck.ext4 -fn $D > /tmp/fsck.out 2>&1 && echo "fsck clean" || { echo "fsck FAILED"; head -20 /tmp/fsck.out; }
    echo "st_blocks at the end: $(stat -c %b /tmp/d.cache)"
    $U detach $D > /dev/null && echo detached
    rmmod uloop && echo unloaded
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

  it('fio --verify with readers over 6x the budget, kill -9 and re-attach mid-run: nothing lost, within the budget', () => {
    expect(run.output, run.output).toContain('re-attached after kill -9');
    expect(run.output).toContain('fio verify passed');
    expect(run.output).not.toContain('FAILED');
    expect(run.output).toContain('a budget flush ran');
    const m = /max st_blocks live: (\d+) dead: (\d*)/.exec(run.output);
    const live = Number(m?.[1]) * 512;
    // The kernel writes whole missing blocks without asking the daemon: between two looks (200 ms)
    // and while a budget flush runs they take room the daemon can only give back afterwards. The
    // slack is one eviction batch (1/32 of the budget) plus what the paced writer (2 MiB/s) adds
    // in 2 s. While no daemon runs (kill -9 to re-attach) nothing is evicted: not bounded here,
    // the run prints it.
    // After the re-attach the new daemon first takes over what the kernel wrote meanwhile (a FLUSH),
    // then a budget flush and evictions bring it back: not bounded either; printed.
    const timeline = /st_blocks over time: (.*)/.exec(run.output)?.[1] ?? '';
    expect(live, timeline).toBeGreaterThan(0);
    expect(live, timeline).toBeLessThanOrEqual(BUDGET + BUDGET / 32 + 6 * MiB);
    const st = Object.fromEntries(
      (/^status: (.*)$/m.exec(run.output)?.[1] ?? '').split(' ').map((kv) => [kv.split('=')[0], Number(kv.split('=')[1])]),
    );
    expect(st.budgetBytes).toBe(BUDGET);
    expect(st.evictedBytes).toBeGreaterThan(0);
    expect(st.dirtyBytes).toBe(0);
    expect(st.usedBytes).toBeLessThanOrEqual(BUDGET);
    // status takes the kernel's exact count (nothing ran between the two).
    // (A background eviction may run between the two queries: status lies between them.)
    const q1 = parseQuery(/query before status: (.*)/.exec(run.output)?.[1] ?? '');
    const q2 = parseQuery(/query after status: (.*)/.exec(run.output)?.[1] ?? '');
    expect(st.cachedBytes).toBeGreaterThanOrEqual(Math.min(q1.present!, q2.present!) * 4096);
    expect(st.cachedBytes).toBeLessThanOrEqual(Math.max(q1.present!, q2.present!) * 4096);
    expect(run.output).toContain('the device equals the disk after the flush');
    expect(run.output).toContain("the readers' region is unchanged");
    // With a daemon back after the kill, the budget holds again: after the ext4 part and its flush.
    expect(Number(/st_blocks at the end: (\d+)/.exec(run.output)?.[1]) * 512).toBeLessThanOrEqual(BUDGET + BUDGET / 32 + 6 * MiB);
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
