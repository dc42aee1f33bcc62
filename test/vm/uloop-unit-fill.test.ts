// The unit fill on /dev/uloopN (issue 12, power; src/bdev/unit-fill.ts), in one guest boot, with
// --cache-size 16M (eviction unit 256 KiB: 64 blocks of 4 KiB) over a 64 MiB disk of random bytes,
// the daemon started without ULOBDEV_UNIT_FILL (the fill is on by default with a budget):
//  - a 4 KiB read miss with the disk idle makes its whole unit present in the kernel (QUERY's
//    present, status's kernel.unitFillBlocks), equal to the disk, and the rest of the unit then
//    reads as hits (read_misses does not move);
//  - a write of a whole neighbouring block that lands before the fill's CLAIM (the fill held at
//    the pause point uloop:unit-claim) keeps the written bytes: the kernel never claims it;
//  - a write of a claimed neighbouring block (the fill held at uloop:unit-write, after CLAIM,
//    before the cache file is written) waits for the fill, then lands: the written bytes stay;
//  - after both, flush --wait: the disk holds the written blocks and the device equals the disk.
// The planted bugs these caught are named in the commit that added the file.
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';
import { expectCleanKernel, queryAfter, statusShell } from './uloop-tools.js';

let run: VmResult;

beforeAll(async () => {
  const vm = prepareVm();
  run = await runInVm(
    `
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; CTL=${vm.ULOOPCTL}; D=/dev/uloop0; K=4096
    insmod ${vm.ULOOP_KO} io_timeout_s=600
    head -c 64M /dev/urandom > /tmp/disk.img
    cp /tmp/disk.img /tmp/orig.img
    : > /tmp/pause
    ULOBDEV_PAUSE_FILE=/tmp/pause $U -c /tmp/c.cache -b /tmp/c.bitmap --writeback --cache-size 16M --daemon $D /tmp/disk.img > /dev/null || echo "attach FAILED"
    q() { $CTL query 0; }
    field() { q | tr ' ' '\\n' | sed -n "s/^$1=//p"; }
    # blk N: block N of the device (direct) equals block N of FILE
    blk() { dd if=$D of=/tmp/a bs=$K skip=$1 count=1 iflag=direct status=none; dd if=$2 of=/tmp/b bs=$K skip=$1 count=1 status=none; cmp -s /tmp/a /tmp/b; }
    # waitfor FIELD VALUE: until QUERY's FIELD is at least VALUE (30 s at most: a loaded host)
    waitfor() { k=0; while [ $(field $1) -lt $2 ] && [ $k -lt 600 ]; do sleep 0.05; k=$((k+1)); done; }
    # status over the control socket (ulobctl and jq: statusShell in uloop-tools.ts), not by
    # \`ulobdev status --json | node -e\`: two Node starts, seconds of guest time each under TCG
    ${statusShell()}
    unitfills() { sj uloop0 '.kernel | "\\(.unitFills) \\(.unitFillBlocks) \\(.unitFillsSkipped)"'; }
    # The kernel's partition scan at ADD misses (and fills around) the first and last blocks: the
    # disk counts as idle again 5 s later; the counts below are taken from here.
    sleep 6
    echo "added: $(q)"
    echo "unit fills at the start: $(unitfills)"

    # --- a 4 KiB miss with the disk idle: unit 4 (blocks 256-319), block 258 asked.
    p0=$(field present)
    dd if=$D of=/dev/null bs=$K skip=258 count=1 iflag=direct status=none
    waitfor present $((p0 + 64))
    echo "after one miss: $(q)"
    echo "unit fills after one miss: $(unitfills)"
    dd if=$D of=/tmp/a bs=$K skip=256 count=64 iflag=direct status=none; dd if=/tmp/orig.img of=/tmp/b bs=$K skip=256 count=64 status=none
    cmp -s /tmp/a /tmp/b && echo "the filled unit equals the disk"
    echo "after reading the unit: $(q)"

    # --- a write before the CLAIM: the fill of unit 8 (blocks 512-575, block 520 asked) held
    # before its CLAIM; block 521 written whole meanwhile (pending in the kernel, not claimed).
    head -c $K /dev/urandom > /tmp/w1
    echo "uloop:unit-claim /tmp/gate1" > /tmp/pause
    sleep 6 # the disk idle again: a whole unit
    dd if=$D of=/dev/null bs=$K skip=520 count=1 iflag=direct status=none
    dd if=/tmp/w1 of=$D bs=$K seek=521 count=1 oflag=direct conv=notrunc status=none || echo "write 1 FAILED"
    p0=$(field present)
    touch /tmp/gate1
    waitfor present $((p0 + 62))
    echo "after the fill past the write: $(q)"
    dd if=$D bs=$K skip=521 count=1 iflag=direct status=none | cmp -s - /tmp/w1 && echo "the block written before the claim keeps its bytes" || echo "the block written before the claim LOST its bytes"
    blk 522 /tmp/orig.img && blk 575 /tmp/orig.img && blk 512 /tmp/orig.img && echo "its unit's other blocks equal the disk"

    # --- a write after the CLAIM: the fill of unit 12 (blocks 768-831, block 770 asked) held
    # after its CLAIM; block 771 written whole waits for it (claimed: busy), then lands.
    head -c $K /dev/urandom > /tmp/w2
    echo "uloop:unit-write /tmp/gate2" > /tmp/pause
    sleep 6
    dd if=$D of=/dev/null bs=$K skip=770 count=1 iflag=direct status=none
    waitfor claimed 1
    echo "claimed: $(field claimed)"
    dd if=/tmp/w2 of=$D bs=$K seek=771 count=1 oflag=direct conv=notrunc status=none &
    W=$!
    sleep 1
    kill -0 $W 2>/dev/null && echo "the write of a claimed block waits for the fill"
    p0=$(field present)
    touch /tmp/gate2
    wait $W || echo "write 2 FAILED"
    : > /tmp/pause
    waitfor present $((p0 + 63))
    echo "after the fill under the write: $(q)"
    dd if=$D bs=$K skip=771 count=1 iflag=direct status=none | cmp -s - /tmp/w2 && echo "the block written after the claim keeps its bytes" || echo "the block written after the claim LOST its bytes"
    blk 772 /tmp/orig.img && blk 831 /tmp/orig.img && blk 768 /tmp/orig.img && echo "its unit's other blocks equal the disk"
    echo "unit fills at the end: $(unitfills)"

    # --- the disk gets the writes; the device equals the disk.
    $U flush --wait $D > /dev/null && echo "flushed"
    dd if=/tmp/disk.img bs=$K skip=521 count=1 status=none | cmp -s - /tmp/w1 && dd if=/tmp/disk.img bs=$K skip=771 count=1 status=none | cmp -s - /tmp/w2 && echo "the disk holds both writes"
    cmp $D /tmp/disk.img && echo "the device equals the disk"
    $U detach $D > /dev/null && echo "detached"
    rmmod uloop && echo unloaded
  `,
    { memoryMb: 2048, timeoutMs: 600_000 },
  );
}, 700_000);

