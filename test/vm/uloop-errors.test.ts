// uloop.ko when things fail, with the C daemon (test/vm/uloopctl.c):
//  - a miss the daemon answers with an error fails that request at once, and only that one;
//  - a daemon that never answers: each request waiting for it fails with EIO after io_timeout_s
//    (a read, a read queued behind it on the same block, a FLUSH whose barrier is held); its late
//    answer is accepted and counted, a second one refused; with the timeout off (0) the request
//    is still waiting, which is what the timeout is for;
//  - the cache file's filesystem on dm-flakey failing writes: the FLUSH whose sync fails returns
//    EIO, and so do every later write and FLUSH (a second sync would report success over the lost
//    pages); reads go on; QUERY shows the error; once the disk works again, CLEAR_ERROR drops the
//    blocks whose data may be gone (they read from the source again), writes and FLUSH work, and
//    what was flushed before the fault is intact;
//  - more than 256 timed-out misses all keep their blocks until their late answers; a late ZERO
//    success takes effect, and a ZERO its daemon left unanswered goes to the next daemon.
import { beforeAll, describe, expect, it } from 'vitest';
import { expectCleanKernel, prepareVm, runInVm, TCG_STARVATION, type VmResult } from '../support/vm.js';
import { queryAfter } from './uloop-tools.js';

let run: VmResult;

const WAITFOR = `waitfor() { i=0; while ! grep -q "$1" "$2"; do i=$((i+1)); if [ $i -gt \${3:-300} ]; then echo "timeout waiting for '$1' in $2"; cat "$2"; return 1; fi; sleep 0.1; done; }`;

