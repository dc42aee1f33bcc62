// `ulobdev --writeback /dev/uloop0 disk.img` in the guest: the Node daemon on the kernel module.
// Misses fill through the engine, fio writes and verifies patterns, a filesystem is made, written,
// checked, and the device detaches.
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmPaths, type VmResult } from '../support/vm.js';

let vm: VmPaths;
let run: VmResult;

beforeAll(async () => {
  vm = prepareVm();
  run = await runInVm(`
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"
    insmod ${vm.ULOOP_KO}
    modprobe -q crc32c_generic || true; modprobe ext4
    head -c 8M /dev/urandom > /tmp/disk.img && truncate -s 64M /tmp/disk.img
    $U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --daemon /dev/uloop0 /tmp/disk.img
    dd if=/dev/uloop0 of=/tmp/r bs=1M count=8 iflag=direct status=none
    head -c 8M /tmp/disk.img | cmp - /tmp/r && echo "misses through the daemon verified"
    # A second device on the same N while its daemon lives: refused, told as what to do.
    truncate -s 16M /tmp/disk2.img
    $U -c /tmp/d2.cache -b /tmp/d2.bitmap --name other --daemon /dev/uloop0 /tmp/disk2.img || echo "second attach exit $?"
    # fio verify: cached clean blocks (dirty intents, rule 3), then missing ones written whole (rule 4).
    F="fio --filename=/dev/uloop0 --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=randwrite --verify=crc32c --verify_fatal=1 --do_verify=1 --output=/tmp/fio.out"
    $F --name=cached --offset=0 --size=8M && $F --name=missing --offset=32M --size=16M && echo "fio verify passed" || cat /tmp/fio.out
    # \`ulobdev hydrate\` at run time: a whole block written into never-read data (the kernel holds it
    # until the next barrier) must survive the hydrator's fill of that block (issue 11 item 3).
    head -c 4096 /dev/urandom > /tmp/blk && dd if=/tmp/blk of=/dev/uloop0 bs=4096 seek=15000 oflag=direct status=none
    $U hydrate --wait /dev/uloop0 > /dev/null && echo "hydrated at run time"
    dd if=/dev/uloop0 of=/tmp/blk2 bs=4096 skip=15000 count=1 iflag=direct status=none
    cmp /tmp/blk /tmp/blk2 && echo "hydrate kept the newer block"
    mkfs.ext4 -q -b 4096 /dev/uloop0 && mkdir -p /tmp/m && mount /dev/uloop0 /tmp/m
    head -c 4M /dev/urandom > /tmp/f && cp /tmp/f /tmp/m/f && sync
    umount /tmp/m
    fsck.ext4 -fn /dev/uloop0 > /dev/null && echo "fsck clean"
    mount -o ro /dev/uloop0 /tmp/m && cmp /tmp/f /tmp/m/f && echo "file verified" && umount /tmp/m
    $U status /dev/uloop0
    $U detach /dev/uloop0 && echo detached
    rmmod uloop && echo unloaded
  `);
}, 600_000);

describe('ulobdev on /dev/uloopN', () => {
  it('attaches, fills misses, carries a filesystem, detaches', () => {
    expect(run.output).toContain('misses through the daemon verified');
    expect(run.output).toMatch(/ulobdev: another daemon serves \/dev\/uloop0; detach it first, or pick a free one, e\.g\. \/dev\/uloop1\n/);
    expect(run.output).toContain('second attach exit 1');
    expect(run.output).toContain('fio verify passed');
    expect(run.output).toContain('hydrated at run time');
    expect(run.output).toContain('hydrate kept the newer block');
    expect(run.output).toContain('fsck clean');
    expect(run.output).toContain('file verified');
    expect(run.output).toContain('detached');
    expect(run.output).toContain('unloaded');
    expect(run.code).toBe(0);
  });
});