/** status's kernel.unitFills, unitFillBlocks and unitFillsSkipped at `tag`, less those at the start. */
function fills(tag: string): number[] {
  const at = (t: string) => (new RegExp(`unit fills ${t}: (\\d+) (\\d+) (\\d+)`).exec(run.output)?.slice(1, 4) ?? []).map(Number);
  const start = at('at the start');
  return at(tag).map((n, i) => n - start[i]!);
}

describe('the unit fill on /dev/uloopN', () => {
  it('a 4 KiB read miss with the disk idle makes its whole eviction unit present, equal to the disk, and the rest of it hits', () => {
    expect(run.output, run.output).not.toContain('FAILED');
    const added = queryAfter(run.output, 'added');
    const one = queryAfter(run.output, 'after one miss');
    expect(one.present! - added.present!, run.output).toBe(64);
    expect(one.read_misses! - added.read_misses!).toBe(1);
    expect(fills('after one miss'), run.output).toEqual([1, 63, 0]);
    expect(run.output).toContain('the filled unit equals the disk');
    const read = queryAfter(run.output, 'after reading the unit');
    expect(read.read_misses).toBe(one.read_misses);
    expect(read.read_hits! - one.read_hits!).toBeGreaterThanOrEqual(1);
  });

  it('a whole-block write that lands before the fill claims its unit keeps its bytes', () => {
    expect(run.output, run.output).toContain('the block written before the claim keeps its bytes');
    expect(run.output).toContain("its unit's other blocks equal the disk");
    // The written block is not claimed: 62 of the unit's 64 blocks filled (one asked, one written);
    // the claimed one of the next case is filled, then written (63).
    const q = queryAfter(run.output, 'after the fill past the write');
    expect(q.claimed).toBe(0);
  });

  it('a write of a claimed block waits for the fill, then lands; flush brings both writes to the disk', () => {
    expect(Number(/claimed: (\d+)/.exec(run.output)?.[1]), run.output).toBeGreaterThan(0);
    expect(run.output).toContain('the write of a claimed block waits for the fill');
    expect(run.output, run.output).toContain('the block written after the claim keeps its bytes');
    expect(fills('at the end'), run.output).toEqual([3, 63 + 62 + 63, 0]);
    expect(run.output).toContain('flushed');
    expect(run.output, run.output).toContain('the disk holds both writes');
    expect(run.output, run.output).toContain('the device equals the disk');
    expect(run.output).toContain('detached');
    expect(run.output).toContain('unloaded');
    expectCleanKernel(run);
    expect(run.code).toBe(0);
  });
});