beforeAll(async () => {
  const vm = prepareVm();
  run = await runInVm(`
    CTL=${vm.ULOOPCTL}
    ${WAITFOR}
    modprobe -q crc32c_generic || true # ext4 needs it on 6.12; Debian's 7.x has no such module
    modprobe ext4; modprobe loop; modprobe dm-flakey
    insmod ${vm.ULOOP_KO} io_timeout_s=3 reattach_timeout_s=60
    head -c 16M /dev/urandom > /tmp/src

    # ---- a failed miss: EIO for that request only; the daemon keeps serving
    truncate -s 16M /tmp/c1
    N=$($CTL add /tmp/c1 16777216 65536 wb none)
    $CTL serve $N /tmp/src /tmp/c1 --fail-miss-from 8388608 > /tmp/s1.log & S1=$!
    T0=$(date +%s)
    if dd if=/dev/uloop$N of=/dev/null bs=64k skip=200 count=1 iflag=direct status=none 2>/dev/null; then echo "failed miss: read succeeded"; else echo "failed miss: EIO after $(( $(date +%s) - T0 )) s"; fi
    dd if=/dev/uloop$N of=/tmp/r1 bs=64k count=4 iflag=direct status=none && head -c 262144 /tmp/src | cmp - /tmp/r1 && echo "failed miss: other reads served"
    kill -0 $S1 && echo "failed miss: daemon alive"
    echo "q1: $($CTL query $N)"

    # ---- a daemon that never answers misses or barriers
    truncate -s 16M /tmp/c2
    M=$($CTL add /tmp/c2 16777216 65536 wb none)
    mkfifo /tmp/f2
    $CTL serve $M /tmp/src /tmp/c2 --hold miss --ctl /tmp/f2 > /tmp/s2.log & S2=$!
    waitfor attached /tmp/s2.log
    T0=$(date +%s)
    ( dd if=/dev/uloop$M of=/dev/null bs=4k skip=1 count=1 iflag=direct status=none 2>/dev/null && echo "timeout: second read succeeded" || echo "timeout: second read EIO after $(( $(date +%s) - T0 )) s" ) > /tmp/second.log & SECOND=$!
    if dd if=/dev/uloop$M of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null; then echo "timeout: read succeeded"; else echo "timeout: read EIO after $(( $(date +%s) - T0 )) s"; fi
    wait $SECOND; cat /tmp/second.log
    ID=$(grep -m1 '^holding miss' /tmp/s2.log | cut -d' ' -f3)
    # the daemon still holds that miss and fills it late: a whole-block write to its block meanwhile
    # must wait for the fill, not be overwritten by it with the source's older data
    head -c 65536 /dev/urandom > /tmp/w0
    ( dd if=/tmp/w0 of=/dev/uloop$M bs=64k count=1 oflag=direct conv=notrunc status=none 2>/dev/null && echo "late fill: write done" || echo "late fill: write EIO" ) > /tmp/late.log & LATE=$!
    sleep 1
    echo answer-held 0 > /tmp/f2; waitfor "answered held $ID" /tmp/s2.log
    grep "^answered held $ID" /tmp/s2.log
    wait $LATE; cat /tmp/late.log
    dd if=/dev/uloop$M of=/tmp/r0 bs=64k count=1 iflag=direct status=none
    if cmp -s /tmp/w0 /tmp/r0; then echo "late fill: the write survives it"; else echo "late fill: the write was overwritten"; fi
    echo "reply $ID 0" > /tmp/f2; waitfor "^reply $ID" /tmp/s2.log
    grep "^reply $ID" /tmp/s2.log
    echo "q2: $($CTL query $M)"
    kill $S2; wait $S2 2>/dev/null || true
    # a held barrier: whole-block writes to missing blocks, then a FLUSH
    $CTL serve $M /tmp/src /tmp/c2 --hold barrier > /tmp/s3.log & S3=$!
    waitfor attached /tmp/s3.log
    # iflag=fullblock: a short read from the pipe makes dd drop O_DIRECT and fsync at the end,
    # which the held barrier fails (block 0 of the late fill is pending too)
    head -c 131072 /dev/urandom | dd of=/dev/uloop$M bs=64k seek=10 iflag=fullblock oflag=direct conv=notrunc status=none
    T0=$(date +%s)
    if sync /dev/uloop$M 2>/dev/null; then echo "timeout: flush succeeded"; else echo "timeout: flush EIO after $(( $(date +%s) - T0 )) s"; fi
    kill $S3; wait $S3 2>/dev/null || true
    # the timeout off: the request is still waiting after 8 s
    echo 0 > /sys/module/uloop/parameters/io_timeout_s
    truncate -s 16M /tmp/c3
    K=$($CTL add /tmp/c3 16777216 65536 wb none)
    mkfifo /tmp/f3
    $CTL serve $K /tmp/src /tmp/c3 --hold miss --ctl /tmp/f3 > /tmp/s4.log & S4=$!
    waitfor attached /tmp/s4.log
    dd if=/dev/uloop$K of=/dev/null bs=4k count=1 iflag=direct status=none 2>/dev/null & DD=$!
    sleep 8
    kill -0 $DD 2>/dev/null && echo "no timeout: still waiting after 8 s"
    echo answer-held 0 > /tmp/f3; waitfor "answered held" /tmp/s4.log
    wait $DD && echo "no timeout: served once answered"
    kill $S4; wait $S4 2>/dev/null || true
    echo 3 > /sys/module/uloop/parameters/io_timeout_s
    # 300 misses time out held at once, more than the 256 timed-out ids the module remembers: each
    # keeps its blocks busy until its late answer (a bound let the oldest ones' blocks go while
    # their fills could still run, and refused their late answers)
    truncate -s 16M /tmp/c7
    H=$($CTL add /tmp/c7 16777216 4096 wb none)
    mkfifo /tmp/f7
    $CTL serve $H /tmp/src /tmp/c7 --hold miss --ctl /tmp/f7 > /tmp/s7.log & S7=$!
    waitfor attached /tmp/s7.log
    # one fio, 128 reads in flight, of every other block (no two merge into one request)
    fio --name=holds --filename=/dev/uloop$H --rw=read:4k --bs=4k --direct=1 --ioengine=libaio \
      --iodepth=128 --number_ios=300 --size=2400k --continue_on_error=all --output=/tmp/fio7.log >/dev/null 2>&1
    HELD=$(grep -c '^holding miss' /tmp/s7.log)
    [ $HELD -gt 256 ] && echo "many holds: more than 256 held"
    echo answer-held 0 > /tmp/f7
    i=0; while [ $(grep -c '^answered held' /tmp/s7.log) -lt $HELD ] && [ $i -lt 600 ]; do i=$((i+1)); sleep 0.1; done
    echo "many holds: $(( HELD - $(grep -c '^answered held [0-9]*: ok$' /tmp/s7.log) )) of $HELD late answers not accepted"
    echo "held: $HELD"
    echo "q7: $($CTL query $H)"
    kill $S7; wait $S7 2>/dev/null || true
    # a ZERO that timed out held: its late success takes effect (the block becomes zero: dirty, not
    # present); one still unanswered when its daemon goes is sent again to the next daemon
    cp /tmp/src /tmp/c8
    Z=$($CTL add /tmp/c8 16777216 65536 wb all --flags zero)
    mkfifo /tmp/f8
    $CTL serve $Z /tmp/src /tmp/c8 --hold zero --ctl /tmp/f8 > /tmp/s8.log & S8=$!
    waitfor attached /tmp/s8.log
    blkdiscard -o 65536 -l 65536 /dev/uloop$Z 2>/dev/null && echo "late zero: discard succeeded" || echo "late zero: discard EIO"
    echo answer-held 0 > /tmp/f8; waitfor "answered held" /tmp/s8.log
    echo "q8: $($CTL query $Z)"
    blkdiscard -o 131072 -l 65536 /dev/uloop$Z 2>/dev/null || echo "re-issued zero: discard EIO"
    kill $S8; wait $S8 2>/dev/null || true
    $CTL serve $Z /tmp/src /tmp/c8 > /tmp/s9.log & S9=$!
    waitfor "^zero 131072+65536" /tmp/s9.log
    grep -a "^zero" /tmp/s9.log | sed 's/^/re-issued: /'
    # the daemon logs the ZERO before it answers: wait for the answer; then block 2 is a zero block
    # (this daemon recorded it: its MISS fills zeros); left present, it would read the source
    i=0; while ! $CTL query $Z | grep -q ' waiting=0 ' && [ $i -lt 100 ]; do i=$((i+1)); sleep 0.1; done
    head -c 65536 /dev/zero > /tmp/z64
    dd if=/dev/uloop$Z bs=64k skip=2 count=1 iflag=direct status=none | cmp -s - /tmp/z64 && echo "re-issued: block 2 reads zeros"
    echo "q9: $($CTL query $Z)"
    kill $S9; wait $S9 2>/dev/null || true

    # ---- the cache file's disk fails writes: the sticky error
    truncate -s 64M /tmp/fs.img
    L=$(losetup -f --show /tmp/fs.img)
    dmsetup create --noudevsync flk --table "0 131072 linear $L 0" && dmsetup mknodes flk
    mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/flk
    # lazytime: the writes' timestamps stay in memory, so the fault hits data writeback only and
    # ext4's journal (which would abort the filesystem) is not written during it
    mkdir -p /tmp/cf && mount -o noatime,lazytime /dev/mapper/flk /tmp/cf
    dd if=/dev/zero of=/tmp/cf/cache bs=1M count=16 status=none && sync
    E=$($CTL add /tmp/cf/cache 16777216 65536 wb none)
    mkfifo /tmp/f5
    $CTL serve $E /tmp/src /tmp/cf/cache --ctl /tmp/f5 > /tmp/s5.log & S5=$!
    waitfor attached /tmp/s5.log
    head -c 262144 /dev/urandom > /tmp/w1
    dd if=/tmp/w1 of=/dev/uloop$E bs=64k seek=16 oflag=direct conv=notrunc,fsync status=none && echo "sticky: first flush ok"
    dmsetup suspend --nolockfs --noflush flk
    dmsetup reload flk --table "0 131072 flakey $L 0 0 3600 1 error_writes"
    dmsetup resume flk
    head -c 262144 /dev/urandom > /tmp/w2
    dd if=/tmp/w2 of=/dev/uloop$E bs=64k seek=32 oflag=direct conv=notrunc status=none && echo "sticky: writes before the failing flush ok"
    if sync /dev/uloop$E 2>/dev/null; then echo "sticky: failing flush succeeded"; else echo "sticky: failing flush EIO"; fi
    if sync /dev/uloop$E 2>/dev/null; then echo "sticky: second flush succeeded"; else echo "sticky: second flush EIO"; fi
    if dd if=/tmp/w1 of=/dev/uloop$E bs=64k seek=16 count=1 oflag=direct conv=notrunc status=none 2>/dev/null; then echo "sticky: write succeeded"; else echo "sticky: write EIO"; fi
    dd if=/dev/uloop$E of=/tmp/r5 bs=64k skip=16 count=4 iflag=direct status=none && cmp /tmp/w1 /tmp/r5 && echo "sticky: reads served"
    echo "q5: $($CTL query $E)"
    dmsetup suspend --nolockfs --noflush flk
    dmsetup reload flk --table "0 131072 linear $L 0"
    dmsetup resume flk
    # the disk works again, but the pages of the failed sync are gone: a sync would succeed now
    if sync /dev/uloop$E 2>/dev/null; then echo "sticky: flush after recovery, before the clear, succeeded"; else echo "sticky: flush after recovery, before the clear, EIO"; fi
    echo clear-error > /tmp/f5; waitfor "^cleared" /tmp/s5.log
    grep "^cleared" /tmp/s5.log
    echo "q6: $($CTL query $E)"
    head -c 65536 /dev/urandom > /tmp/w3
    dd if=/tmp/w3 of=/dev/uloop$E bs=64k seek=48 oflag=direct conv=notrunc,fsync status=none && echo "sticky: write and flush after the clear ok"
    dd if=/dev/uloop$E of=/tmp/r6 bs=64k skip=32 count=4 iflag=direct status=none
    dd if=/tmp/src of=/tmp/e6 bs=64k skip=32 count=4 status=none
    cmp /tmp/e6 /tmp/r6 && echo "sticky: dropped blocks read from the source"
    dd if=/dev/uloop$E of=/tmp/r7 bs=64k skip=16 count=4 iflag=direct status=none && cmp /tmp/w1 /tmp/r7 && echo "sticky: blocks flushed before the fault intact"
    kill -0 $S5 && echo "sticky: daemon alive"
    kill $S5 $S1; wait $S5 $S1 2>/dev/null || true
    for d in $N $M $K $H $Z $E; do $CTL remove $d; done
    umount /tmp/cf && dmsetup remove flk && losetup -d $L
    rmmod uloop && echo unloaded
  `, { timeoutMs: 450_000, allowSplats: TCG_STARVATION });
}, 600_000);

