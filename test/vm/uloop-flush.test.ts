// `ulobdev flush` on /dev/uloopN: the flusher's epoch runs in the kernel (EPOCH_BEGIN/COMMIT) and in
// the store. After a flush the backing file equals the device and the kernel holds no dirty bit; a
// later write to a cleaned block sends a fresh INTENT (the store's dirty bit returns before any
// FLUSH); blocks rewritten while a flush runs stay dirty, so a flush after the writes stop leaves
// the backing file equal to the device again.
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmPaths, type VmResult } from '../support/vm.js';

let vm: VmPaths;
let run: VmResult;

beforeAll(async () => {
  vm = prepareVm();
  run = await runInVm(`
    U="node ${ROOT}/dist/cli/ulobdev.js"; CTL=${vm.ULOOPCTL}; D=/dev/uloop0
    insmod ${vm.ULOOP_KO}
    head -c 8M /dev/urandom > /tmp/disk.img && truncate -s 32M /tmp/disk.img
    $U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --block-size 64K --daemon $D /tmp/disk.img --log-level info
    dirty() { $U status $D --json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s);console.log((Array.isArray(j)?j[0]:j).dirtyBytes)})'; }
    kdirty() { $CTL query 0 | sed 's/.* dirty=\\([0-9]*\\).*/\\1/'; }
    same() { cmp /tmp/disk.img $D && echo "backing equals device: $1"; }

    # everything present and clean except 20M..21M (no later miss wakes the disk, so no
    # opportunistic flush races with the checks below)
    dd if=$D of=/dev/null bs=1M count=20 iflag=direct status=none
    dd if=$D of=/dev/null bs=1M skip=21 iflag=direct status=none
    head -c 262144 /dev/urandom | dd of=$D bs=64k iflag=fullblock seek=16 oflag=direct conv=notrunc status=none  # intents
    head -c 1048576 /dev/urandom | dd of=$D bs=1M iflag=fullblock seek=20 oflag=direct conv=notrunc,fsync status=none # rule 4 + barrier
    echo "before flush: kernel dirty=$(kdirty) store dirty=$(dirty)"
    $U flush --wait $D > /dev/null
    echo "after flush 1: kernel dirty=$(kdirty) store dirty=$(dirty)"
    same 1

    # a flushed block written again: no FLUSH, so only an INTENT can make the store's bit return
    head -c 4096 /dev/urandom | dd of=$D bs=4k iflag=fullblock seek=260 oflag=direct conv=notrunc status=none
    echo "rewritten: kernel dirty=$(kdirty) store dirty=$(dirty)"
    $U flush --wait $D > /dev/null
    echo "after flush 2: kernel dirty=$(kdirty) store dirty=$(dirty)"
    same 2

    # writes racing with flushes: whatever a flush copied of a block rewritten meanwhile, the block
    # stays dirty; once the writes stop, one more flush makes the backing file exact
    ( i=0; while [ $i -lt 300 ]; do
        head -c 4096 /dev/urandom | dd of=$D bs=4k iflag=fullblock seek=$(( (i * 37) % 2048 )) oflag=direct conv=notrunc status=none; i=$((i+1)); done ) & W=$!
    n=0; while kill -0 $W 2>/dev/null; do $U flush --wait $D > /dev/null; n=$((n+1)); done
    wait $W
    echo "flushes during writes: $n"
    $U flush --wait $D > /dev/null
    echo "after flush 3: kernel dirty=$(kdirty) store dirty=$(dirty)"
    same 3
    $U detach $D && echo detached
    rmmod uloop && echo unloaded
  `);
}, 600_000);

describe('ulobdev flush on /dev/uloopN', () => {
  it('writes the dirty blocks back and clears the dirty bits in the kernel and the store', () => {
    // 4 intents + 16 whole-block writes; the daemon may already have flushed them on its own
    // (an opportunistic flush after a source read), which must leave both sides clean as well
    expect(run.output).toMatch(/before flush: kernel dirty=(20 store dirty=1310720|20 store dirty=0|0 store dirty=0)$/m);
    expect(run.output).toMatch(/after flush 1: kernel dirty=0 store dirty=0$/m);
    expect(run.output).toContain('backing equals device: 1');
  });
  it('asks for a fresh intent when a cleaned block is written again', () => {
    expect(run.output).toMatch(/rewritten: kernel dirty=1 store dirty=65536$/m);
    expect(run.output).toMatch(/after flush 2: kernel dirty=0 store dirty=0$/m);
    expect(run.output).toContain('backing equals device: 2');
  });
  it('keeps blocks rewritten during a flush dirty for the next one', () => {
    expect(run.output).toMatch(/flushes during writes: [1-9]/);
    expect(run.output).toMatch(/after flush 3: kernel dirty=0 store dirty=0$/m);
    expect(run.output).toContain('backing equals device: 3');
    expect(run.output).toContain('unloaded');
    expect(run.code).toBe(0);
  });
});
