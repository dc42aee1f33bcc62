// The Node daemon of /dev/uloopN keeps running and takes its device back (issue 11, "Reproduced"):
//  - a miss whose disk read fails (the disk file shrank under the daemon) fails that read with EIO
//    at once; the daemon lives, logs one line for it, and the next miss after the disk is back is
//    served (before: the reply's -5 was refused by the native argument reader inside a promise
//    handler, the unhandled rejection ended the process, and every later request waited
//    reattach_timeout_s for EIO);
//  - kill -9 of the daemon, then the same attach command: it ATTACHes to the existing /dev/uloop0
//    instead of ADD (before: ENOSPC, told as "taken by another device"), takes over the requests
//    queued meanwhile, and gets the blocks the kernel held for the next barrier with a FLUSH;
//    a device of another geometry on that N is refused with one line;
//  - CYCLES rounds of kill -9 under fio --verify (4 writers on ext4 files: intents, rule-4 whole
//    block writes, fsyncs and barriers), the same command each time: no verify error, fsck clean,
//    and the data checked again through a fresh ADD of the cache after detach.
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';
import { expectCleanKernel, statusShell } from './uloop-tools.js';

// The issue asks for 100 cycles: `make test-long` (ULOB_TEST_SCALE=1) runs them, ULOB_RESTART_CYCLES=N
// runs N; `make test` runs DEFAULT_CYCLES (10: 190 s in the two-lane clean-clone run at load 4, 635 s
// at load 11-17). A cycle is one Node start (module load, store
// open and crash recovery, ATTACH). Under TCG that took 20-47 s when ulobdev loaded ~210 modules
// over the guest's 9p root; the daemon now runs as one bundled file (dist/cli/ulobdev.bundle.js, what
// `make install` puts behind /usr/sbin/ulobdev) and loads pino-pretty, cli-progress and cron only
// when used (docs/design.md, "Start time"). Each cycle's time to ATTACH is printed, and the phases
// of the starts that lived long enough to log them (startMs: loaded, checked, store, ioctl, attached,
// ms since the process began). fio is paced so the restarting daemon gets CPU; it keeps requests in
// flight across every kill.
// io_timeout_s is raised at insmod: here a daemon lives at most 0.5 s after each ATTACH and the
// next one takes seconds to start, so a request handed to one dead daemon after another waits
// longer than the default 90 s in total and fails with EIO by design (seen: 4 writes at 300 s).
const DEFAULT_CYCLES = 10;
const FULL_CYCLES = 100;
const CYCLES = Number(process.env.ULOB_RESTART_CYCLES || (Number(process.env.ULOB_TEST_SCALE) >= 1 ? FULL_CYCLES : DEFAULT_CYCLES));
if (!Number.isInteger(CYCLES) || CYCLES < 1) throw new Error(`ULOB_RESTART_CYCLES=${process.env.ULOB_RESTART_CYCLES}: give a whole number of cycles, at least 1`);
// Guest time: about 3 minutes for the rest, and up to 60 s a cycle on a loaded host.
const GUEST_MS = 600_000 + CYCLES * 60_000;
let run: VmResult;