describe('uloop.ko when the daemon or the cache file fails', () => {
  it('fails a request whose miss failed, at once, and serves the others', () => {
    expect(run.output).toMatch(/failed miss: EIO after [0-2] s/);
    expect(run.output).toContain('failed miss: other reads served');
    expect(run.output).toContain('failed miss: daemon alive');
  });
  it('fails requests the daemon never answers after io_timeout_s, and accepts its late answer', () => {
    expect(run.output).toMatch(/timeout: read EIO after [3-6] s/);
    expect(run.output).toMatch(/timeout: second read EIO after [3-9] s/);
    expect(run.output).toMatch(/^answered held \d+: ok$/m);
    expect(run.output).toMatch(/^reply \d+: No such file or directory$/m);
    // a timed-out miss keeps its blocks busy until its late fill is answered (else the write
    // below lands first and the fill overwrites it: watched)
    expect(run.output).toContain('late fill: write done');
    expect(run.output).toContain('late fill: the write survives it');
    const q2 = queryAfter(run.output, 'q2');
    expect(q2.timeouts).toBeGreaterThanOrEqual(2);
    expect(q2.late_replies).toBeGreaterThanOrEqual(1);
    // 3 s and the timer's granularity; a guest starved by a loaded host has taken 7 s
    expect(run.output).toMatch(/timeout: flush EIO after [3-9] s/);
    expect(run.dmesg).toMatch(/uloop1: a request at sector \d+ waited more than 3s for the daemon: EIO/);
  });
  it('keeps every timed-out miss holding its blocks until its late answer, however many', () => {
    // watched fail with the 256-entry ring of holds: the oldest holds' late answers refused
    expect(run.output).toContain('many holds: more than 256 held');
    expect(run.output).toMatch(/^many holds: 0 of \d+ late answers not accepted$/m);
    const held = Number(/^held: (\d+)$/m.exec(run.output)?.[1]);
    expect(queryAfter(run.output, 'q7').late_replies).toBe(held);
  });
  it('applies a timed-out ZERO answered late, and sends one its daemon left unanswered to the next', () => {
    // watched fail without: zero=0 present=256 after the late success, and no ZERO re-sent
    expect(run.output).toContain('late zero: discard EIO');
    const q8 = queryAfter(run.output, 'q8');
    expect(q8.zero).toBe(1);
    expect(q8.present).toBe(255);
    expect(q8.late_replies).toBe(1);
    expect(run.output).toContain('re-issued zero: discard EIO');
    expect(run.output).toMatch(/^re-issued: zero 131072\+65536 discard$/m);
    // (not q9.zero: a probe of the device start, 34 read hits seen, may MISS block 1 back in from
    // this daemon, which does not know it as zero)
    expect(run.output).toContain('re-issued: block 2 reads zeros');
  });
  it('keeps waiting without a timeout (the behaviour the timeout replaces)', () => {
    expect(run.output).toContain('no timeout: still waiting after 8 s');
    expect(run.output).toContain('no timeout: served once answered');
  });
  it('makes a failed sync of the cache file sticky until the daemon clears it', () => {
    expect(run.output).toContain('sticky: first flush ok');
    expect(run.output).toContain('sticky: writes before the failing flush ok');
    expect(run.output).toContain('sticky: failing flush EIO');
    expect(run.output).toContain('sticky: second flush EIO');
    expect(run.output).toContain('sticky: write EIO');
    expect(run.output).toContain('sticky: flush after recovery, before the clear, EIO');
    expect(run.output).toContain('sticky: reads served');
    const q5 = queryAfter(run.output, 'q5');
    expect(q5.error).toBe(-5);
    expect(run.output).toMatch(/^cleared error=-5 dropped=4 bits=4$/m);
    const q6 = queryAfter(run.output, 'q6');
    expect(q6.error).toBe(0);
    expect(run.output).toContain('sticky: write and flush after the clear ok');
    expect(run.output).toContain('sticky: dropped blocks read from the source');
    expect(run.output).toContain('sticky: blocks flushed before the fault intact');
    expect(run.output).toContain('sticky: daemon alive');
    expect(run.dmesg).toMatch(/sync of the cache file failed \(-5\): writes and FLUSH fail with EIO/);
    expect(run.output).toContain('unloaded');
    expect(run.code).toBe(0);
    expectCleanKernel(run);
  });
});
