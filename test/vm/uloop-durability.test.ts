// FLUSH durability on /dev/uloopN, recorded with dm-log-writes: the cache file, bitmap and metadata
// live on an ext4 that sits on a log-writes target; after each fsync of /dev/uloop0 a mark goes into
// the log. Replaying the log onto a blank device up to each mark, keeping only what a FLUSH (or FUA)
// covered (log-replay --strict: the least a power loss at that moment leaves), then recovering ext4
// and attaching that cache read-only must give a device whose bytes are exactly what had been
// written before that fsync (invariant 3 with 1 and 2: acknowledged + FLUSH survives, and no block
// is present over data that was not synced).
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';

const MARKS = 4;
let run: VmResult;

beforeAll(async () => {
  const vm = prepareVm() as unknown as Record<string, string>;
  run = await runInVm(`
    U="node ${ROOT}/dist/cli/ulobdev.js"; D=/dev/uloop0; R=${vm.LOG_REPLAY}
    insmod ${vm.ULOOP_KO}
    modprobe -q crc32c_generic || true; modprobe ext4; modprobe loop; modprobe dm-log-writes
    head -c 16M /dev/urandom > /tmp/disk.img && cp /tmp/disk.img /tmp/expect
    truncate -s 64M /tmp/data.img && truncate -s 512M /tmp/log.img
    DD=$(losetup -f --show /tmp/data.img); LD=$(losetup -f --show /tmp/log.img)
    dmsetup create --noudevsync lw --table "0 $(blockdev --getsz $DD) log-writes $DD $LD" && dmsetup mknodes lw
    mkfs.ext4 -q /dev/mapper/lw && mkdir -p /tmp/c /tmp/rp && mount /dev/mapper/lw /tmp/c
    $U -c /tmp/c/d.cache -b /tmp/c/d.bitmap --writeback --block-size 64K --daemon $D /tmp/disk.img > /dev/null
    # w OFFSET LEN: the same random bytes to the device and to the expected image
    w() { head -c $2 /dev/urandom > /tmp/w
          dd if=/tmp/w of=$D bs=$2 seek=$1 oflag=direct,seek_bytes conv=notrunc status=none
          dd if=/tmp/w of=/tmp/expect bs=$2 seek=$1 oflag=seek_bytes conv=notrunc status=none; }
    dd if=$D of=/dev/null bs=1M count=4 iflag=direct status=none       # 0..4M present, clean
    i=1; while [ $i -le ${MARKS} ]; do
      w $(( i * 65536 + 4096 )) 4096          # present clean block: intent
      w $(( (16 + i) * 65536 )) 65536          # whole missing block (rule 4)
      w $(( (64 + i) * 65536 + 512 )) 8192     # part of a missing block: fill first (rule 5)
      w $(( 1 * 65536 + 8192 )) 4096           # a block dirty since mark 1
      w $(( (100 + i) * 65536 )) 1048576       # 16 whole missing blocks
      sync $D
      sha256sum < /tmp/expect | cut -d' ' -f1 > /mnt/sum.$i
      dmsetup message lw 0 mark m$i
      w $(( (200 + i) * 65536 )) 65536         # written after the mark, never synced before it
      i=$((i+1))
    done
    $U detach $D > /dev/null && umount /tmp/c && dmsetup remove lw && echo "log complete"
    i=1; while [ $i -le ${MARKS} ]; do
      rm -f /tmp/s.img && truncate -s 64M /tmp/s.img
      $R /tmp/log.img /tmp/s.img m$i --strict
      S=$(losetup -f --show /tmp/s.img) && mount $S /tmp/rp
      $U -c /tmp/rp/d.cache -b /tmp/rp/d.bitmap --daemon /dev/uloop1 /tmp/disk.img > /dev/null
      got=$(sha256sum < /dev/uloop1 | cut -d' ' -f1)
      [ "$got" = "$(cat /mnt/sum.$i)" ] && echo "mark $i: device equals what was written before the fsync" || echo "mark $i: MISMATCH"
      $U detach /dev/uloop1 > /dev/null; umount /tmp/rp; losetup -d $S
      i=$((i+1))
    done
  `, { memoryMb: 1536, timeoutMs: 480_000 });
}, 900_000);

describe('FLUSH durability on /dev/uloopN (dm-log-writes replay)', () => {
  it('at every fsync mark, the replayed cache holds every write acknowledged before it', () => {
    expect(run.output).toContain('log complete');
    for (let i = 1; i <= MARKS; i++) expect(run.output).toContain(`mark ${i}: device equals what was written before the fsync`);
    expect(run.output).not.toContain('MISMATCH');
    expect(run.code).toBe(0);
  });
});
