// Shared by the VM tests that drive uloop.ko with C clients: building those clients (test/vm/*.c,
// compiled on the host, run in the guest over the host's root) and the guest-log checks.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { expect } from 'vitest';
import { ROOT, type VmResult } from '../support/vm.js';

/**
 * Compiles test/vm/NAME.c (with the uapi header) into .vm/NAME when the binary is missing or
 * older than its sources; returns the binary's path.
 */
export function buildTool(name: string): string {
  const src = join(ROOT, 'test/vm', `${name}.c`);
  const uapi = join(ROOT, 'kernel/include/uapi/uloop.h');
  const dir = join(ROOT, '.vm');
  const bin = join(dir, name);
  mkdirSync(dir, { recursive: true });
  const mtime = (p: string): number => statSync(p).mtimeMs;
  if (!existsSync(bin) || mtime(bin) < Math.max(mtime(src), mtime(uapi))) {
    execFileSync('gcc', ['-O2', '-Wall', '-Wextra', '-Werror', '-o', bin, src, '-lpthread'], { stdio: 'inherit' });
  }
  return bin;
}

/**
 * Splats runInVm lets pass for these tests (its allowSplats): soft lockups, with the bare "Call
 * Trace:" line of their register dump. Seen on 6.12 with the host at load 10-15: single-threaded
 * TCG runs both vCPUs on one host thread, and when the host deschedules it for 20-60 s the guest's
 * clock jumps past the watchdog's threshold; one boot logged five, in idle (pv_native_safe_halt),
 * in initcalls (jitterentropy, chr_dev_init), in a kworker clearing pages for the initramfs and in
 * migration/1, all minutes before uloop.ko was loaded (the boot took 500 s). expectCleanKernel
 * still fails on a soft lockup logged once uloop.ko is loaded, and every BUG/WARNING/lockdep/
 * hung-task/KASAN/KFENCE/RCU-stall line fails the run as before.
 */
export const TCG_STARVATION = /soft lockup - CPU#\d+ stuck for \d+s!|^\[[ \d.]+\] Call Trace:$/;

/**
 * Fails the test when the guest never finished (crash, timeout) or logged a kernel splat: any
 * other than TCG_STARVATION, and a soft lockup too once uloop.ko was loaded. runInVm
 * (test/support/vm.ts) already rejects a run with any other splat; this states it at the
 * assertion too.
 */
export function expectCleanKernel(run: VmResult): void {
  expect(run.dmesg, 'the guest wrote no kernel log (it crashed or timed out)').not.toBe('');
  expect(
    run.splats.filter((l) => !TCG_STARVATION.test(l)),
    'kernel splats in the guest log',
  ).toEqual([]);
  const lines = run.dmesg.split('\n');
  const loaded = lines.findIndex((l) => /\buloop\b/.test(l));
  const after = loaded < 0 ? [] : lines.slice(loaded).filter((l) => /soft lockup - CPU#/.test(l));
  expect(after, 'soft lockups once uloop.ko was loaded').toEqual([]);
}

/** The key=value fields of a `uloopctl query` line, as numbers. */
export function parseQuery(line: string): Record<string, number> {
  return Object.fromEntries(
    line
      .trim()
      .split(/\s+/)
      .filter((kv) => kv.includes('='))
      .map((kv) => [kv.slice(0, kv.indexOf('=')), Number(kv.slice(kv.indexOf('=') + 1))]),
  );
}

/** The query lines of `uloopctl query` printed after a `tag:` prefix in the output. */
export function queryAfter(output: string, tag: string): Record<string, number> {
  const line = output.split('\n').find((l) => l.startsWith(`${tag}:`));
  if (!line) throw new Error(`no "${tag}:" line in the output`);
  return parseQuery(line.slice(tag.length + 1));
}
