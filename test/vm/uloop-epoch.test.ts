// Point-in-time flush epochs on /dev/uloopN (invariant 7, ULOOP_F_PRESERVE): the C daemon is the
// flusher (EPOCH_BEGIN, sync, copy the snapshot's blocks to the backing file slowly, sync,
// EPOCH_COMMIT) and answers PRESERVE upcalls by keeping the block's current content for the epoch.
// A writer rewrites random 4 KiB pieces of the device all the while; it is stopped only around
// EPOCH_BEGIN, to read the device's image at that instant. After each COMMIT the backing file must
// equal that image exactly, though most blocks were rewritten while they were copied. The same
// run on a device added without ULOOP_F_PRESERVE (the kernel before this) gives a backing file
// with newer content: the control that this test can fail. With EPOCH_RELEASE (the flusher
// releases blocks it has read) the image is as exact with fewer PRESERVEs. Blocks rewritten during
// an epoch stay dirty; once the writer stops, one more flush makes the backing file equal the
// device.
import { beforeAll, describe, expect, it } from 'vitest';
import { expectCleanKernel, prepareVm, runInVm, TCG_STARVATION, type VmResult } from '../support/vm.js';
import { buildTool } from './uloop-tools.js';

let run: VmResult;

const WAITFOR = `waitfor() { i=0; while ! grep -q "$1" "$2"; do i=$((i+1)); if [ $i -gt \${3:-600} ]; then echo "timeout waiting for '$1' in $2"; tail -5 "$2"; return 1; fi; sleep 0.1; done; }`;

beforeAll(async () => {
  const vm = prepareVm();
  const writer = buildTool('uloop-writer');
  run = await runInVm(`
    CTL=${vm.ULOOPCTL}; W=${writer}
    ${WAITFOR}
    insmod ${vm.ULOOP_KO}
    # epochs NAME FLAGS N [--release]: N flush epochs racing the writer on a fresh device
    epochs() {
      name=$1; flags=$2; epochs=$3; shift 3
      $W fill /tmp/back.$name 65536 0 64 0
      truncate -s 4M /tmp/cache.$name
      N=$($CTL add /tmp/cache.$name 4194304 65536 wb none --flags "$flags")
      mkfifo /tmp/f.$name
      $CTL serve $N /tmp/back.$name /tmp/cache.$name --backing /tmp/back.$name --ctl /tmp/f.$name --flush-delay-ms 30 "$@" > /tmp/s.$name &
      SRV=$!
      waitfor attached /tmp/s.$name
      $W write /dev/uloop$N 65536 0 64 4 1 && sync /dev/uloop$N     # every block dirty
      $W hammer /dev/uloop$N 4096 0 1024 600 1000 500 > /tmp/h.$name & H=$!
      e=1
      while [ $e -le $epochs ]; do
        sleep 1
        kill -STOP $H; while ! grep -q '^State:.*T' /proc/$H/status; do sleep 0.05; done
        dd if=/dev/uloop$N of=/tmp/expect.$name bs=1M iflag=direct status=none
        echo flush > /tmp/f.$name; waitfor "^begun $e " /tmp/s.$name
        kill -CONT $H
        waitfor "^committed $e \\|^commit failed" /tmp/s.$name
        grep "^committed $e \\|^commit failed" /tmp/s.$name
        echo "$name epoch $e preserved: $(grep -c "^preserve .* epoch $e$" /tmp/s.$name)"
        if cmp -s /tmp/back.$name /tmp/expect.$name; then echo "$name epoch $e: backing equals the image at BEGIN"; else echo "$name epoch $e: backing differs from the image at BEGIN in $(cmp -l /tmp/back.$name /tmp/expect.$name | wc -l) bytes"; fi
        e=$((e + 1))
      done
      echo "$name preserves: $(grep -c '^preserve' /tmp/s.$name)"
      kill $H; wait $H 2>/dev/null || true
      echo "$name $(cat /tmp/h.$name)"
      echo "q.$name: $($CTL query $N)"
      echo flush > /tmp/f.$name; waitfor "^committed $e " /tmp/s.$name
      cmp /tmp/back.$name /dev/uloop$N && echo "$name: backing equals the device after the writer stopped"
      echo quit > /tmp/f.$name; wait $SRV 2>/dev/null || true
      $CTL remove $N
    }
    epochs preserve preserve 2
    epochs release preserve 1 --release
    epochs plain "" 1
    rmmod uloop && echo unloaded
  `, { timeoutMs: 420_000, allowSplats: TCG_STARVATION });
}, 600_000);

describe('point-in-time flush epochs (PRESERVE)', () => {
  it('leaves the backing file equal to the image at EPOCH_BEGIN while writers race the flusher', () => {
    console.log(run.output.split('\n').filter((l) => / epoch \d|preserves|committed/.test(l)).join('\n'));
    for (const e of [1, 2]) {
      expect(run.output).toContain(`preserve epoch ${e}: backing equals the image at BEGIN`);
      // the writer really raced this epoch: blocks of its snapshot were preserved
      expect(Number(run.output.match(new RegExp(`^preserve epoch ${e} preserved: (\\d+)`, 'm'))![1])).toBeGreaterThanOrEqual(5);
    }
    const preserves = Number(run.output.match(/^preserve preserves: (\d+)/m)![1]);
    expect(preserves).toBeGreaterThan(5);
    expect(run.output).not.toMatch(/commit failed/);
  });
  it('is as exact with EPOCH_RELEASE, with fewer PRESERVEs', () => {
    for (const e of [1]) expect(run.output).toContain(`release epoch ${e}: backing equals the image at BEGIN`);
    // per epoch: the first epoch of each run is comparable
    const withRelease = Number(run.output.match(/^release preserves: (\d+)/m)![1]);
    const first = Number(run.output.match(/^preserve epoch 1 preserved: (\d+)/m)![1]);
    expect(withRelease).toBeLessThan(first);
  });
  it('differs without ULOOP_F_PRESERVE (the control)', () => {
    expect(run.output).toMatch(/^plain epoch \d: backing differs from the image at BEGIN/m);
    expect(Number(run.output.match(/^plain preserves: (\d+)/m)![1])).toBe(0);
  });
  it('keeps rewritten blocks dirty, and a last flush makes the backing file equal the device', () => {
    for (const name of ['preserve', 'release', 'plain']) expect(run.output).toContain(`${name}: backing equals the device after the writer stopped`);
    expect(run.output).toContain('unloaded');
    expect(run.code).toBe(0);
    expectCleanKernel(run);
  });
});
