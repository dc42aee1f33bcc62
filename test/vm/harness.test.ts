// The VM harness itself: a guest boots the kernel asked for, runs a script over the host's root and
// reports its exit status; a kernel splat in the guest (here a real hung-task report, and a WARNING
// line written to the kernel log) fails the run, unless the test declares it. One guest does all
// of it: the script runs the host's node, provokes both splats and exits 3.
import { beforeAll, describe, expect, it } from 'vitest';
import { defaultKernel, findSplats, GuestKernelSplatError, prepareVm, runInVm, unexpectedSplats, type VmPaths, type VmResult } from '../support/vm.js';

const SERIES_RE = { '6.1': /^6\.1\.0-\d+-amd64$/m, '6.12': /^6\.12\.\d+\+deb13[.\d]*-amd64$/m, newest: /^[7-9]\.\d+\.\d+\+deb13[.\d]*-amd64$/m };
// The splats the script provokes, as a test that means them would declare them.
const PLANTED = /blocked for more than|Call Trace:|harness_test/;

let vm: VmPaths;
let outcome: unknown;

beforeAll(async () => {
  vm = prepareVm(defaultKernel());
  // A real splat: a writer stuck in D state on a frozen ext4 (sb_start_write), with the hung-task
  // detector at 1 s, gives "INFO: task sh:N blocked for more than 1 seconds." and a Call Trace.
  // A WARNING written to /dev/kmsg stands for a WARN_ON in the module.
  outcome = await runInVm(
    `uname -r
    node -e 'console.log("node", process.version)'
    modprobe loop && grep -c loop /proc/modules
    echo hello > /mnt/written
    modprobe ext4
    echo 1 > /proc/sys/kernel/hung_task_timeout_secs
    truncate -s 16M /tmp/fs.img && mkfs.ext4 -q /tmp/fs.img && mkdir /tmp/m && mount -o loop /tmp/fs.img /tmp/m
    fsfreeze -f /tmp/m
    (echo x > /tmp/m/f) &
    sleep 4
    fsfreeze -u /tmp/m; wait; umount /tmp/m
    echo "WARNING: CPU: 0 PID: 1 at drivers/block/uloop.c:1 harness_test" > /dev/kmsg
    echo finished
    exit 3`,
  ).then(
    () => undefined,
    (e: unknown) => e,
  );
}, 900_000);

describe('VM harness', () => {
  it('boots the chosen kernel, runs the host node over 9p, reports the exit status', () => {
    expect(outcome).toBeInstanceOf(GuestKernelSplatError);
    const { result } = outcome as GuestKernelSplatError;
    console.log(`${vm.KVER}: boot + script + poweroff: ${result.ms} ms`);
    expect(result.code).toBe(3);
    expect(result.output).toMatch(SERIES_RE[vm.SERIES]);
    expect(result.output).toContain(vm.KVER);
    expect(result.output).toMatch(/^node v20/m);
    expect(result.output).toContain('finished');
    // A normal boot logs no splat of its own: every one found is one the script provoked.
    expect(result.splats.filter((l) => !PLANTED.test(l))).toEqual([]);
  });

  it('fails a run whose guest kernel logs a splat, unless the test allows that splat', () => {
    expect(outcome).toBeInstanceOf(GuestKernelSplatError);
    const { result, lines } = outcome as GuestKernelSplatError;
    expect(lines.join('\n')).toMatch(/INFO: task sh:\d+ blocked for more than \d+ seconds/);
    expect(lines.join('\n')).toMatch(/WARNING: CPU: 0 PID: 1 at drivers\/block\/uloop\.c:1 harness_test/);
    expect(lines).toEqual(unexpectedSplats(result));
    // the same run with these splats declared as expected passes: runInVm rejects on exactly these
    expect(result.splats.length).toBeGreaterThan(0);
    expect(unexpectedSplats(result, PLANTED)).toEqual([]);
    expect(unexpectedSplats(result, /harness_test/).join('\n')).toMatch(/blocked for more than/);
  });

  it('boots a guest that died before the script ran once more, then reports the second death', async () => {
    // No init to run (rdinit and root name nothing): the kernel panics at the end of its boot,
    // before init would print ULOBVM_READY, as the TCG boot-time deaths did.
    const notes: string[] = [];
    const write = process.stderr.write.bind(process.stderr);
    process.stderr.write = ((chunk: string | Uint8Array, ...rest: never[]) => {
      notes.push(String(chunk));
      return write(chunk, ...rest);
    }) as typeof process.stderr.write;
    let result: VmResult;
    try {
      result = await runInVm('echo never', { append: 'rdinit=/nonexistent root=/dev/nonexistent', timeoutMs: 120_000 }).catch((err: unknown) => {
        if (err instanceof GuestKernelSplatError) return err.result;
        throw err;
      });
    } finally {
      process.stderr.write = write;
    }
    expect(result.code).toBeNull();
    expect(result.console).toMatch(/Kernel panic/);
    expect(notes.filter((n) => n.includes("died before the test's script ran; booting once more")).length).toBe(1);
  }, 300_000);

  it('knows a splat from an ordinary log line', () => {
    const log = [
      '[    1.0] virtio_blk virtio1: [vda] 2048 512-byte logical blocks',
      '[    2.0] EXT4-fs (uloop0): mounted filesystem with ordered data mode',
      '[    3.0] ------------[ cut here ]------------',
      '[    3.1] WARNING: CPU: 1 PID: 77 at kernel/uloop.c:640 uloop_queue_rq+0x1/0x2 [uloop]',
      '[    4.0] BUG: KASAN: slab-use-after-free in uloop_rw_done+0x10/0x20 [uloop]',
      '[    5.0] WARNING: possible circular locking dependency detected',
      '[    6.0] BUG: unable to handle page fault for address: ffff888',
      '[    7.0] Oops: 0000 [#1] PREEMPT SMP NOPTI',
      '[    8.0] UBSAN: array-index-out-of-bounds in drivers/block/uloop.c:12:3',
      '[    9.0] I/O error, dev uloop0, sector 8 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0',
    ].join('\n');
    const found = findSplats(log);
    expect(found).toHaveLength(6);
    expect(found.join('\n')).not.toMatch(/EXT4-fs|I\/O error|virtio_blk|cut here/);
  });
});
