// The mechanism uloop.ko gives the daemon for hydration, a cache budget, zeroing and real disks,
// driven by the C daemon (test/vm/uloopctl.c):
//  - CLAIM/FILLED hydration never overwrites: blocks the kernel holds written whole but not yet
//    handed over, and blocks written while the hydration runs, keep the user's data; filling the
//    cache file without asking the kernel (the control) overwrites them with old data;
//  - ACCESSED reports exactly the units reads touched, and clears them;
//  - EVICT of blocks that reads keep hitting waits for those reads, then the blocks read from the
//    source again; dirty blocks are not evicted;
//  - DISCARD, WRITE_ZEROES (punch hole) and BLKZEROOUT read back as zeros (whole blocks as ZERO
//    upcalls, the rest written as zeros), and a flush epoch writes the zeros to the backing file;
//  - a disk with 4096-byte sectors and a partition table: /dev/uloopN has 4096-byte logical and
//    physical sectors, ULOOP_F_PARTSCAN shows /dev/uloopNp1 (its own minor), the filesystem on it
//    mounts, REMOVE is refused while it is mounted; without the flag BLKRRPART finds it.
import { beforeAll, describe, expect, it } from 'vitest';
import { expectCleanKernel, prepareVm, runInVm, TCG_STARVATION, type VmResult } from '../support/vm.js';
import { buildTool, queryAfter } from './uloop-tools.js';

let run: VmResult;

const WAITFOR = `waitfor() { i=0; while ! grep -aq "$1" "$2"; do i=$((i+1)); if [ $i -gt \${3:-600} ]; then echo "timeout waiting for '$1' in $2"; tail -5 "$2"; return 1; fi; sleep 0.1; done; }
# ask FIFO LOG PATTERN COMMAND...: sends a command to the daemon, waits for one more line matching
# PATTERN in its log and prints that line
ask() { f=$1; l=$2; p=$3; shift 3; n=$(grep -ac "$p" $l || true); echo "$*" > $f; i=0
  while [ $(grep -ac "$p" $l || true) -le $n ]; do i=$((i+1)); if [ $i -gt 600 ]; then echo "timeout waiting for '$p' in $l"; return 1; fi; sleep 0.1; done
  grep -a "$p" $l | tail -1; }
# stuck: prints the kernel stacks of tasks in D state
stuck() { for t in /proc/[0-9]*; do [ "$(cut -d' ' -f3 $t/stat 2>/dev/null)" = D ] && { echo "== D: $(cat $t/comm)"; cat $t/stack; }; done; true; }`;
// An MBR for a disk of 4096-byte sectors: partition 1 (Linux) from 1 MiB to the end of 32 MiB.
const MBR = `import struct,sys
e = struct.pack('<B3sB3sII', 0, b'\\0\\0\\0', 0x83, b'\\0\\0\\0', 256, 8192 - 256)
mbr = bytearray(512); mbr[446:462] = e; mbr[510:512] = b'\\x55\\xaa'
f = open(sys.argv[1], 'r+b'); f.write(mbr); f.close()`;