beforeAll(async () => {
  const vm = prepareVm();
  run = await runInVm(
    `
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; CTL=${vm.ULOOPCTL}; D=/dev/uloop0; LOG=/run/ulobdev/uloop0.log
    insmod ${vm.ULOOP_KO} reattach_timeout_s=120 io_timeout_s=900
    modprobe -q crc32c_generic || true; modprobe ext4
    head -c 8M /dev/urandom > /tmp/disk.img && truncate -s 256M /tmp/disk.img
    A="$U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --block-size 64K --daemon $D /tmp/disk.img"
    $A > /dev/null || echo "first attach failed"
    detached() { k=0; while $CTL query 0 | grep -q ' attached=1 ' && [ $k -lt 600 ]; do sleep 0.05; k=$((k+1)); done; }
    # pid and status read without a Node start (seconds each under TCG): grep, and the control
    # socket through ulobctl and jq (statusShell in uloop-tools.ts)
    pid() { grep -o '"pid": *[0-9]*' /run/ulobdev/uloop0.json | grep -o '[0-9]*$'; }
    ${statusShell()}
    kstat() { sj uloop0 '.kernel | "\\(.attach) error=\\(.error) failedUpcalls=\\(.failedUpcalls)"'; }

    # --- a failed miss: the disk file shrinks under the daemon, a read past its new end
    truncate -s 128M /tmp/disk.img
    t0=$(date +%s%N)
    dd if=$D of=/dev/null bs=64k skip=3000 count=1 iflag=direct status=none 2>/tmp/dd.err && echo "read past the end: no error" || echo "failed miss: $(head -1 /tmp/dd.err)"
    echo "failed miss answered in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    dd if=$D of=/dev/null bs=64k skip=3100 count=4 iflag=direct status=none 2>/dev/null || echo "second failed miss"
    kill -0 $(pid) && echo "daemon alive after failed misses: $(kstat)"
    echo "miss log lines: $(grep -c 'miss of' $LOG)"
    truncate -s 256M /tmp/disk.img
    dd if=$D of=/dev/null bs=64k skip=3000 count=1 iflag=direct status=none && echo "the miss is served once the disk is back"

    # --- kill -9 and the same command: ATTACH, queued requests taken over, pending bits fetched
    mkfs.ext4 -q -b 4096 $D && mkdir -p /tmp/m && mount $D /tmp/m
    kill -9 $(pid); detached
    ( dd if=$D of=/dev/null bs=64k skip=3500 count=2 iflag=direct status=none && echo "read queued while no daemon ran: served" ) &
    R=$!
    $A > /tmp/reattach.out 2>&1 && echo "re-attached: $(kstat)" || { echo "re-attach failed:"; cat /tmp/reattach.out; }
    wait $R || true
    grep -q 'taken back from a daemon that died' $LOG && echo "logged the take-back"

    # --- another geometry on that N is refused, the device left alone
    truncate -s 64M /tmp/other.img
    kill -9 $(pid); detached
    $U -c /tmp/o.cache -b /tmp/o.bitmap --writeback --name other --daemon $D /tmp/other.img > /tmp/other.out 2>&1 && echo "other geometry accepted" || echo "other geometry exit $?: $(tail -1 /tmp/other.out)"
    [ ! -e /tmp/o.cache ] && echo "no cache made for the refused attach"
    $A > /dev/null && echo "the right command takes it back"

    # --- kill -9 cycles under fio --verify. The command runs in the foreground, as systemd's
    # Restart=on-failure runs it (one process per cycle); each is killed once the kernel shows it
    # attached, after a random 0..0.5 s more (so some die mid-start, mid-FLUSH or mid-upcall).
    kill -9 $(pid); detached
    F1="$U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --block-size 64K $D /tmp/disk.img"
    attached() { $CTL query 0 | grep -q ' attached=1 '; }
    touch /tmp/go
    ( n=0; while [ -e /tmp/go ]; do
        fio --directory=/tmp/m --name=w --numjobs=4 --size=2M --bs=4k --rw=randwrite --ioengine=psync --direct=1 --fsync=16 --rate_iops=50 \
            --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting --output=/tmp/fio.$n > /dev/null 2>&1 \
          || { echo "fio round $n FAILED"; grep -i -m3 'verify\|error' /tmp/fio.$n || true; }
        n=$((n+1)); done; echo "fio rounds: $n" ) > /tmp/fio.summary 2>&1 &
    F=$!
    t0=$(date +%s)
    i=0; fails=0
    while [ $i -lt ${CYCLES} ]; do
      c0=$(date +%s%N); $F1 >> /tmp/fg.log 2>&1 & P=$!
      k=0; while ! attached && [ $k -lt 1200 ]; do sleep 0.05; k=$((k+1)); done
      attached || { fails=$((fails+1)); echo "cycle $i: not attached after 60 s"; tail -3 /tmp/fg.log; }
      echo "cycle $i attached in $(( ($(date +%s%N) - c0) / 1000000 )) ms"
      # 0 to 0.5 s after the attach, each delay in turn (the guest's sh is dash: no $RANDOM, which
      # made every delay 0).
      sleep 0.$(( i % 6 ))
      kill -9 $P; wait $P 2>/dev/null || true
      i=$((i+1))
    done
    echo "kill -9 cycles: $i, failed attaches: $fails, seconds: $(( $(date +%s) - t0 ))"
    $A > /dev/null && echo "the --daemon command takes it back after the cycles"
    rm /tmp/go; wait $F || echo "fio loop FAILED"; cat /tmp/fio.summary
    echo "take-backs logged: $(grep -c 'taken back from a daemon that died' /tmp/fg.log)"
    echo "start phases (ms since the process began):"; grep -o '"startMs":{[^}]*}' /tmp/fg.log || true
    umount /tmp/m
    fsck.ext4 -fn $D > /tmp/fsck.out 2>&1 && echo "fsck clean" || { echo "fsck FAILED"; head -20 /tmp/fsck.out; }
    sha256sum < $D > /tmp/sum.dev
    $U status $D
    $U detach $D > /dev/null && echo detached
    $U -c /tmp/d.cache -b /tmp/d.bitmap --daemon $D /tmp/disk.img > /dev/null
    sha256sum < $D | cmp -s - /tmp/sum.dev && echo "the cache, added afresh, holds the same device"
    fsck.ext4 -fn $D > /dev/null 2>&1 && echo "fsck clean after re-adding"
    $U detach $D > /dev/null
    rmmod uloop && echo unloaded
  `,
    { memoryMb: 1536, timeoutMs: GUEST_MS },
  );
}, GUEST_MS + 120_000);

