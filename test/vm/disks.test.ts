// Real disk shapes in the guest, where the kernel has nbd, partition parsers and scsi_debug: a
// 4096-byte-sector SCSI disk shows 4096 through /dev/nbdN; kill -9 of that daemon leaves /dev/nbd0
// connected to nothing, and the same attach command disconnects it and attaches again; a GPT made
// through the cache shows /dev/nbd0p1 after a re-attach and holds the detach while mounted; a 512e
// disk (512 logical, 4096 physical) gives NBD clients 512 as minimum and 4096 as preferred block
// size, and its partitions show on /dev/loopN by the kernel's own scan; a SCSI disk deleted under
// the daemon shows as gone in status. /dev/uloop0 (module ABI 2: sector sizes at ADD) shows the
// disk's 4096 too, with no warning.
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';

let run: VmResult;

beforeAll(async () => {
  const vm = prepareVm();
  run = await runInVm(
    `
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"
    modprobe loop; modprobe nbd max_part=15; modprobe fuse; modprobe crc32c_generic; modprobe ext4; modprobe sd_mod
    sdebug() {
      for i in $(seq 100); do
        for m in /sys/block/sd*/device/model; do [ -e "$m" ] && grep -q scsi_debug "$m" && { d=\${m#/sys/block/}; echo \${d%%/*}; return; }; done
        sleep 0.1
      done
    }
    # Node starts slowly under TCG: few commands, JSON read with sed.
    state() { $U status /dev/nbd0 --json | sed -n 's/.*"state": "\\([a-z]*\\)".*/\\1/p'; }

    modprobe scsi_debug dev_size_mb=64 sector_size=4096 physblk_exp=0
    S=$(sdebug); echo "4Kn disk /dev/$S: $(blockdev --getss --getpbsz /dev/$S | tr '\\n' ' ')"
    # uloop.ko of ABI 2 takes the disk's sector sizes at ADD.
    insmod ${vm.ULOOP_KO}
    $U -c /tmp/u.cache -b /tmp/u.bitmap --daemon /dev/uloop0 /dev/$S
    echo "uloop0 sectors: $(blockdev --getss --getpbsz /dev/uloop0 | tr '\\n' ' ')"
    $U detach /dev/uloop0 > /dev/null && echo "uloop0 detached"
    A="-c /tmp/n.cache -b /tmp/n.bitmap --writeback --daemon /dev/nbd0 /dev/$S"
    $U $A
    echo "nbd0 sectors: $(blockdev --getss --getpbsz /dev/nbd0 | tr '\\n' ' ')"
    sgdisk -n 1:256:+24M -n 2:0:0 /dev/nbd0 > /dev/null
    kill -9 $(sed 's/.*"pid":\\([0-9]*\\).*/\\1/' /run/ulobdev/nbd0.json); sleep 1
    $U $A
    echo "after recovery: $(blockdev --getss /dev/nbd0) $(ls /sys/block/nbd0 | grep -c '^nbd0p') partitions"
    mkfs.ext4 -q /dev/nbd0p1 && mkdir -p /tmp/m && mount /dev/nbd0p1 /tmp/m
    $U detach /dev/nbd0 || true
    umount /tmp/m
    echo "before delete: $(state)"
    echo 1 > /sys/block/$S/device/delete; sleep 1
    echo "after delete: $(state)"
    $U detach /dev/nbd0 && echo "nbd0 detached"
    modprobe -r scsi_debug

    modprobe scsi_debug dev_size_mb=64 sector_size=512 physblk_exp=3
    S=$(sdebug); echo "512e disk /dev/$S: $(blockdev --getss --getpbsz /dev/$S | tr '\\n' ' ')"
    # scsi_debug gives this disk the deleted one's WWN: to ulobdev it is the same disk, whose n.cache
    # still holds the dirty GPT and ext4 (the disk went away under it), and its disk record would
    # refuse l.cache for it. The user's way out, taken here:
    $U discard --force -c /tmp/n.cache -b /tmp/n.bitmap /dev/$S
    sgdisk -n 1:2048:+16M -n 2:0:0 /dev/$S > /dev/null
    L=$(losetup -f); N=\${L#/dev/}
    $U -c /tmp/l.cache -b /tmp/l.bitmap --daemon $L /dev/$S
    echo "loop partitions by the kernel: $(ls /sys/block/$N | grep -c "^\${N}p") sectors $(blockdev --getss --getpbsz $L | tr '\\n' ' ')"
    echo "partx lines: $(grep -c partx /run/ulobdev/$N.log || true)"
    nbdinfo --json "nbd+unix:///ulobdev?socket=/run/ulobdev/$N/nbd.sock" | tr -d ' \\t\\n' | sed 's/.*"block_size_minimum":\\([0-9]*\\),"block_size_preferred":\\([0-9]*\\).*/512e nbd block sizes: \\1 \\2\\n/'
    $U detach $L > /dev/null && echo "loop detached"
    `,
    { timeoutMs: 600_000 },
  );
}, 900_000);

describe('disk shapes in the guest', () => {
  it('4Kn disk: 4096 on /dev/nbd0; kill -9 recovered by the same attach; partitions hold the detach', () => {
    expect(run.output).toContain('4Kn disk /dev/sd');
    expect(run.output).toMatch(/4Kn disk \/dev\/sd\w+: 4096 4096/);
    expect(run.output).not.toContain('shows 512-byte sectors');
    expect(run.output).toContain('uloop0 sectors: 4096 4096 \nuloop0 detached');
    expect(run.output).toContain('nbd0 sectors: 4096 4096');
    expect(run.output).toMatch(/recovered after an unclean shutdown: the daemon of \/dev\/nbd0 \(pid \d+\) had died; disconnected \/dev\/nbd0/);
    expect(run.output).toContain('after recovery: 4096 2 partitions');
    expect(run.output).toMatch(/\/dev\/nbd0 stays attached: \/dev\/nbd0p1 is mounted on \/tmp\/m; unmount it first/);
  });

  it('a deleted disk is gone in status', () => {
    expect(run.output).toContain('before delete: ok');
    expect(run.output).toContain('after delete: gone');
    expect(run.output).toContain('nbd0 detached');
  });

  it('512e disk: NBD minimum 512, preferred 4096; partitions on /dev/loopN by the kernel scan', () => {
    expect(run.output).toMatch(/512e disk \/dev\/sd\w+: 512 4096/);
    expect(run.output).toContain('512e nbd block sizes: 512 4096');
    expect(run.output).toContain('loop partitions by the kernel: 2 sectors 512 512');
    expect(run.output).toContain('partx lines: 0');
    expect(run.output).toContain('loop detached');
    expect(run.code).toBe(0);
  });
});
