// Read hits on /dev/ublkb0 in the 6.12 guest (native/ublk.cc ServeHit: the read of the cache file on
// the queue's ring, its COMMIT_AND_FETCH queued once the read's completion is reaped).
// - The cache file lives on ext4 on a loop device, whose reads complete later on a kworker: a read
//   of a page the page cache does not hold finishes off the io_uring_enter that submitted it, and a
//   COMMIT that did not wait for it would hand the request the tag's buffer before it is filled.
// - A hit whose read fails (ULOBDEV_UBLK_FAULT hit-ebadf-at: descriptor -1) fails that request
//   alone; the tag serves on.
// - A kernel that refuses IORING_SETUP_COOP_TASKRUN gets rings without it.
// - The server dies with hits in flight (kill -9), and a queue thread ends with hits queued
//   (its io_uring_enter fails: it drains its reads and closes its ring), round after round: the
//   same command takes the device back and every read completes. In session 10 a hit's COMMIT went
//   in linked behind its read (IOSQE_IO_LINK); the kernel then issued such a COMMIT after
//   ublk_abort_queue had requeued the request (REISSUE), ended it on the requeue list, and the
//   requeue work oopsed (NULL mq_hctx in blk_mq_insert_request: the CI of stop 23).
import { beforeAll, describe, expect, it } from 'vitest';
import { ROOT, runInVm, type VmResult } from '../support/vm.js';
import { statusShell } from './uloop-tools.js';

let run: VmResult;
// the planted failed read: the first hit over this 4 KiB block of the device
const EBADF_BLOCK = 3073; // 12 MiB + 4 KiB
const ROUNDS = Number(process.env.ULOBVM_KILL_ROUNDS ?? 3);
// $ULOBDEV_UBLK_BATCH from the host (K[,US]): every daemon of the run waits in batches, so the kill
// and queue-thread-end rounds run on that path too (6.12+: status says batchWait=K)
const BATCH = process.env.ULOBDEV_UBLK_BATCH;

