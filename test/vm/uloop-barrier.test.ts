// The FLUSH barrier of uloop.ko hands the daemon only blocks whose data its sync covered
// (invariant 1): the pending set (blocks written whole while missing) is taken before the cache
// file is synced, so a write that completes during the sync waits for the next barrier.
// 4 writers write every block of the device once (rule 4: no upcall), spread over time, while
// FLUSHes run in a loop; the cache file's ext4 sits on a slow disk (dm-delay), so each sync takes
// long enough for writes to land in it (no journal: ext4's commit would write some of them out
// again inside the sync and hide part of the race). At each BARRIER the C daemon looks at the page-cache state
// of every block it was handed (/proc/kpageflags through its own mapping of the cache file): a page
// still dirty or under writeback was reported before it was durable. With the bits taken after
// the sync (the order before this fix) about a hundred per barrier are; with the fix, none. Every block
// written is then read back through the device.
import { beforeAll, describe, expect, it } from 'vitest';
import { expectCleanKernel, prepareVm, runInVm, TCG_STARVATION, type VmResult } from '../support/vm.js';
import { buildTool } from './uloop-tools.js';

let run: VmResult;
const BLOCKS = 4096; // 16 MiB at 4 KiB

beforeAll(async () => {
  const vm = prepareVm();
  const writer = buildTool('uloop-writer');
  run = await runInVm(`
    CTL=${vm.ULOOPCTL}; W=${writer}
    modprobe -q crc32c_generic || true # ext4 needs it on 6.12; Debian's 7.x has no such module
    modprobe ext4; modprobe loop; modprobe dm-delay
    insmod ${vm.ULOOP_KO}
    truncate -s 128M /tmp/data.img && DD=$(losetup -f --show /tmp/data.img)
    dmsetup create --noudevsync slow --table "0 $(blockdev --getsz $DD) delay $DD 0 0 $DD 0 100" && dmsetup mknodes slow
    mkfs.ext4 -q -O ^has_journal -E lazy_itable_init=0 /dev/mapper/slow
    mkdir -p /tmp/c && mount -o noatime /dev/mapper/slow /tmp/c
    truncate -s 16M /tmp/c/cache && truncate -s 16M /tmp/src
    N=$($CTL add /tmp/c/cache 16777216 4096 wb none)
    $CTL serve $N /tmp/src /tmp/c/cache --check-durable > /tmp/serve.log & S=$!
    ( while [ ! -f /tmp/stop ]; do sync /dev/uloop$N; done ) & FL=$!
    $W write /dev/uloop$N 4096 0 ${BLOCKS} 4 1 0 1000 && echo "writers done"
    touch /tmp/stop; wait $FL
    sync /dev/uloop$N
    grep '^barrier' /tmp/serve.log
    $W expect /dev/uloop$N 4096 0 ${BLOCKS} 1 && echo "device verified"
    echo "q: $($CTL query $N)"
    kill $S; wait $S 2>/dev/null || true
    $CTL remove $N && umount /tmp/c && dmsetup remove slow && losetup -d $DD && echo "cleaned up"
  `, { timeoutMs: 300_000, allowSplats: TCG_STARVATION });
}, 600_000);

describe('FLUSH barrier order on /dev/uloopN', () => {
  it('reports at each barrier only blocks whose data the sync before it wrote back', () => {
    expect(run.output).toContain('writers done');
    const checks = run.output.split('\n').filter((l) => /^barrier \d+ durable-check/.test(l));
    console.log(checks.join('\n'));
    expect(checks.length).toBeGreaterThanOrEqual(3);
    for (const l of checks) expect(l, 'a barrier reported blocks whose pages were not written back').toMatch(/unsynced=0 unknown=0$/);
    const reported = run.output.match(/^barrier present=\d+/gm)!.reduce((n, l) => n + Number(l.split('=')[1]), 0);
    expect(reported).toBe(BLOCKS);
    expect(run.output).toContain('device verified');
    expect(run.output).toContain('cleaned up');
    expect(run.code).toBe(0);
    expectCleanKernel(run);
  });
});
