// Point-in-time flushes on /dev/uloopN with the Node daemon (invariant 7): the device is added
// with ULOOP_F_PRESERVE, so the first write to a block of a running flush epoch waits until the
// daemon has kept the epoch's version aside (the PRESERVE upcall runs the engine's copy-on-write,
// src/cache/epoch.ts), and the flusher writes that version to the disk. A writer rewrites random
// 4 KiB pieces of the device all the while; it is stopped only around the flush's start, to read
// the device's image at that instant. After each completed `ulobdev flush` the backing disk must
// equal that image exactly, though blocks were rewritten while they were copied. Rewritten blocks
// stay dirty: once the writer stops, one more flush makes the backing disk equal the device.
//
// That writes raced the copies is made so, not hoped for (the CI failure on 17d0c5b: since the
// flush became one fast copy, it ended before the resumed writer touched a block of its epoch, and
// no epoch saw a PRESERVE): each flush holds its copy at a gate once its epoch has begun (the
// daemon's pausePoint 'flush:copy', src/sys.ts), the writer resumes, and the gate opens only once
// the daemon's `preserves` count has grown in that epoch: a write waited for a PRESERVE before the
// copy read anything. After PRESERVE_WAIT_S without one it opens anyway, and the per-epoch check
// below fails. Without PRESERVE (planted: the flag left out at ADD) no epoch sees one, and the
// copy reads the writer's new content: epoch 1 differs too.
import { beforeAll, describe, expect, it } from 'vitest';
import { expectCleanKernel, prepareVm, ROOT, runInVm, type VmResult } from '../support/vm.js';
import { buildTool, statusShell } from './uloop-tools.js';

const EPOCHS = 3;
/** Seconds the copy's gate waits for the epoch's first PRESERVE before it opens anyway. */
const PRESERVE_WAIT_S = 30;
let run: VmResult;

beforeAll(async () => {
  const vm = prepareVm();
  const writer = buildTool('uloop-writer');
  run = await runInVm(
    `
    U="node ${ROOT}/dist/cli/ulobdev.bundle.js"; CTL=${vm.ULOOPCTL}; W=${writer}; D=/dev/uloop0
    insmod ${vm.ULOOP_KO}
    kepoch() { $CTL query 0 | sed 's/.* epoch=\\([0-9]*\\).*/\\1/'; }
    # status over the control socket (ulobctl and jq: statusShell in uloop-tools.ts), not by
    # \`ulobdev status --json | node -e\`: two Node starts, seconds of guest time each under TCG
    ${statusShell()}
    kfield() { sj uloop0 ".kernel.$1"; }
    # each flush waits at 'flush:copy', its epoch begun, until /tmp/go exists (src/sys.ts pausePoint)
    echo "flush:copy /tmp/go" > /tmp/pause; export ULOBDEV_PAUSE_FILE=/tmp/pause
    $W fill /tmp/disk.img 65536 0 256 0
    $U -c /tmp/d.cache -b /tmp/d.bitmap --writeback --block-size 64K --daemon $D /tmp/disk.img > /dev/null
    $W write $D 65536 0 256 4 1 && sync $D                      # every block dirty
    $W hammer $D 4096 0 4096 900 1000 300 > /tmp/h & H=$!
    e=1
    while [ $e -le ${EPOCHS} ]; do
      sleep 2
      kill -STOP $H; while ! grep -q '^State:.*T' /proc/$H/status; do sleep 0.05; done
      dd if=$D of=/tmp/expect bs=1M iflag=direct status=none
      before=$(kepoch); p0=$(kfield preserves)
      rm -f /tmp/go
      $U flush --wait $D > /tmp/flush.$e 2>&1 & FL=$!
      i=0; while [ "$(kepoch)" = "$before" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done
      [ "$(kepoch)" = "$before" ] && echo "epoch $e: the kernel epoch did not begin"
      kill -CONT $H
      end=$(( $(date +%s) + ${PRESERVE_WAIT_S} ))
      while [ "$(kfield preserves)" = "$p0" ] && [ $(date +%s) -lt $end ]; do sleep 0.1; done
      touch /tmp/go                                               # the copy may read now
      wait $FL && echo "flush $e completed" || { echo "flush $e failed"; cat /tmp/flush.$e; }
      echo "epoch $e preserves: $(( $(kfield preserves) - p0 ))"
      if cmp -s /tmp/disk.img /tmp/expect; then echo "epoch $e: backing equals the device at the flush's start"; else echo "epoch $e: backing differs from the device at the flush's start: $(cmp /tmp/disk.img /tmp/expect 2>&1 | head -1)"; fi
      e=$((e + 1))
    done
    kill $H; wait $H 2>/dev/null || true; echo "writer: $(cat /tmp/h)"
    $U flush --wait $D > /dev/null
    cmp /tmp/disk.img $D && echo "backing equals the device after the writer stopped"
    echo "dirty after the last flush: $(kfield dirtyBlocks)"
    $U detach $D > /dev/null && echo detached
    rmmod uloop && echo unloaded
  `,
    { memoryMb: 1536 },
  );
}, 900_000);

describe('point-in-time flushes on /dev/uloopN (Node daemon, ULOOP_F_PRESERVE)', () => {
  it('after each completed flush the backing file is the device as it was when the flush began', () => {
    for (let e = 1; e <= EPOCHS; e++) {
      expect(run.output).toContain(`flush ${e} completed`);
      expect(run.output).toContain(`epoch ${e}: backing equals the device at the flush's start`);
    }
    // The writer raced the copies in every epoch: at least one write waited for a PRESERVE while
    // the gate held the epoch's copy back.
    const preserves = [...run.output.matchAll(/epoch (\d) preserves: (\d+)/g)].map((m) => [Number(m[1]), Number(m[2])]);
    expect(preserves.map(([e]) => e)).toEqual(Array.from({ length: EPOCHS }, (_, i) => i + 1));
    for (const [e, n] of preserves) expect(n, `epoch ${e}: writes that waited for a PRESERVE`).toBeGreaterThan(0);
    expect(run.output).not.toContain('did not begin');
  });

  it('blocks rewritten during a flush stay dirty; a flush after the writer stops makes the backing exact', () => {
    expect(run.output).toContain('backing equals the device after the writer stopped');
    expect(run.output).toContain('dirty after the last flush: 0');
    expect(run.output).toContain('unloaded');
    expectCleanKernel(run);
    expect(run.code).toBe(0);
  });
});
