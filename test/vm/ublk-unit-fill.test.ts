// The unit fill on /dev/ublkbN (issue 12, power; src/bdev/unit-fill.ts over the ublk server's
// CLAIM/FILLED, native/ublk.cc), in one guest boot, with --cache-size 16M (eviction unit 256 KiB:
// 64 blocks of 4 KiB) over a 64 MiB disk of random bytes, the fill on by default:
//  - a 4 KiB read miss with the disk idle makes its whole unit present in the server (status
//    ublk.presentBlocks, unitFills/unitFillBlocks), equal to the disk, and the rest of the unit
//    then reads as hits (readMisses does not move);
//  - a whole-block write of a neighbouring block that lands before the fill's CLAIM (the fill held
//    at the pause point ublk:unit-claim) keeps its bytes: the server never claims it;
//  - a write of a claimed neighbouring block (the fill held at ublk:unit-write, after CLAIM, before
//    the cache file is written) waits for the fill, then lands: its bytes stay;
//  - kill -9 of the daemon with a fill held after its CLAIM and a write parked on a claimed block,
//    then the same command: the device is taken back and carries on; the parked write lands (or,
//    not acknowledged, fails as a whole), and the device equals the disk with the acknowledged
//    writes; flush: the disk equals it too.
// The planted bugs these caught are named in the commit that added the file.
import { beforeAll, describe, expect, it } from 'vitest';
import { expectCleanKernel, ROOT, runInVm, type VmResult } from '../support/vm.js';
import { statusShell } from './uloop-tools.js';

let run: VmResult;

