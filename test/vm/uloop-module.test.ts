// uloop.ko in the guest without a daemon: load/unload cycles, a device over a cache file whose
// blocks are all present (every read and write is a hit), a filesystem on it, data verified
// through the device and in the cache file (all blocks present and dirty: no intents either), unload refused while a device exists.
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, runInVm, TCG_STARVATION, type VmPaths, type VmResult } from '../support/vm.js';

let vm: VmPaths;
let run: VmResult;

beforeAll(async () => {
  vm = prepareVm();
  run = await runInVm(`
    KO=${vm.ULOOP_KO}; CTL=${vm.ULOOPCTL}
    modprobe -q crc32c_generic || true; modprobe ext4
    for i in 1 2 3; do insmod $KO; rmmod uloop; done
    echo "cycles ok"
    insmod $KO
    ls -l /dev/uloop-control | cut -c1-10
    truncate -s 64M /tmp/cache
    N=$($CTL add /tmp/cache 67108864 65536 wb dirty)
    echo "added uloop$N"
    $CTL query $N
    blockdev --getsize64 /dev/uloop$N
    if rmmod uloop 2>/dev/null; then echo "rmmod with a device: accepted"; else echo "rmmod with a device: refused"; fi
    mkfs.ext4 -q -b 4096 /dev/uloop$N
    mkdir -p /tmp/m && mount /dev/uloop$N /tmp/m
    head -c 8M /dev/urandom > /tmp/data
    cp /tmp/data /tmp/m/data && sync
    umount /tmp/m
    fsck.ext4 -fn /dev/uloop$N >/dev/null && echo "fsck clean"
    mount -o ro /dev/uloop$N /tmp/m && cmp /tmp/data /tmp/m/data && echo "file verified"
    umount /tmp/m
    # raw pattern through the device, read back through the device and straight from the cache file
    dd if=/tmp/data of=/dev/uloop$N bs=4k seek=3000 oflag=direct status=none
    dd if=/dev/uloop$N of=/tmp/back bs=4k skip=3000 count=2048 iflag=direct status=none
    cmp /tmp/data /tmp/back && echo "device verified"
    dd if=/tmp/cache of=/tmp/back2 bs=4k skip=3000 count=2048 status=none
    cmp /tmp/data /tmp/back2 && echo "cache file verified"
    $CTL query $N
    if $CTL remove $N; then echo removed; fi
    rmmod uloop && echo "unloaded"
  `, { allowSplats: TCG_STARVATION });
}, 600_000);

describe('uloop.ko, hits only', () => {
  it('loads and unloads repeatedly', () => {
    expect(run.output).toContain('cycles ok');
    expect(run.output).toContain('crw-------');
  });
  it('serves a filesystem from the cache file', () => {
    expect(run.output).toContain('added uloop0');
    expect(run.output).toMatch(/^67108864$/m);
    expect(run.output).toContain('fsck clean');
    expect(run.output).toContain('file verified');
    expect(run.output).toContain('device verified');
    expect(run.output).toContain('cache file verified');
  });
  it('refuses unload while a device exists, then removes the device and unloads', () => {
    expect(run.output).toContain('rmmod with a device: refused');
    expect(run.output).toContain('removed');
    expect(run.output).toContain('unloaded');
    expect(run.code).toBe(0);
  });
});