beforeAll(async () => {
  const vm = prepareVm();
  const writer = buildTool('uloop-writer');
  run = await runInVm(`
    CTL=${vm.ULOOPCTL}; W=${writer}
    ${WAITFOR}
    modprobe -q crc32c_generic || true # ext4 needs it on 6.12; Debian's 7.x has no such module
    modprobe ext4; modprobe loop
    insmod ${vm.ULOOP_KO}
    echo "features: $($CTL features)"
    head -c 16M /dev/urandom > /tmp/src
    same() { dd if=$1 bs=65536 skip=$3 count=$4 iflag=direct status=none | cmp -s - /tmp/part.$$ ; }
    range_is_src() { dd if=/tmp/src of=/tmp/part.$$ bs=65536 skip=$2 count=$3 status=none; same $1 x $2 $3; }

    # ---- hydration: CLAIM / FILLED
    truncate -s 16M /tmp/h.cache
    H=$($CTL add /tmp/h.cache 16777216 65536 wb none)
    mkfifo /tmp/fh
    cp /tmp/src /tmp/h.back # the flush epoch below writes here, not into the source the others share
    $CTL serve $H /tmp/src /tmp/h.cache --backing /tmp/h.back --ctl /tmp/fh --flush-delay-ms 20 > /tmp/sh.log & PIDS="$PIDS $!"
    waitfor attached /tmp/sh.log
    $W write /dev/uloop$H 65536 10 10 1 7                      # blocks 10..19 pending in the kernel
    $W write /dev/uloop$H 65536 100 40 2 8 0 20000 & WP=$!     # written while the hydration runs
    ask /tmp/fh /tmp/sh.log "^hydrated" hydrate 0 256
    wait $WP
    $W expect /dev/uloop$H 65536 10 10 7 >/dev/null && echo "hydrate: pending blocks kept"
    $W expect /dev/uloop$H 65536 100 40 8 >/dev/null && echo "hydrate: blocks written meanwhile kept"
    range_is_src /dev/uloop$H 0 10 && range_is_src /dev/uloop$H 20 80 && range_is_src /dev/uloop$H 140 116 && echo "hydrate: the rest is the source"
    echo "qh: $($CTL query $H)"
    # a flush epoch over the kernel's snapshot, which holds blocks 10..19 written whole and not yet
    # handed over by a barrier: COMMIT leaves them dirty (the store has not recorded them), so
    # EVICT leaves them alone and their data stays
    ask /tmp/fh /tmp/sh.log "^committed" flush > /dev/null
    ask /tmp/fh /tmp/sh.log "^evicted" evict 10 10 | sed 's/^/pending: /'
    $W expect /dev/uloop$H 65536 10 10 7 >/dev/null && echo "pending: data kept"
    echo "qh2: $($CTL query $H)"
    # the control: filling the cache file without CLAIM
    truncate -s 16M /tmp/h2.cache
    H2=$($CTL add /tmp/h2.cache 16777216 65536 wb none)
    mkfifo /tmp/fh2
    $CTL serve $H2 /tmp/src /tmp/h2.cache --ctl /tmp/fh2 > /tmp/sh2.log & PIDS="$PIDS $!"
    waitfor attached /tmp/sh2.log
    $W write /dev/uloop$H2 65536 10 10 1 7
    ask /tmp/fh2 /tmp/sh2.log "^hydrated blindly" hydrate-blind 0 256 > /dev/null
    $W expect /dev/uloop$H2 65536 10 10 7 >/dev/null || echo "blind hydration: pending blocks overwritten"

    # ---- accessed bits and eviction
    cp /tmp/src /tmp/e.cache
    E=$($CTL add /tmp/e.cache 16777216 65536 wb all --flags accessed --unit-shift 2)
    mkfifo /tmp/fe
    $CTL serve $E /tmp/src /tmp/e.cache --ctl /tmp/fe > /tmp/se.log & PIDS="$PIDS $!"
    waitfor attached /tmp/se.log
    ask /tmp/fe /tmp/se.log "^accessed" accessed 0 64 > /dev/null
    dd if=/dev/uloop$E of=/dev/null bs=64k count=4 iflag=direct status=none
    dd if=/dev/uloop$E of=/dev/null bs=64k skip=40 count=8 iflag=direct status=none
    ask /tmp/fe /tmp/se.log "^accessed" accessed 0 64
    ask /tmp/fe /tmp/se.log "^accessed" accessed 0 64 | sed 's/^/again: /'
    ( while [ ! -f /tmp/stopr ]; do dd if=/dev/uloop$E of=/dev/null bs=64k count=16 iflag=direct status=none || echo "evict: a read failed"; done ) & RP=$!
    sleep 1
    ask /tmp/fe /tmp/se.log "^evicted" evict 0 16
    touch /tmp/stopr; wait $RP
    range_is_src /dev/uloop$E 0 16 && echo "evict: evicted blocks read from the source again"
    head -c 4096 /dev/urandom | dd of=/dev/uloop$E bs=4k seek=1600 oflag=direct conv=notrunc status=none  # block 100 dirty
    ask /tmp/fe /tmp/se.log "^evicted" evict 96 8
    echo "qe: $($CTL query $E)"
    echo "512-byte default: $(blockdev --getss /dev/uloop$E)"

    # ---- zeroing: DISCARD, WRITE_ZEROES, BLKZEROOUT
    cp /tmp/src /tmp/z.cache && cp /tmp/src /tmp/zb
    Z=$($CTL add /tmp/z.cache 16777216 65536 wb all --flags zero)
    mkfifo /tmp/fz
    $CTL serve $Z /tmp/zb /tmp/z.cache --ctl /tmp/fz > /tmp/sz.log & PIDS="$PIDS $!"
    waitfor attached /tmp/sz.log
    cp /tmp/src /tmp/zexp
    blkdiscard -o 1048576 -l 1048576 /dev/uloop$Z && echo "zero: discard ok"
    dd if=/dev/zero of=/tmp/zexp bs=1M seek=1 count=1 conv=notrunc status=none
    echo "qz1: $($CTL query $Z)"
    # a partial write to a zero block: its MISS makes the block present, which the store learns only
    # from the next FLUSH's barrier (the write needs no INTENT: the block is dirty already)
    head -c 4096 /dev/urandom > /tmp/zw
    dd if=/tmp/zw of=/dev/uloop$Z bs=4096 seek=256 oflag=direct conv=notrunc status=none
    dd if=/tmp/zw of=/tmp/zexp bs=4096 seek=256 conv=notrunc status=none
    echo "qzp: $($CTL query $Z)"
    sync /dev/uloop$Z && waitfor "^barrier present=" /tmp/sz.log 50 && grep -a "^barrier present=" /tmp/sz.log | tail -1 | sed 's/^/zero miss: /'
    fallocate --punch-hole --offset $((4194304 + 4096)) --length 262144 /dev/uloop$Z && echo "zero: punch hole ok"
    dd if=/dev/zero of=/tmp/zexp bs=4096 seek=1025 count=64 conv=notrunc status=none
    blkdiscard -z -o $((200 * 65536)) -l 262144 /dev/uloop$Z && echo "zero: zeroout ok"
    dd if=/dev/zero of=/tmp/zexp bs=65536 seek=200 count=4 conv=notrunc status=none
    grep -a "^zero" /tmp/sz.log
    timeout -s KILL 60 cmp /tmp/zexp /dev/uloop$Z && echo "zero: the device reads zeros there and the rest unchanged" || { echo "zero: cmp failed"; stuck; tail -5 /tmp/sz.log; }
    echo "qz2: $($CTL query $Z)"
    # the reads above MISSed the zero blocks in: pending until a barrier records them, and COMMIT
    # leaves pending blocks dirty; a FLUSH first
    sync /dev/uloop$Z
    ask /tmp/fz /tmp/sz.log "^committed" flush
    cmp /tmp/zexp /tmp/zb && echo "zero: a flush wrote the zeros to the backing file"
    echo "qz3: $($CTL query $Z)"
    cmp /tmp/zexp /dev/uloop$Z && echo "zero: still zeros once clean"

    # ---- 4096-byte sectors and partitions
    truncate -s 32M /tmp/p.img
    python3 -c "${MBR}" /tmp/p.img
    L=$(losetup -b 4096 -P -f --show /tmp/p.img)
    mkfs.ext4 -q -b 4096 \${L}p1 && mkdir -p /tmp/pm && mount \${L}p1 /tmp/pm && echo hello > /tmp/pm/file && umount /tmp/pm && losetup -d $L
    cp /tmp/p.img /tmp/p.cache
    P=$($CTL add /tmp/p.cache 33554432 65536 wb all --lbs 4096 --flags partscan)
    $CTL serve $P /tmp/p.img /tmp/p.cache > /tmp/sp.log & PIDS="$PIDS $!"
    i=0; while [ ! -b /dev/uloop\${P}p1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    [ -b /dev/uloop\${P}p1 ] && echo "partitions: /dev/uloop\${P}p1 appeared"
    echo "sectors: $(blockdev --getss /dev/uloop$P) $(blockdev --getpbsz /dev/uloop$P)"
    echo "minor: $(stat -c %T /dev/uloop\${P}p1) of $(stat -c %T /dev/uloop$P)"
    mount /dev/uloop\${P}p1 /tmp/pm && cat /tmp/pm/file
    $CTL remove $P 2>/dev/null || echo "partitions: remove refused while mounted"
    umount /tmp/pm
    Q=$($CTL add /tmp/p.cache 33554432 65536 ro all --lbs 4096)
    sleep 1; [ -b /dev/uloop\${Q}p1 ] || echo "partitions: none without PARTSCAN"
    blockdev --rereadpt /dev/uloop$Q && [ -b /dev/uloop\${Q}p1 ] && echo "partitions: found by BLKRRPART"
    echo "qp: $($CTL query $P)"

    # (last, so the device numbers above stay as the partition checks expect)
    # a read that needed a MISS is not a use (GCLOCK's probation); the same read again, a hit, is
    truncate -s 16M /tmp/m.cache
    M=$($CTL add /tmp/m.cache 16777216 65536 wb none --flags accessed --unit-shift 2)
    mkfifo /tmp/fm
    $CTL serve $M /tmp/src /tmp/m.cache --ctl /tmp/fm > /tmp/sm.log & PIDS="$PIDS $!"
    waitfor attached /tmp/sm.log
    ask /tmp/fm /tmp/sm.log "^accessed" accessed 0 64 > /dev/null
    dd if=/dev/uloop$M of=/dev/null bs=64k skip=20 count=1 iflag=direct status=none
    ask /tmp/fm /tmp/sm.log "^accessed" accessed 0 64 | sed 's/^/after a miss: /'
    dd if=/dev/uloop$M of=/dev/null bs=64k skip=20 count=1 iflag=direct status=none
    ask /tmp/fm /tmp/sm.log "^accessed" accessed 0 64 | sed 's/^/after a hit: /'

    kill $PIDS; wait $PIDS 2>/dev/null || true
    for d in $H $H2 $E $M $Z $P $Q; do $CTL remove $d || echo "remove $d failed"; done
    rmmod uloop && echo unloaded
  `, { timeoutMs: 420_000, memoryMb: 1536, allowSplats: TCG_STARVATION });
}, 600_000);