beforeAll(async () => {
  run = await runInVm(
    `
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; D=/dev/ublkb0; K=4096; LOG=/run/ulobdev/ublkb0.log
    head -c 64M /dev/urandom > /tmp/disk.img
    cp /tmp/disk.img /tmp/orig.img
    cp /tmp/disk.img /tmp/want.img
    : > /tmp/pause
    B="$U -c /tmp/c.cache -b /tmp/c.bitmap --writeback --cache-size 16M --daemon $D /tmp/disk.img"
    ULOBDEV_PAUSE_FILE=/tmp/pause $B > /dev/null || echo "attach FAILED"
    # st: status's ublk counts; field NAME: one of them; waitfor NAME VALUE: until NAME is at least
    # VALUE (20 s at most). Read over the control socket by ulobctl and jq (statusShell in
    # uloop-tools.ts): no Node start, which costs seconds of guest time under TCG.
    ${statusShell()}
    st() { sj ublkb0 '.ublk | "presentBlocks=\\(.presentBlocks) readMisses=\\(.readMisses) readHits=\\(.readHits) unitFills=\\(.unitFills) unitFillBlocks=\\(.unitFillBlocks) unitFillsSkipped=\\(.unitFillsSkipped) claimedBlocks=\\(.claimedBlocks)"'; }
    field() { sj ublkb0 ".ublk.$1"; }
    waitfor() { end=$(( $(date +%s) + 20 )); while [ "$(field $1)" -lt $2 ] && [ $(date +%s) -lt $end ]; do sleep 0.1; done; }
    # blk N FILE: block N of the device (direct) equals block N of FILE
    blk() { dd if=$D of=/tmp/a bs=$K skip=$1 count=1 iflag=direct status=none; dd if=$2 of=/tmp/b bs=$K skip=$1 count=1 status=none; cmp -s /tmp/a /tmp/b; }
    # put N FILE: the block in FILE goes into want.img at block N
    put() { dd if=$2 of=/tmp/want.img bs=$K seek=$1 count=1 conv=notrunc status=none; }
    pid() { grep -o '"pid": *[0-9]*' /run/ulobdev/ublkb0.json | grep -o '[0-9]*$'; }
    waitgone() { k=0; while kill -0 $1 2>/dev/null && [ $k -lt 600 ]; do sleep 0.1; k=$((k+1)); done; ! kill -0 $1 2>/dev/null; }
    # Reads after ADD (the partition scan, udev's probe) miss: the disk counts as idle 5 s later;
    # the counts below are deltas from here.
    sleep 6
    echo "added: $(st)"

    # --- a 4 KiB miss with the disk idle: unit 4 (blocks 256-319), block 258 asked.
    p0=$(field presentBlocks)
    dd if=$D of=/dev/null bs=$K skip=258 count=1 iflag=direct status=none
    waitfor presentBlocks $((p0 + 64))
    echo "after one miss: $(st)"
    dd if=$D of=/tmp/a bs=$K skip=256 count=64 iflag=direct status=none; dd if=/tmp/orig.img of=/tmp/b bs=$K skip=256 count=64 status=none
    cmp -s /tmp/a /tmp/b && echo "the filled unit equals the disk"
    echo "after reading the unit: $(st)"

    # --- a write before the CLAIM: the fill of unit 8 (blocks 512-575, block 520 asked) held
    # before its CLAIM; block 521 written whole meanwhile (dirty in the server: not claimed).
    head -c $K /dev/urandom > /tmp/w1
    echo "ublk:unit-claim /tmp/gate1" > /tmp/pause
    sleep 6 # the disk idle again: a whole unit
    dd if=$D of=/dev/null bs=$K skip=520 count=1 iflag=direct status=none
    dd if=/tmp/w1 of=$D bs=$K seek=521 count=1 oflag=direct conv=notrunc status=none || echo "write 1 FAILED"
    put 521 /tmp/w1
    p0=$(field presentBlocks)
    touch /tmp/gate1
    waitfor presentBlocks $((p0 + 62))
    echo "after the fill past the write: $(st)"
    dd if=$D bs=$K skip=521 count=1 iflag=direct status=none | cmp -s - /tmp/w1 && echo "the block written before the claim keeps its bytes" || echo "the block written before the claim LOST its bytes"
    blk 522 /tmp/orig.img && blk 575 /tmp/orig.img && blk 512 /tmp/orig.img && echo "unit 8's other blocks equal the disk"

    # --- a write after the CLAIM: the fill of unit 12 (blocks 768-831, block 770 asked) held
    # after its CLAIM; block 771 written whole waits for it (claimed: it parks), then lands.
    head -c $K /dev/urandom > /tmp/w2
    echo "ublk:unit-write /tmp/gate2" > /tmp/pause
    sleep 6
    dd if=$D of=/dev/null bs=$K skip=770 count=1 iflag=direct status=none
    waitfor claimedBlocks 1
    echo "claimed: $(field claimedBlocks)"
    dd if=/tmp/w2 of=$D bs=$K seek=771 count=1 oflag=direct conv=notrunc status=none &
    W=$!
    sleep 1
    kill -0 $W 2>/dev/null && echo "the write of a claimed block waits for the fill"
    p0=$(field presentBlocks)
    touch /tmp/gate2
    wait $W || echo "write 2 FAILED"
    put 771 /tmp/w2
    : > /tmp/pause
    waitfor presentBlocks $((p0 + 63))
    echo "after the fill under the write: $(st)"
    dd if=$D bs=$K skip=771 count=1 iflag=direct status=none | cmp -s - /tmp/w2 && echo "the block written after the claim keeps its bytes" || echo "the block written after the claim LOST its bytes"
    blk 772 /tmp/orig.img && blk 831 /tmp/orig.img && blk 768 /tmp/orig.img && echo "unit 12's other blocks equal the disk"
    echo "unit fills before the kill: $(st)"

    # --- kill -9 during a fill: unit 16 (blocks 1024-1087, block 1026 asked) held after its
    # CLAIM for good; a write of claimed block 1027 parked on it; the daemon killed; the same command.
    head -c $K /dev/urandom > /tmp/w3
    echo "ublk:unit-write /tmp/gate-never" > /tmp/pause
    sleep 6
    dd if=$D of=/dev/null bs=$K skip=1026 count=1 iflag=direct status=none
    waitfor claimedBlocks 1
    echo "claimed before the kill: $(field claimedBlocks)"
    dd if=/tmp/w3 of=$D bs=$K seek=1027 count=1 oflag=direct conv=notrunc status=none 2>/tmp/w3.err &
    W=$!
    sleep 1
    kill -0 $W 2>/dev/null && echo "the write of a claimed block waits before the kill"
    P=$(pid); kill -9 $P; waitgone $P && echo "killed"
    : > /tmp/pause
    ULOBDEV_PAUSE_FILE=/tmp/pause $B > /tmp/reattach.out 2>&1 && echo "re-attached after kill -9" || { echo "re-attach FAILED"; cat /tmp/reattach.out; }
    grep -q 'taken back from a daemon that died' $LOG && echo "recovered the device"
    if wait $W; then put 1027 /tmp/w3; echo "write 3 acknowledged"; else echo "write 3 failed: $(cat /tmp/w3.err)"; blk 1027 /tmp/w3 && put 1027 /tmp/w3; fi
    echo "after the re-attach: $(st)"
    cmp $D /tmp/want.img && echo "the device equals the disk with the writes after kill -9"
    blk 1026 /tmp/orig.img && blk 1087 /tmp/orig.img && echo "unit 16 equals the disk"

    # --- the disk gets the writes; the device equals the disk.
    $U flush --wait $D > /dev/null && echo "flushed"
    cmp /tmp/disk.img /tmp/want.img && echo "the disk holds the writes"
    cmp $D /tmp/disk.img && echo "the device equals the disk"
    $U detach $D > /dev/null && echo "detached"
  `,
    { memoryMb: 2048, timeoutMs: 480_000 },
  );
}, 540_000);

