// The /dev/nbdN frontend against the kernel's NBD client (nbd.ko via nbd-client) in the guest:
// ext4 made, written, checked; detach and re-attach keep the files; after `ulobdev flush --wait`
// the backing image equals what the device returned before the detach.
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';

let run: VmResult;

beforeAll(async () => {
  prepareVm();
  run = await runInVm(`
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; D=/dev/nbd0
    A="-c /tmp/d.cache -b /tmp/d.bitmap --writeback --daemon $D /tmp/disk.img"
    modprobe nbd; modprobe -q crc32c_generic || true; modprobe ext4
    head -c 4M /dev/urandom > /tmp/disk.img && truncate -s 32M /tmp/disk.img
    $U $A
    dd if=$D of=/tmp/r bs=1M count=4 iflag=direct status=none
    head -c 4M /tmp/disk.img | cmp - /tmp/r && echo "misses through nbd verified"
    mkfs.ext4 -q -b 4096 $D && mkdir -p /tmp/m && mount $D /tmp/m
    head -c 3M /dev/urandom > /tmp/f1 && head -c 100K /dev/urandom > /tmp/f2
    cp /tmp/f1 /tmp/m/f1 && mkdir /tmp/m/d && cp /tmp/f2 /tmp/m/d/f2 && sync
    umount /tmp/m
    fsck.ext4 -fn $D > /dev/null && echo "fsck clean"
    $U flush --wait $D > /dev/null && echo flushed
    dd if=$D of=/tmp/dev.img bs=1M iflag=direct status=none
    cmp /tmp/disk.img /tmp/dev.img && echo "backing equals device after flush"
    $U detach $D && echo detached
    [ -z "$(cat /sys/block/nbd0/pid 2>/dev/null)" ] && echo "nbd0 disconnected"
    $U $A
    mount -o ro $D /tmp/m && cmp /tmp/f1 /tmp/m/f1 && cmp /tmp/f2 /tmp/m/d/f2 && echo "files verified after re-attach"
    umount /tmp/m
    $U detach $D && echo "detached again"
  `, { timeoutMs: 480_000 });
}, 900_000);

describe('ulobdev on /dev/nbdN (kernel NBD client)', () => {
  it('carries a filesystem through detach and re-attach; flush makes the backing image equal', () => {
    expect(run.output).toContain('misses through nbd verified');
    expect(run.output).toContain('fsck clean');
    expect(run.output).toContain('flushed');
    expect(run.output).toContain('backing equals device after flush');
    expect(run.output).toContain('nbd0 disconnected');
    expect(run.output).toContain('files verified after re-attach');
    expect(run.output).toContain('detached again');
    expect(run.code).toBe(0);
  });
});
