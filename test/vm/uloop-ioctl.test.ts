// Bad input for every ioctl of uloop.ko and its request channel (test/vm/uloop-abuse.c): each
// refusal has its own errno and one line in the kernel log, changes nothing, and leaves no splat;
// a message read into an unwritable buffer is read again; replies to ids that are not
// outstanding are refused; REMOVE is refused while the device is open; ADD, REMOVE, ATTACH, QUERY
// and opens of the device racing for seconds give only the expected errnos. CREDIT: its refusals,
// and a limit at work (ROOM before a whole-block write past it, nothing asked within it, ROOM's
// missing count, a ROOM not read ending when the limit is raised or at ATTACH); EVICT leaves the
// blocks of a request still preparing, unless ULOOP_EVICT_F_PINNED; BARRIER: its refusals, the
// barrier it sends and waits for, a killed caller exits.
import { beforeAll, describe, expect, it } from 'vitest';
import { expectCleanKernel, prepareVm, runInVm, TCG_STARVATION, type VmResult } from '../support/vm.js';
import { buildTool } from './uloop-tools.js';

let run: VmResult;

beforeAll(async () => {
  const vm = prepareVm();
  const abuse = buildTool('uloop-abuse');
  run = await runInVm(`
    insmod ${vm.ULOOP_KO}
    truncate -s 64M /tmp/cache
    ${abuse} /tmp/cache 8
    rmmod uloop && echo unloaded
  `, { allowSplats: TCG_STARVATION });
}, 600_000);

describe('uloop.ko ioctls with bad input', () => {
  it('refuses each with its own errno and changes nothing', () => {
    const fails = run.output.split('\n').filter((l) => l.startsWith('FAIL'));
    expect(fails).toEqual([]);
    expect(run.output).toMatch(/^abuse: \d+ checks, 0 failed$/m);
    expect(run.output).toContain('ok add: block size 512');
    expect(run.output).toContain('ok add: size 2^64 - 512');
    expect(run.output).toContain('ok state after the refusals: present=1008 dirty=0');
    // ULOOP_FEAT_BARRIER: the BARRIER ioctl, EVICT's pinned flag, ROOM's count, ROOMs ended
    // when the limit is raised or lifted (review8 K1-K4).
    for (const line of [
      'ok barrier: unknown flag',
      'ok room count: ROOM asks for the 2 missing blocks of its span [2, 5)',
      'ok room count: the answer raised the limit by the grant',
      'ok barrier: returns the 2 blocks handed over',
      'ok barrier kill: the killed caller exits',
      'ok room end: no ROOM left to read',
      'ok room at attach: the new daemon reads no ROOM',
      'ok preparing: with ULOOP_EVICT_F_PINNED the oldest read keeps block 16',
      'ok preparing: the pinned block 18 of the younger read is evicted with the flag',
      'ok hold: a whole-block write waits while the evicted block is held',
      'ok hold: then the write goes on',
    ])
      expect(run.output).toContain(line);
  });
  it('logs one line per refusal, saying what was wrong', () => {
    expect(run.dmesg).toContain('uloop: ADD refused: the daemon speaks ABI 1, this module 2');
    expect(run.dmesg).toMatch(/uloop: ADD refused: block size 512 is not a power of two from 4096 to 1048576 \(-EDOM\)/);
    expect(run.dmesg).toMatch(/uloop: ADD refused: bitmaps of 127 bytes, 128 needed \(-EMSGSIZE\)/);
    expect(run.dmesg).toMatch(/uloop: ADD refused: \/dev\/uloop5 exists \(-EEXIST\)/);
    expect(run.dmesg).toMatch(/uloop: REMOVE refused: uloop5 is open/);
    expect(run.dmesg).toMatch(/uloop5: reply to 999999, which is not an outstanding message/);
    expect(run.dmesg).toMatch(/uloop5: read of messages into an unwritable buffer; they stay queued/);
  });
  it('ATTACH: refusals, and a new fd takes the device once its daemon closed', () => {
    for (const l of [
      'ok attach: version 1',
      'ok attach: device has a daemon',
      'ok attach: no such device',
      'ok attach: fd already attached',
      'ok attach: argument unreadable',
      'ok attach: index 0xffffffff',
      'ok attach: after the daemon closed its fd',
      'ok attach: the re-attached daemon holds it',
      'ok query: attached after re-attach',
      'ok attach: device removed',
    ])
      expect(run.output).toContain(l);
    expect(run.dmesg).toMatch(/uloop: ATTACH refused: uloop5 has a daemon attached \(-EBUSY\)/);
  });
  it('CREDIT: refusals, then a limit that makes whole-block writes over it ask ROOM first', () => {
    for (const l of [
      'ok credit: a limit without the flag',
      'ok credit: unknown flag',
      'ok credit: limit above the device\'s blocks',
      'ok credit: limit 2^64 - 1',
      'ok credit: pad set',
      'ok credit: reserved field',
      'ok credit: unreadable',
      'ok credit: not attached',
      'ok credit: still none after the refusals',
      'ok credit: a whole-block write over the limit sends ROOM',
      'ok credit: nothing unasked while ROOM waits',
      'ok credit: the write went on after ROOM',
      'ok credit: the granted block is unasked (pending)',
      'ok credit: a failed ROOM fails the write',
      'ok credit: the failed write took nothing',
      'ok credit: CREDIT returns the limit and the unasked count',
      'ok credit: within the limit a write asks nothing',
      'ok credit: no message within the limit',
      'ok credit: none unasked after the barrier',
      'ok credit: ATTACH lifts the limit',
    ])
      expect(run.output).toContain(l);
    expect(run.dmesg).toMatch(/uloop5: CREDIT refused: limit 1025 is above the device's 1024 blocks \(-EINVAL\)/);
    expect(run.dmesg).toMatch(/uloop5: room at 131072\+65536 failed: -28/);
  });
  it('EVICT leaves the blocks of a request still preparing', () => {
    for (const l of [
      'ok preparing: blocks 17 and 19 evicted',
      'ok preparing: the read asks for block 17',
      'ok preparing: blocks 16 and 18 of the waiting reads are not evicted',
      'ok preparing: the oldest read is served',
      'ok preparing: the younger read is served',
      'ok preparing: block 16 evicted once the read is done',
    ])
      expect(run.output).toContain(l);
  });
  it('serves a request whose message was read into a faulting buffer', () => {
    expect(run.output).toContain('ok read: the faulted message is read again');
    expect(run.output).toContain('ok reader served after the fault');
  });
  it('survives ADD, REMOVE, ATTACH, QUERY and opens racing', () => {
    console.log(run.output.split('\n').filter((l) => l.includes('race')).join('\n'));
    expect(run.output).toMatch(/^ok race add: .*ok=\d+/m);
    expect(run.output).toMatch(/^ok race remove: .*ok=\d+/m);
    expect(run.output).toContain('ok race: device 7 gone at the end');
    expect(run.output).toContain('unloaded');
    expect(run.code).toBe(0);
    expectCleanKernel(run);
  });
});
