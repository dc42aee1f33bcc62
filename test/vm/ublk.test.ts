// `ulobdev --writeback /dev/ublkb0 disk.img` in the 6.12 guest: the kernel's ublk driver with the
// addon's io_uring server (native/ublk.cc). One guest boot: bad input (no ublk_drv), misses
// through the daemon, fio --verify with writers and readers at once, mkfs + fsck, a write-back
// flush that leaves the disk equal to the device, FLUSH durability across kill -9 (user recovery:
// the same command takes the device back and the mounted filesystem carries on), detach.
import { beforeAll, describe, expect, it } from 'vitest';
import { ROOT, runInVm, type VmResult } from '../support/vm.js';

let run: VmResult;

beforeAll(async () => {
  run = await runInVm(`
    U="node ${ROOT}/dist/cli/ulobdev.js"; D=/dev/ublkb0; LOG=/run/ulobdev/ublkb0.log
    T0=$(date +%s%N); at() { echo "[$(( ($(date +%s%N) - T0) / 1000000 )) ms] $1"; }
    modprobe -q crc32c_generic || true; modprobe ext4
    head -c 12M /dev/urandom > /tmp/disk.img && truncate -s 64M /tmp/disk.img
    A="$U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --daemon $D /tmp/disk.img"
    pid() { grep -o '"pid": *[0-9]*' /run/ulobdev/ublkb0.json | grep -o '[0-9]*$'; }

    # --- bad input: a kernel without ublk_drv (modprobe finds none): one line, exit 1, nothing made
    mkdir -p /tmp/nomod && printf '#!/bin/sh\\necho "modprobe: FATAL: Module ublk_drv not found in directory /lib/modules/$(uname -r)" >&2\\nexit 1\\n' > /tmp/nomod/modprobe && chmod +x /tmp/nomod/modprobe
    PATH=/tmp/nomod:$PATH $A > /tmp/nomod.out 2>&1 && rc=0 || rc=$?; echo "no driver: exit $rc, $(wc -l < /tmp/nomod.out) line(s): $(cat /tmp/nomod.out)"
    [ ! -e /tmp/d.cache ] && echo "no cache made without the driver"

    at "A > /dev/null && echo attached"
    $A > /dev/null && echo attached
    t0=$(date +%s%N)
    dd if=$D of=/tmp/r bs=1M count=8 iflag=direct status=none
    head -c 8M /tmp/disk.img | cmp - /tmp/r && echo "misses through the daemon verified"
    cat /sys/block/ublkb0/queue/logical_block_size /sys/block/ublkb0/queue/physical_block_size | tr '\\n' ' '; echo "sectors"

    at "# --- fio verify"
    # --- fio verify: two writers (clean cached blocks: intents; missing blocks written whole) and a reader at once
    fio --output=/tmp/fio.out --filename=$D --direct=1 --ioengine=libaio --bs=4k --verify=crc32c --verify_fatal=1 \\
      --name=cached --rw=randwrite --iodepth=16 --offset=0 --size=6M \\
      --name=missing --rw=randwrite --iodepth=16 --offset=16M --size=12M \\
      --name=reader --rw=randread --iodepth=8 --offset=32M --size=16M --verify=0 \\
      && echo "fio verify passed" || { echo "fio failed"; cat /tmp/fio.out; }
    at "# partial-block"
    # a write into part of a missing block (rule 5: the block is filled first), in data never read yet
    dd if=/dev/urandom of=/tmp/p bs=512 count=3 status=none
    dd if=/tmp/p of=$D bs=512 seek=20001 conv=fsync oflag=direct status=none
    dd if=$D bs=512 skip=20000 count=8 iflag=direct status=none > /tmp/p2
    { dd if=/tmp/disk.img bs=512 skip=20000 count=1 status=none; cat /tmp/p; dd if=/tmp/disk.img bs=512 skip=20004 count=4 status=none; } | cmp - /tmp/p2 && echo "partial write verified"

    at "# --- a filesystem"
    # --- a filesystem, a write-back flush: the disk then equals the device
    mkfs.ext4 -q -b 4096 $D && mkdir -p /tmp/m && mount $D /tmp/m
    head -c 4M /dev/urandom > /tmp/f && cp /tmp/f /tmp/m/f && sync
    umount /tmp/m
    fsck.ext4 -fn $D > /dev/null && echo "fsck clean"
    $U flush --wait $D > /dev/null && cmp $D /tmp/disk.img && echo "flushed: disk equals device"

    at "# --- FLUSH durability"
    # --- FLUSH durability and kill -9: fsync'd data survives, the same command takes the device back
    mount $D /tmp/m
    head -c 2M /dev/urandom > /tmp/g && cp /tmp/g /tmp/m/g && sync /tmp/m/g
    kill -9 $(pid)
    ( sleep 1; cat /tmp/m/f > /tmp/f.back && echo "read while no daemon ran: served" ) &
    R=$!
    $A > /tmp/again.out 2>&1 && echo "restarted" || { echo "restart failed:"; cat /tmp/again.out; }
    wait $R || true
    grep -q 'taken back from a daemon that died' $LOG && echo "recovered the device"
    cmp /tmp/g /tmp/m/g && cmp /tmp/f /tmp/f.back && echo "files after kill -9 verified"
    head -c 1M /dev/urandom > /tmp/h && cp /tmp/h /tmp/m/h && sync && cmp /tmp/h /tmp/m/h && echo "writes after recovery"
    umount /tmp/m && fsck.ext4 -fn $D > /dev/null && echo "fsck clean after kill -9"
    at "U status D --json"
    $U status $D --json > /tmp/status.json && node -e 'const j=JSON.parse(require("fs").readFileSync("/tmp/status.json","utf8"));const u=(Array.isArray(j)?j[0]:j).ublk;console.log("ublk status: "+u.attach+" readHits="+u.readHits+" writeHits="+u.writeHits+" failedUpcalls="+u.failedUpcalls)'
    echo "seconds: $(( ($(date +%s%N) - t0) / 1000000000 ))"
    at "U detach D"
    $U detach $D && echo detached
    [ ! -e $D ] && echo "device gone"
  `);
  if (process.env.ULOBVM_SHOW) process.stderr.write(run.output);
}, 600_000);