/** status's ublk counts after the line `tag: ...`. */
function st(tag: string): Record<string, number> {
  const line = new RegExp(`^${tag}: (.*)$`, 'm').exec(run.output)?.[1] ?? '';
  return Object.fromEntries(line.split(' ').map((kv) => kv.split('=')).map(([k, v]) => [k, Number(v)]));
}
/** unitFills, unitFillBlocks, unitFillsSkipped at `tag` less those at the start. */
function fills(tag: string): number[] {
  const a = st('added');
  const b = st(tag);
  return ['unitFills', 'unitFillBlocks', 'unitFillsSkipped'].map((k) => b[k]! - a[k]!);
}

describe('the unit fill on /dev/ublkbN', () => {
  it('a 4 KiB read miss with the disk idle makes its whole eviction unit present, equal to the disk, and the rest of it hits', () => {
    expect(run.output, run.output).not.toContain('FAILED');
    const added = st('added');
    const one = st('after one miss');
    expect(one.presentBlocks! - added.presentBlocks!, run.output).toBe(64);
    expect(one.readMisses! - added.readMisses!).toBe(1);
    expect(fills('after one miss'), run.output).toEqual([1, 63, 0]);
    expect(run.output).toContain('the filled unit equals the disk');
    const read = st('after reading the unit');
    expect(read.readMisses).toBe(one.readMisses);
    expect(read.readHits! - one.readHits!).toBeGreaterThanOrEqual(1);
  });

  it('a whole-block write that lands before the fill claims its unit keeps its bytes', () => {
    expect(run.output, run.output).toContain('the block written before the claim keeps its bytes');
    expect(run.output).toContain("unit 8's other blocks equal the disk");
    expect(st('after the fill past the write').claimedBlocks).toBe(0);
  });

  it('a write of a claimed block waits for the fill, then lands', () => {
    expect(Number(/^claimed: (\d+)/m.exec(run.output)?.[1]), run.output).toBe(63);
    expect(run.output).toContain('the write of a claimed block waits for the fill');
    expect(run.output, run.output).toContain('the block written after the claim keeps its bytes');
    expect(run.output).toContain("unit 12's other blocks equal the disk");
    // unit 4: 63 blocks; unit 8: 62 (one asked, one written); unit 12: 63 (filled, then written)
    expect(fills('unit fills before the kill'), run.output).toEqual([3, 63 + 62 + 63, 0]);
  });

  it('kill -9 with a fill holding its claim: the same command takes the device back, which carries on equal to the disk with the writes; flush', () => {
    expect(Number(/claimed before the kill: (\d+)/.exec(run.output)?.[1]), run.output).toBe(63);
    expect(run.output).toContain('the write of a claimed block waits before the kill');
    expect(run.output).toContain('killed');
    expect(run.output, run.output).toContain('re-attached after kill -9');
    expect(run.output).toContain('recovered the device');
    expect(run.output).toMatch(/write 3 (acknowledged|failed)/);
    expect(run.output, run.output).toContain('the device equals the disk with the writes after kill -9');
    expect(run.output).toContain('unit 16 equals the disk');
    // the new daemon's server claims nothing the dead one held
    expect(st('after the re-attach').claimedBlocks).toBe(0);
    expect(run.output).toContain('flushed');
    expect(run.output, run.output).toContain('the disk holds the writes');
    expect(run.output, run.output).toContain('the device equals the disk');
    expect(run.output).toContain('detached');
    expectCleanKernel(run);
    expect(run.code).toBe(0);
  });
});