describe('uloop.ko mechanism for hydration, budgets, zeroing and real disks', () => {
  it('hydrates with CLAIM/FILLED without overwriting newer data', () => {
    expect(run.output).toMatch(/^hydrated claimed=2\d\d filled=2\d\d$/m);
    expect(run.output).toContain('hydrate: pending blocks kept');
    expect(run.output).toContain('hydrate: blocks written meanwhile kept');
    expect(run.output).toContain('hydrate: the rest is the source');
    const qh = queryAfter(run.output, 'qh');
    expect(qh.present).toBe(256);
    expect(qh.claimed).toBe(0);
    expect(run.output).toContain('blind hydration: pending blocks overwritten');
  });
  it('never clears or evicts blocks the store has not recorded yet (pending)', () => {
    // watched fail without: COMMIT cleared them and EVICT took all 10
    expect(run.output).toMatch(/^pending: evicted 0$/m);
    expect(run.output).toContain('pending: data kept');
    expect(queryAfter(run.output, 'qh2').pending).toBeGreaterThanOrEqual(10);
  });
  it('reports and clears accessed units', () => {
    expect(run.output).toMatch(/^accessed 3: 0 10 11$/m);
    expect(run.output).toMatch(/^again: accessed 0:$/m);
    // A read that needed a MISS leaves its unit's bit clear; the same read as a hit sets it (block 20: unit 5).
    expect(run.output).toMatch(/^after a miss: accessed 0:$/m);
    expect(run.output).toMatch(/^after a hit: accessed 1: 5$/m);
  });
  it('evicts clean blocks under reads, never dirty ones', () => {
    expect(run.output).not.toContain('evict: a read failed');
    expect(run.output).toMatch(/^evicted 16$/m);
    expect(run.output).toContain('evict: evicted blocks read from the source again');
    expect(run.output).toMatch(/^evicted 7$/m);
    expect(run.output).toContain('512-byte default: 512');
  });
  it('reads DISCARD, WRITE_ZEROES and BLKZEROOUT back as zeros and flushes them', () => {
    expect(run.output).toContain('zero: discard ok');
    const qz1 = queryAfter(run.output, 'qz1');
    expect(qz1.zero).toBe(16);
    expect(qz1.present).toBe(240);
    expect(run.output).toMatch(/^zero 1048576\+1048576 discard$/m);
    // a zero block filled by a MISS is pending until a barrier records it present (watched fail
    // without: pending=0, no barrier, the store kept it as zeros under flushed data)
    expect(queryAfter(run.output, 'qzp').pending).toBe(1);
    expect(run.output).toContain('zero miss: barrier present=1 dirty=1');
    expect(run.output).toMatch(/^zero 4259840\+196608$/m); // the whole blocks of the punched range
    expect(run.output).toMatch(/^zero 13107200\+262144 nounmap$/m);
    expect(run.output).toContain('zero: the device reads zeros there and the rest unchanged');
    expect(run.output).toContain('zero: a flush wrote the zeros to the backing file');
    expect(queryAfter(run.output, 'qz3').dirty).toBe(0);
    expect(run.output).toContain('zero: still zeros once clean');
  });
  it('presents 4096-byte sectors and partitions', () => {
    expect(run.output).toContain('partitions: /dev/uloop4p1 appeared');
    expect(run.output).toContain('sectors: 4096 4096');
    expect(run.output).toMatch(/^minor: 41 of 40$/m); // hex: minors 65 and 64 (16 per device)
    expect(run.output).toMatch(/^hello$/m);
    expect(run.output).toContain('partitions: remove refused while mounted');
    expect(run.output).toContain('partitions: none without PARTSCAN');
    expect(run.output).toContain('partitions: found by BLKRRPART');
    expect(queryAfter(run.output, 'qp').lbs).toBe(4096);
    expect(run.output).not.toMatch(/remove \d+ failed/);
    expect(run.output).toContain('unloaded');
    expect(run.code).toBe(0);
    expectCleanKernel(run);
  });
});
