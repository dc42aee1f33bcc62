// The module's main path on the kernels the rest of the VM suite does not boot in `make test`:
// Debian 12's 6.1 and the newest 7.x of trixie-backports (the suite itself runs on 6.12). One guest
// per kernel: uloop.ko built for it loads, `ulobdev --writeback` attaches /dev/uloop0 over a disk
// image, misses fill, fio writes and verifies, ext4 is made and checked, a flush makes the backing
// image equal to the device, detach and rmmod leave nothing behind; the harness fails the run on
// any kernel splat. With ULOBVM_KERNEL set (make test-kernels) it runs on that kernel only.
import { beforeAll, describe, expect, it } from 'vitest';
import { KERNEL_SERIES, prepareVm, ROOT, runInVm, type KernelSeries, type VmResult } from '../support/vm.js';

const kernels: KernelSeries[] = process.env.ULOBVM_KERNEL ? [prepareVm().SERIES] : ['6.1', 'newest'];

describe.each(kernels.filter((k) => KERNEL_SERIES.includes(k)))('uloop.ko smoke run on %s', (kernel) => {
  let run: VmResult;

  beforeAll(async () => {
    const vm = prepareVm(kernel);
    run = await runInVm(
      `
      U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; D=/dev/uloop0
      uname -r
      modprobe -q crc32c_generic || true; modprobe ext4
      insmod ${vm.ULOOP_KO} && echo "insmod ok"
      head -c 8M /dev/urandom > /tmp/disk.img && truncate -s 64M /tmp/disk.img
      $U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --daemon $D /tmp/disk.img > /dev/null
      dd if=$D of=/tmp/r bs=1M count=8 iflag=direct status=none
      head -c 8M /tmp/disk.img | cmp - /tmp/r && echo "misses verified"
      F="fio --filename=$D --direct=1 --ioengine=libaio --iodepth=16 --bs=4k --rw=randwrite --verify=crc32c --verify_fatal=1 --do_verify=1 --output=/tmp/fio.out"
      if $F --name=cached --offset=0 --size=8M && $F --name=missing --offset=32M --size=8M; then echo "fio verify passed"; else cat /tmp/fio.out; fi
      mkfs.ext4 -q -b 4096 $D && mkdir -p /tmp/m && mount $D /tmp/m
      head -c 4M /dev/urandom > /tmp/f && cp /tmp/f /tmp/m/f && sync
      umount /tmp/m
      fsck.ext4 -fn $D > /dev/null && echo "fsck clean"
      $U flush --wait $D > /dev/null
      cmp /tmp/disk.img $D && echo "flushed: backing equals device"
      fsck.ext4 -fn /tmp/disk.img > /dev/null && echo "backing fsck clean"
      $U detach $D && echo detached
      rmmod uloop && echo unloaded
      [ ! -e /dev/uloop-control ] && echo "control gone"
      `,
      { kernel },
    );
  }, 600_000);

  it('loads, attaches, carries fio verify and ext4, flushes, detaches, unloads', () => {
    expect(run.output).toContain(run.kernel.KVER);
    for (const line of ['insmod ok', 'misses verified', 'fio verify passed', 'fsck clean', 'flushed: backing equals device', 'backing fsck clean', 'detached', 'unloaded', 'control gone']) {
      expect(run.output).toContain(line);
    }
    expect(run.code).toBe(0);
    expect(run.splats).toEqual([]);
  });
});