describe('the Node daemon of /dev/uloopN when things fail', () => {
  it('a failed miss fails that read at once, and the daemon lives and logs it once', () => {
    expect(run.output).toMatch(/failed miss: dd: .*Input\/output error/);
    const ms = Number(/failed miss answered in (\d+) ms/.exec(run.output)?.[1]);
    expect(ms).toBeLessThan(20_000);
    expect(run.output).toMatch(/daemon alive after failed misses: added error=null failedUpcalls=[2-9]/);
    expect(run.output).toContain('miss log lines: 1\n');
    expect(run.output).toContain('the miss is served once the disk is back');
  });

  it('the same command after kill -9 takes the device back and serves what was queued', () => {
    expect(run.output).toContain('re-attached: reattached error=null');
    expect(run.output).toContain('read queued while no daemon ran: served');
    expect(run.output).toContain('logged the take-back');
    expect(run.output).not.toContain('re-attach failed');
  });

  it('refuses a device of another geometry on the same N, changing nothing', () => {
    expect(run.output).toMatch(/other geometry exit 1: ulobdev: \/dev\/uloop0 exists without a daemon but is not this cache's device \(size 268435456 bytes, this disk 67108864/);
    expect(run.output).toContain('no cache made for the refused attach');
    expect(run.output).toContain('the right command takes it back');
  });

  it(`${CYCLES} kill -9 cycles under fio --verify: no verify error, fsck clean, nothing lost`, () => {
    const m = /kill -9 cycles: (\d+), failed attaches: (\d+), seconds: (\d+)/.exec(run.output);
    expect(m, run.output.slice(-3000)).not.toBeNull();
    expect(Number(m![1])).toBe(CYCLES);
    expect(Number(m![2])).toBe(0);
    expect(run.output).toContain('the --daemon command takes it back after the cycles');
    // The line is logged in the same tick as the ATTACH the loop waits for; a SIGKILL landing in
    // that millisecond is the only way to miss one.
    expect(Number(/take-backs logged: (\d+)/.exec(run.output)?.[1])).toBeGreaterThanOrEqual(CYCLES - 2);
    expect(run.output).toMatch(/fio rounds: [1-9]/);
    expect(run.output).not.toContain('FAILED');
    expect(run.output).toContain('fsck clean\n');
    expect(run.output).toContain('detached');
    expect(run.output).toContain('the cache, added afresh, holds the same device');
    expect(run.output).toContain('fsck clean after re-adding');
    expect(run.output).toContain('unloaded');
    expectCleanKernel(run);
    expect(run.code).toBe(0);
  });
});