beforeAll(async () => {
  run = await runInVm(`
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; D=/dev/ublkb0
    ${BATCH ? `export ULOBDEV_UBLK_BATCH=${BATCH}` : ''}
    pid() { grep -o '"pid": *[0-9]*' /run/ulobdev/ublkb0.json | grep -o '[0-9]*$'; }
    waitgone() { k=0; while kill -0 $1 2>/dev/null && [ $k -lt 600 ]; do sleep 0.1; k=$((k+1)); done; ! kill -0 $1 2>/dev/null; }
    # status over the control socket (ulobctl and jq), not \`ulobdev status --json | node -e\`: two Node
    # starts, seconds of guest time each under TCG
    ${statusShell()}
    counts() { sj ublkb0 '.ublk | "'"$1"': ioErrors=\\(.ioErrors) readHits=\\(.readHits) coopTaskrun=\\(.coopTaskrun) batchWait=\\(.batchWait)"' || true; }
    modprobe -q crc32c_generic || true; modprobe ext4; modprobe loop
    truncate -s 96M /tmp/lo.img && LO=$(losetup -f --show /tmp/lo.img) && mkfs.ext4 -q $LO && mkdir -p /tmp/lm && mount $LO /tmp/lm
    head -c 16M /dev/urandom > /tmp/ldisk.img
    LA="$U -c /tmp/lm/l.cache -b /tmp/lm/l.bitmap --writeback --daemon $D /tmp/ldisk.img"
    ULOBDEV_UBLK_FAULT=hit-ebadf-at=${EBADF_BLOCK * 4096} timeout -k 5 120 $LA > /dev/null && echo "attached"
    echo "kernel $(uname -r)"
    # every block read once (misses: the daemon fills the cache file), then out of the page cache
    dd if=$D of=/dev/null bs=1M count=16 iflag=direct status=none
    sync; echo 3 > /proc/sys/vm/drop_caches
    # 2,048 hits whose reads of the cache file go to the loop device
    timeout -k 5 120 dd if=$D of=/tmp/l1 bs=4k count=2048 iflag=direct status=none
    head -c 8M /tmp/ldisk.img | cmp - /tmp/l1 && echo "cold hits verified"
    # the planted failed read: that request fails, the next read of the block is served
    timeout -k 5 60 dd if=$D of=/dev/null bs=4k skip=${EBADF_BLOCK} count=1 iflag=direct status=none 2>/dev/null && echo "failed hit read: served" || echo "failed hit read: I/O error"
    timeout -k 5 60 dd if=$D of=/tmp/l2 bs=4k skip=${EBADF_BLOCK} count=1 iflag=direct status=none && dd if=/tmp/ldisk.img bs=4k skip=${EBADF_BLOCK} count=1 status=none | cmp - /tmp/l2 && echo "read after the failed hit verified"
    timeout -k 5 120 dd if=$D of=/tmp/l3 bs=4k count=4096 iflag=direct status=none && cmp /tmp/ldisk.img /tmp/l3 && echo "hits after the failed hit verified"
    counts counts
    P=$(pid); kill -0 $P 2>/dev/null && echo "daemon alive"

    # kill -9 with fio's hits in flight on both queues; the same command takes the device back
    ok=0
    for r in $(seq ${ROUNDS}); do
      fio --output=/tmp/fio.$r --filename=$D --direct=1 --ioengine=libaio --bs=4k --rw=randread --iodepth=32 \\
        --time_based --runtime=4 --name=q0 --cpus_allowed=0 --name=q1 --cpus_allowed=1 > /dev/null 2>&1 &
      F=$!
      sleep 1.$((r % 10))
      P=$(pid); kill -9 $P && waitgone $P
      timeout -k 5 120 $LA > /tmp/again.$r 2>&1 || { echo "kill round $r: restart failed: $(tail -1 /tmp/again.$r)"; break; }
      wait $F && ok=$((ok+1)) || { echo "kill round $r: fio failed"; grep -i err /tmp/fio.$r | head -3; }
    done
    echo "kills with every read served: $ok of ${ROUNDS}"
    timeout -k 5 120 dd if=$D of=/tmp/l5 bs=1M count=16 iflag=direct status=none && cmp /tmp/ldisk.img /tmp/l5 && echo "device equals disk after the kills"
    timeout -k 5 60 $U detach $D > /dev/null && echo "detached"
    # a queue thread whose io_uring_enter fails with hits queued: it drains its reads and closes
    # its ring, the daemon ends; the same command takes the device back, fio's reads complete.
    # A cache on the guest's tmpfs: reads complete inside the enter that submits them (this is
    # where session 10's linked COMMIT oopsed 6.12 in the first round)
    TA="$U -c /tmp/t.cache -b /tmp/t.bitmap --writeback --daemon $D /tmp/ldisk.img"
    timeout -k 5 120 $TA > /dev/null && dd if=$D of=/dev/null bs=1M count=16 iflag=direct status=none
    ok=0
    for r in $(seq ${ROUNDS}); do
      P=$(pid); kill -TERM $P && waitgone $P
      ULOBDEV_UBLK_FAULT=enter-enomem-at=$((40 + r * 13)) timeout -k 5 120 $TA > /tmp/t.$r 2>&1 || { echo "thread round $r: attach failed: $(tail -1 /tmp/t.$r)"; break; }
      P=$(pid)
      fio --output=/tmp/fiot.$r --filename=$D --direct=1 --ioengine=libaio --bs=4k --rw=randread --iodepth=16 \\
        --number_ios=400 --name=q0 --cpus_allowed=0 --name=q1 --cpus_allowed=1 > /dev/null 2>&1 &
      F=$!
      waitgone $P || echo "thread round $r: daemon still running after its queue thread ended"
      timeout -k 5 120 $TA > /tmp/ta.$r 2>&1 || { echo "thread round $r: restart failed: $(tail -1 /tmp/ta.$r)"; break; }
      wait $F && ok=$((ok+1)) || { echo "thread round $r: fio failed"; grep -i err /tmp/fiot.$r | head -3; }
    done
    echo "queue thread ends with every read served: $ok of ${ROUNDS}"
    timeout -k 5 120 dd if=$D of=/tmp/l6 bs=1M count=16 iflag=direct status=none && cmp /tmp/ldisk.img /tmp/l6 && echo "device equals disk after the thread ends"
    timeout -k 5 60 $U detach $D > /dev/null && echo "tmpfs cache detached"

    # a kernel that refuses IORING_SETUP_COOP_TASKRUN (before 5.19; the hook asks for a flag no
    # kernel has): the rings are made without it and the device serves
    ULOBDEV_UBLK_FAULT=ring-einval timeout -k 5 120 $LA > /tmp/re.out 2>&1 && echo "ring-einval: attached" || echo "ring-einval: attach failed: $(tail -1 /tmp/re.out)"
    timeout -k 5 120 dd if=$D of=/tmp/l4 bs=64k count=256 iflag=direct status=none && cmp /tmp/ldisk.img /tmp/l4 && echo "ring-einval: reads verified"
    counts ring-einval
    timeout -k 5 60 $U detach $D > /dev/null && echo "ring-einval: detached"
    umount /tmp/lm; losetup -d $LO
  `, { timeoutMs: 900_000 });
  if (process.env.ULOBVM_SHOW) process.stderr.write(run.output);
}, 1_000_000);

