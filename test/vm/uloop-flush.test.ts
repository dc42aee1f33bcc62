// `ulobdev flush` on /dev/uloopN: the flusher's epoch runs in the kernel (EPOCH_BEGIN/COMMIT) and in
// the store. After a flush the backing file equals the device and the kernel holds no dirty bit; a
// later write to a cleaned block sends a fresh INTENT (the store's dirty bit returns before any
// FLUSH); blocks rewritten while a flush runs stay dirty, so a flush after the writes stop leaves
// the backing file equal to the device again. Then (issue 11 item 7) a fresh cache: whole blocks
// written into missing blocks, held dirty only by the kernel, count in status and toward --dirty-max;
// and --on-ac flush waits while the kernel serves hits without the daemon (QUERY counters).
import { beforeAll, describe, expect, it } from 'vitest';
import { prepareVm, ROOT, runInVm, type VmPaths, type VmResult } from '../support/vm.js';
import { statusShell } from './uloop-tools.js';

let vm: VmPaths;
let run: VmResult;

beforeAll(async () => {
  vm = prepareVm();
  run = await runInVm(`
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; CTL=${vm.ULOOPCTL}; D=/dev/uloop0
    insmod ${vm.ULOOP_KO}
    head -c 8M /dev/urandom > /tmp/disk.img && truncate -s 32M /tmp/disk.img
    $U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --block-size 64K --daemon $D /tmp/disk.img --log-level info
    # status over the control socket (ulobctl and jq: statusShell in uloop-tools.ts), not by
    # \`ulobdev status --json | node -e\`: two Node starts, seconds of guest time each under TCG
    ${statusShell()}
    dirty() { sj uloop0 .dirtyBytes; }
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

    # --dirty-max on dirty data only the kernel holds (issue 11 item 7): a fresh cache, so every
    # block is missing; whole blocks written into missing blocks and no FLUSH are the kernel's
    # pending set (dirty there, in no store bitmap yet). status counts them; crossing --dirty-max
    # starts a flush (reason threshold) with no FLUSH from anyone.
    LOG=/run/ulobdev/uloop0.log; rm -f $LOG
    pend() { $CTL query 0 | sed 's/.* dirty=\\([0-9]*\\).* pending=\\([0-9]*\\).*/dirty=\\1 pending=\\2/'; }
    reasons() { grep -o '"reason":"[a-z]*"' $LOG | sort | uniq -c | tr -s ' \\n' ' '; }
    $U -c /tmp/e.cache -b /tmp/e.bitmap --writeback --block-size 64K --dirty-max 1M --daemon $D /tmp/disk.img --log-level info
    head -c 524288 /dev/urandom | dd of=$D bs=64k iflag=fullblock seek=40 oflag=direct conv=notrunc status=none
    sleep 3
    echo "below dirty-max: kernel $(pend) status dirty=$(dirty) flushes [$(reasons)]"
    head -c 1048576 /dev/urandom | dd of=$D bs=64k iflag=fullblock seek=80 oflag=direct conv=notrunc status=none
    i=0; while [ $i -lt 40 ] && ! grep -q 'flushed dirty blocks' $LOG; do sleep 1; i=$((i+1)); done
    sleep 1
    echo "over dirty-max: kernel $(pend) status dirty=$(dirty) flushes [$(reasons)]"
    same 4
    $U detach $D > /dev/null

    # --on-ac flush waits for quiet: hits the kernel serves without the daemon are activity
    # (QUERY's counters), so no flush while a reader keeps hitting present blocks; once it stops,
    # the flush comes (quiet 5 s). No power supply in the guest: on mains, as a NAS.
    rm -f $LOG
    $U -c /tmp/e.cache -b /tmp/e.bitmap --writeback --block-size 64K --on-ac flush --daemon $D /tmp/disk.img --log-level info
    dd if=$D of=/dev/null bs=64k count=16 iflag=direct status=none
    head -c 4096 /dev/urandom | dd of=$D bs=4k iflag=fullblock seek=3 oflag=direct conv=notrunc status=none # an intent
    h0=$($CTL query 0 | sed 's/.* read_hits=\\([0-9]*\\).*/\\1/')
    t0=$(date +%s); while [ $(( $(date +%s) - t0 )) -lt 12 ]; do dd if=$D of=/dev/null bs=64k count=16 iflag=direct status=none; done
    h1=$($CTL query 0 | sed 's/.* read_hits=\\([0-9]*\\).*/\\1/')
    echo "while reading: kernel hits $((h1 - h0)) $(pend) flushes [$(reasons)]"
    i=0; while [ $i -lt 30 ] && ! grep -q 'flushed dirty blocks' $LOG; do sleep 1; i=$((i+1)); done
    echo "quiet: kernel $(pend) flushes [$(reasons)] after $i s"
    same 5
    $U detach $D > /dev/null
    rmmod uloop && echo unloaded
  `, { timeoutMs: 720_000 });
}, 900_000);

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
  });
  it('counts blocks only the kernel holds dirty in status and toward --dirty-max', () => {
    // 8 whole blocks pending in the kernel: status shows 512 KiB, below 1 MiB nothing flushes
    expect(run.output).toMatch(/below dirty-max: kernel dirty=8 pending=8 status dirty=524288 flushes \[\]$/m);
    // 16 more (1.5 MiB): a flush for the threshold, and nothing is dirty after it
    expect(run.output).toMatch(/over dirty-max: kernel dirty=0 pending=0 status dirty=0 flushes \[ ?1 "reason":"threshold" ?\]$/m);
    expect(run.output).toContain('backing equals device: 4');
  });
  it('--on-ac flush waits while the kernel serves hits without the daemon, and flushes once quiet', () => {
    const reading = /while reading: kernel hits (\d+) dirty=(\d+) pending=0 flushes \[(.*)\]$/m.exec(run.output);
    expect(reading, run.output).not.toBeNull();
    expect(Number(reading![1])).toBeGreaterThan(50);
    expect(reading![2], 'an --on-ac flush ran while the kernel was serving hits').toBe('1');
    expect(reading![3]).toBe('');
    expect(run.output).toMatch(/quiet: kernel dirty=0 pending=0 flushes \[ ?1 "reason":"ac" ?\] after \d+ s$/m);
    expect(run.output).toContain('backing equals device: 5');
    expect(run.output).toContain('unloaded');
    expect(run.code).toBe(0);
  });
});
