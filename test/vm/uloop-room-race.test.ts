// ROOM answers racing their writers back to dev->lock (test/vm/uloop-room-race.c; review11 F-1).
// uloop_reply used to read the ROOM upcall after completing it; the upcall lives on the stack of
// the waiting request's worker, which returns at once and whose next mutex_lock(&dev->lock) put its
// mutex_waiter there: the reply took the waiter's list pointer for a hold and list_del()ed the
// mutex's wait list head, and the unlock right after faulted at 0xdead000000000110. One vCPU with
// full preemption makes the woken worker run inside the reply's lock (wakeup preemption), the
// shape that fault needed; rounds of a few seconds each, every message answered one write(2) each.
import { beforeAll, describe, expect, it } from 'vitest';
import { expectCleanKernel, prepareVm, runInVm, TCG_STARVATION, type VmResult } from '../support/vm.js';
import { buildTool } from './uloop-tools.js';

const ROUNDS = Number(process.env.ROOMRACE_ROUNDS ?? 4);
const SECONDS = Number(process.env.ROOMRACE_SECONDS ?? 8);
const WRITERS = Number(process.env.ROOMRACE_WRITERS ?? 4);
let run: VmResult;

beforeAll(async () => {
  const vm = prepareVm();
  const race = buildTool('uloop-room-race');
  run = await runInVm(
    `
    insmod ${vm.ULOOP_KO}
    for i in $(seq ${ROUNDS}); do
      rm -f /tmp/cache; truncate -s 256M /tmp/cache
      ${race} /tmp/cache ${SECONDS} ${WRITERS}
    done
    rmmod uloop && echo unloaded
  `,
    {
      cpus: Number(process.env.ROOMRACE_CPUS ?? 1),
      append: process.env.ROOMRACE_APPEND ?? 'preempt=full',
      allowSplats: TCG_STARVATION,
      // the old module hangs the guest (soft lockups) until this; a loaded host boots slowly
      timeoutMs: 300_000 + ROUNDS * SECONDS * 4_000,
    },
  );
}, 900_000);

describe('uloop.ko: ROOM answers while their writers come back for the lock', () => {
  it('answers every ROOM and leaves the kernel clean', () => {
    const lines = run.output.split('\n').filter((l) => l.startsWith('room-race:'));
    console.log(lines.join('\n'));
    expect(lines).toHaveLength(ROUNDS);
    for (const l of lines) {
      expect(l).toMatch(/ failed=0$/);
      expect(Number(/rooms=(\d+)/.exec(l)?.[1])).toBeGreaterThan(100);
    }
    expect(run.output).toContain('unloaded');
    expect(run.code).toBe(0);
    expectCleanKernel(run);
  });
});
