// A ublk read hit's COMMIT_AND_FETCH goes to the kernel linked behind its read of the cache file
// (IOSQE_IO_LINK, native/ublk.cc ServeHit), in the 6.12 guest. The cache file lives on ext4 on a
// loop device, whose reads complete later on a kworker: a read of a page the page cache does not
// hold finishes off the io_uring_enter that submitted it, so a COMMIT not linked behind it would
// hand the request the tag's buffer (or, zero copy, end the request) before the read has filled
// it. And a hit whose read fails (ULOBDEV_UBLK_FAULT hit-ebadf-at: descriptor -1) fails that
// request alone: the kernel cancels the linked COMMIT, the server drops that completion and
// commits the tag once itself, and the tag serves on. And a pair the kernel took only in part
// (cut-pair-at: the read alone) is finished unlinked (native/ublk.cc UnlinkCut).
import { beforeAll, describe, expect, it } from 'vitest';
import { ROOT, runInVm, type VmResult } from '../support/vm.js';

let run: VmResult;
const MiB = 1024 * 1024;
// the planted failed read: the first linked hit over this byte of the device
const EBADF_BLOCK = 3073; // 4 KiB blocks: 12 MiB + 4 KiB
// the planted cut submission: the first linked hit over this block goes to the kernel without
// its COMMIT (as when io_uring_enter stops part-way), which must then not run unlinked
const CUT_BLOCK = 3500;

beforeAll(async () => {
  run = await runInVm(`
    U="node ${ROOT}/dist/cli/ulobdev.js"; D=/dev/ublkb0
    pid() { grep -o '"pid": *[0-9]*' /run/ulobdev/ublkb0.json | grep -o '[0-9]*$'; }
    modprobe -q crc32c_generic || true; modprobe ext4; modprobe loop
    truncate -s 96M /tmp/lo.img && LO=$(losetup -f --show /tmp/lo.img) && mkfs.ext4 -q $LO && mkdir -p /tmp/lm && mount $LO /tmp/lm
    head -c 16M /dev/urandom > /tmp/ldisk.img
    LA="$U -c /tmp/lm/l.cache -b /tmp/lm/l.bitmap --writeback --daemon $D /tmp/ldisk.img"
    ULOBDEV_UBLK_FAULT=hit-ebadf-at=${EBADF_BLOCK * 4096},cut-pair-at=${CUT_BLOCK * 4096} timeout -k 5 120 $LA > /dev/null && echo "attached"
    echo "kernel $(uname -r)"
    # every block read once (misses: the daemon fills the cache file), then out of the page cache
    dd if=$D of=/dev/null bs=1M count=16 iflag=direct status=none
    sync; echo 3 > /proc/sys/vm/drop_caches
    # 2,048 hits whose reads of the cache file go to the loop device
    timeout -k 5 120 dd if=$D of=/tmp/l1 bs=4k count=2048 iflag=direct status=none
    head -c 8M /tmp/ldisk.img | cmp - /tmp/l1 && echo "cold hits verified"
    # the cut pair, on a block out of the page cache (its read completes later)
    sync; echo 3 > /proc/sys/vm/drop_caches
    timeout -k 5 60 dd if=$D of=/tmp/lc bs=4k skip=${CUT_BLOCK} count=1 iflag=direct status=none && dd if=/tmp/ldisk.img bs=4k skip=${CUT_BLOCK} count=1 status=none | cmp - /tmp/lc && echo "cut pair verified"
    # the planted failed read: that request fails, the next read of the block is served
    timeout -k 5 60 dd if=$D of=/dev/null bs=4k skip=${EBADF_BLOCK} count=1 iflag=direct status=none 2>/dev/null && echo "failed hit read: served" || echo "failed hit read: I/O error"
    timeout -k 5 60 dd if=$D of=/tmp/l2 bs=4k skip=${EBADF_BLOCK} count=1 iflag=direct status=none && dd if=/tmp/ldisk.img bs=4k skip=${EBADF_BLOCK} count=1 status=none | cmp - /tmp/l2 && echo "read after the failed hit verified"
    timeout -k 5 120 dd if=$D of=/tmp/l3 bs=4k count=4096 iflag=direct status=none && cmp /tmp/ldisk.img /tmp/l3 && echo "hits after the failed hit verified"
    $U status $D --json | node -e 'const j=JSON.parse(require("fs").readFileSync(0,"utf8"));const u=(Array.isArray(j)?j[0]:j).ublk;console.log("counts: linkedHits="+u.linkedHits+" unlinkedHits="+u.unlinkedHits+" ioErrors="+u.ioErrors+" readHits="+u.readHits+" coopTaskrun="+u.coopTaskrun)' || true
    P=$(pid); kill -0 $P 2>/dev/null && echo "daemon alive"
    timeout -k 5 60 $U detach $D > /dev/null && echo "detached"
    # a kernel that refuses IORING_SETUP_COOP_TASKRUN (before 5.19; the hook asks for a flag no
    # kernel has): the rings are made without it and the device serves
    ULOBDEV_UBLK_FAULT=ring-einval timeout -k 5 120 $LA > /tmp/re.out 2>&1 && echo "ring-einval: attached" || echo "ring-einval: attach failed: $(tail -1 /tmp/re.out)"
    timeout -k 5 120 dd if=$D of=/tmp/l4 bs=64k count=256 iflag=direct status=none && cmp /tmp/ldisk.img /tmp/l4 && echo "ring-einval: reads verified"
    $U status $D --json | node -e 'const j=JSON.parse(require("fs").readFileSync(0,"utf8"));const u=(Array.isArray(j)?j[0]:j).ublk;console.log("ring-einval: coopTaskrun="+u.coopTaskrun)' || true
    timeout -k 5 60 $U detach $D > /dev/null && echo "ring-einval: detached"
    umount /tmp/lm; losetup -d $LO
  `, { timeoutMs: 600_000 });
  if (process.env.ULOBVM_SHOW) process.stderr.write(run.output);
}, 700_000);

