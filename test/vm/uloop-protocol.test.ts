// uloop.ko's request channel with the C client (test/vm/uloopctl.c) as the daemon: misses filled
// from a slow source, dirty intents before a clean block changes, barriers carrying the bits of
// whole-block writes to missing blocks, partial writes to missing blocks filled first, a daemon
// killed with I/O in flight and re-attached, and EIO once no daemon returns in time.
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, runInVm, TCG_STARVATION, type VmPaths, type VmResult } from '../support/vm.js';

let vm: VmPaths;
let run: VmResult;

beforeAll(async () => {
  vm = prepareVm();
  run = await runInVm(`
    CTL=${vm.ULOOPCTL}
    insmod ${vm.ULOOP_KO} reattach_timeout_s=4
    head -c 16M /dev/urandom > /tmp/src
    truncate -s 16M /tmp/cache
    N=$($CTL add /tmp/cache 16777216 65536 wb none)
    D=/dev/uloop$N
    $CTL serve $N /tmp/src /tmp/cache 5 > /tmp/serve.log & PID=$!
    dd if=$D of=/tmp/r bs=1M iflag=direct status=none
    cmp /tmp/src /tmp/r && echo "misses verified"
    echo "misses: $(grep -c '^miss' /tmp/serve.log)"
    $CTL query $N

    # rule 3: a write into a present clean block asks for the intent first
    head -c 4096 /dev/urandom > /tmp/w1
    dd if=/tmp/w1 of=$D bs=4k seek=1 oflag=direct conv=notrunc status=none
    grep '^intent' /tmp/serve.log
    $CTL query $N

    # a second device over a fresh cache: whole-block writes to missing blocks need no daemon
    # round trip, and are reported at the next FLUSH; a partial one is filled first (rule 5)
    truncate -s 16M /tmp/cache2
    M=$($CTL add /tmp/cache2 16777216 65536 wb none)
    $CTL serve $M /tmp/src /tmp/cache2 > /tmp/serve2.log & PID2=$!
    head -c 131072 /dev/urandom > /tmp/w2
    dd if=/tmp/w2 of=/dev/uloop$M bs=64k seek=4 oflag=direct conv=notrunc,fsync status=none
    dd if=/tmp/w1 of=/dev/uloop$M bs=4k seek=161 oflag=direct conv=notrunc,fsync status=none
    cat /tmp/serve2.log
    dd if=/dev/uloop$M of=/tmp/r2 bs=64k skip=4 count=2 iflag=direct status=none
    cmp /tmp/w2 /tmp/r2 && echo "whole-block write verified"
    dd if=/dev/uloop$M of=/tmp/r3 bs=64k skip=10 count=1 iflag=direct status=none
    dd if=/tmp/src of=/tmp/e3 bs=64k skip=10 count=1 status=none
    dd if=/tmp/w1 of=/tmp/e3 bs=4k seek=1 conv=notrunc status=none
    cmp /tmp/e3 /tmp/r3 && echo "partial write verified"
    $CTL query $M

    # daemon killed with a miss in flight; a new daemon re-attaches and gets it again
    kill -9 $PID2; wait $PID2 2>/dev/null || true
    dd if=/dev/uloop$M of=/tmp/r4 bs=64k skip=100 count=4 iflag=direct status=none & DD=$!
    sleep 1
    $CTL query $M
    $CTL serve $M /tmp/src /tmp/cache2 > /tmp/serve3.log & PID3=$!
    wait $DD && dd if=/tmp/src of=/tmp/e4 bs=64k skip=100 count=4 status=none && cmp /tmp/e4 /tmp/r4 && echo "re-attach verified"

    # no daemon comes back: EIO after reattach_timeout_s
    kill -9 $PID3; wait $PID3 2>/dev/null || true
    T0=$(date +%s)
    if dd if=/dev/uloop$M of=/dev/null bs=64k skip=200 count=1 iflag=direct status=none 2>/dev/null; then echo "timeout: read succeeded"; else echo "timeout: EIO after $(( $(date +%s) - T0 )) s"; fi

    kill -9 $PID; wait $PID 2>/dev/null || true
    $CTL remove $N && $CTL remove $M && rmmod uloop && echo "unloaded"
  `, { allowSplats: TCG_STARVATION });
}, 600_000);

describe('uloop.ko request channel', () => {
  it('fills misses through the daemon', () => {
    expect(run.output).toContain('misses verified');
    expect(run.output).toMatch(/present=256 dirty=0/);
  });
  it('asks for the dirty intent before changing a clean block', () => {
    expect(run.output).toMatch(/^intent 0\+65536$/m);
    expect(run.output).toMatch(/present=256 dirty=1 /);
  });
  it('reports whole-block writes at the barrier and fills partly written missing blocks first', () => {
    expect(run.output).toMatch(/^barrier present=2 dirty=2$/m);
    expect(run.output).toMatch(/^miss 655360\+65536$/m);
    expect(run.output).toContain('whole-block write verified');
    expect(run.output).toContain('partial write verified');
  });
  it('re-issues requests to a re-attached daemon and fails them with EIO when none comes', () => {
    expect(run.output).toMatch(/attached=0 waiting=1/);
    expect(run.output).toContain('re-attach verified');
    expect(run.output).toMatch(/timeout: EIO after [4-9] s/);
    expect(run.output).toContain('unloaded');
    expect(run.code).toBe(0);
  });
});