describe('ulobdev on /dev/ublkbN (6.12)', () => {
  it('without ublk_drv: one line, exit 1, nothing made', () => {
    expect(run.output).toMatch(/no driver: exit 1, 1 line\(s\): ulobdev: \/dev\/ublkb0 needs the kernel's ublk driver/);
    expect(run.output).toContain('no cache made without the driver');
  });
  it('fills misses, passes fio --verify with readers and writers at once, partial writes', () => {
    expect(run.output).toContain('attached');
    expect(run.output).toContain('misses through the daemon verified');
    expect(run.output).toContain('fio verify passed');
    expect(run.output).toContain('partial write verified');
  });
  it('carries ext4; a flush leaves the disk equal to the device', () => {
    expect(run.output).toContain('fsck clean');
    expect(run.output).toContain('flushed: disk equals device');
  });
  it('kill -9: the same command takes the device back, fsync-ed data and the mounted filesystem survive', () => {
    expect(run.output).toContain('restarted');
    expect(run.output).toContain('recovered the device');
    expect(run.output).toContain('read while no daemon ran: served');
    expect(run.output).toContain('files after kill -9 verified');
    expect(run.output).toContain('writes after recovery');
    expect(run.output).toContain('fsck clean after kill -9');
    expect(run.output).toMatch(/ublk status: recovered readHits=\d+ writeHits=\d+ failedUpcalls=0/);
  });
  it('detaches', () => {
    expect(run.output).toContain('detached');
    expect(run.output).toContain('device gone');
    expect(run.code).toBe(0);
  });
});