describe('ublk: a hit\'s COMMIT linked behind its read of the cache file', () => {
  it('hits whose read of the cache file completes off the submitting enter return the cache file\'s data', () => {
    expect(run.output).toContain('attached');
    expect(run.output).toContain('cold hits verified');
  });
  it('a pair the kernel took only in part (the read alone): the COMMIT left queued becomes a NOP and the hit is committed after its read', () => {
    expect(run.output).toContain('cut pair verified');
  });
  it('a hit whose read fails fails that request alone; its cancelled COMMIT is dropped, the tag serves on', () => {
    expect(run.output).toContain('failed hit read: I/O error');
    expect(run.output).toContain('read after the failed hit verified');
    expect(run.output).toContain('hits after the failed hit verified');
    expect(run.output).toContain('daemon alive');
    expect(run.output).toContain('detached');
  });
  it('every hit went linked; exactly the cut pair and the planted failed read came back unlinked', () => {
    const m = /counts: linkedHits=(\d+) unlinkedHits=(\d+) ioErrors=(\d+) readHits=(\d+) coopTaskrun=(true|false)/.exec(run.output);
    expect(m, 'the counts in status').not.toBeNull();
    // the cold pass (2,048 blocks), the cut pair, the failed read and its retry, the last pass (16 MiB)
    expect(Number(m![1])).toBeGreaterThanOrEqual(2048 + 1 + 2 + (16 * MiB) / 4096);
    expect(Number(m![1])).toBeLessThanOrEqual(Number(m![4]));
    // the cut pair and the planted failed read
    expect(Number(m![2])).toBe(2);
    expect(Number(m![3])).toBe(1);
    expect(run.code).toBe(0);
  });
  it('the queues\' rings take IORING_SETUP_COOP_TASKRUN; a kernel that refuses the flag gets rings without it and the device serves', () => {
    const m = /counts: .* coopTaskrun=(true|false)/.exec(run.output);
    expect(m, 'the counts in status').not.toBeNull();
    expect(m![1]).toBe('true'); // 6.12 has it (5.19+)
    expect(run.output).toContain('ring-einval: attached');
    expect(run.output).toContain('ring-einval: reads verified');
    expect(run.output).toContain('ring-einval: coopTaskrun=false');
    expect(run.output).toContain('ring-einval: detached');
  });
});