describe('ublk: read hits', () => {
  it('hits whose read of the cache file completes off the submitting enter return the cache file\'s data', () => {
    expect(run.output).toContain('attached');
    expect(run.output).toContain('cold hits verified');
  });
  it('a hit whose read fails fails that request alone; the tag serves on', () => {
    expect(run.output).toContain('failed hit read: I/O error');
    expect(run.output).toContain('read after the failed hit verified');
    expect(run.output).toContain('hits after the failed hit verified');
    expect(run.output).toContain('daemon alive');
    const m = /counts: ioErrors=(\d+) readHits=(\d+)/.exec(run.output);
    expect(m, 'the counts in status').not.toBeNull();
    expect(Number(m![1])).toBe(1);
    // the cold pass (2,048 blocks), the failed read and its retry, the last pass (16 MiB)
    expect(Number(m![2])).toBeGreaterThanOrEqual(2048 + 2 + 4096);
  });
  it('kill -9 with hits in flight, and a queue thread ending with hits queued, round after round: the device comes back, every read completes, no oops', () => {
    expect(run.output).toContain(`kills with every read served: ${ROUNDS} of ${ROUNDS}`);
    expect(run.output).toContain(`queue thread ends with every read served: ${ROUNDS} of ${ROUNDS}`);
    expect(run.output).toContain('device equals disk after the kills');
    expect(run.output).toContain('device equals disk after the thread ends');
    expect(run.output).toContain('tmpfs cache detached');
  });
  it('the queues\' rings take IORING_SETUP_COOP_TASKRUN; a kernel that refuses the flag gets rings without it and the device serves', () => {
    expect(run.output).toMatch(/counts: .* coopTaskrun=true/); // 6.12 has it (5.19+)
    // the batched wait in force where asked for (6.12 has IORING_FEAT_MIN_TIMEOUT), else one at a time
    const k = BATCH ? Math.max(1, Number.parseInt(BATCH, 10)) : 1;
    expect(run.output).toMatch(new RegExp(`counts: .* batchWait=${k}\\b`));
    expect(run.output).toContain('ring-einval: attached');
    expect(run.output).toContain('ring-einval: reads verified');
    expect(run.output).toMatch(/ring-einval: .*coopTaskrun=false/);
    expect(run.output).toContain('ring-einval: detached');
    expect(run.code).toBe(0);
  });
});
