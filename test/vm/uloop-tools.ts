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
 * The one splat these tests let pass (runInVm's allowSplats): a soft lockup reported against
 * swapper/N, i.e. an idle CPU (RIP in pv_native_safe_halt) or PID 1 still running the kernel's own
 * initcalls at boot (jitterentropy, chr_dev_init), with its register dump's Call Trace line. Seen on
 * 6.12 with the host at load 10-15: single-threaded TCG runs both vCPUs on one host thread, and when
 * the host deschedules it for 20-60 s the guest's clock jumps past the watchdog's threshold before
 * uloop.ko is even loaded. It says nothing about uloop: a soft lockup in any other task (a uloop
 * worker, the C daemon, a writer), every BUG/WARNING/lockdep/hung-task/KASAN/KFENCE line, and an
 * RCU stall still fail the run.
 */
export const TCG_STARVATION = /soft lockup - CPU#\d+ stuck for \d+s! \[swapper\/\d+:\d+\]|^\[[ \d.]+\] Call Trace:$/;

/**
 * Fails the test when the guest never finished (crash, timeout) or logged a kernel splat other
 * than TCG_STARVATION. runInVm (test/support/vm.ts) already rejects such a run; this states it at
 * the assertion too.
 */
export function expectCleanKernel(run: VmResult): void {
  expect(run.dmesg, 'the guest wrote no kernel log (it crashed or timed out)').not.toBe('');
  expect(
    run.splats.filter((l) => !TCG_STARVATION.test(l)),
    'kernel splats in the guest log',
  ).toEqual([]);
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
