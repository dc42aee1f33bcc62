// Shared by the VM tests that drive uloop.ko with C clients: building those clients (test/vm/*.c,
// compiled on the host, run in the guest over the host's root) and reading their query lines.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, renameSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from '../support/vm.js';

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
    // Built beside and renamed into place: two VM files run at once (scripts/test.sh) and one may
    // start the binary while the other's gcc is still writing it.
    const tmp = `${bin}.${process.pid}.tmp`;
    execFileSync('gcc', ['-O2', '-Wall', '-Wextra', '-Werror', '-o', tmp, src, '-lpthread'], { stdio: 'inherit' });
    renameSync(tmp, bin);
  }
  return bin;
}

// TCG_STARVATION and expectCleanKernel moved to the harness (test/support/vm.ts); re-exported here
// for the files that import them from this module.
export { expectCleanKernel, TCG_STARVATION } from '../support/vm.js';

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

/**
 * A guest shell function that reads a daemon's status without starting Node: `sj NAME FILTER`
 * prints jq's raw output (-r) of FILTER applied to NAME's status, the object `ulobdev status
 * --json /dev/NAME` prints (NAME: uloop0, ublkb0, ... or the --name given), asked over
 * /run/ulobdev/NAME.sock by test/vm/ulobctl.c. Each `ulobdev status` (or `node -e` to read its
 * JSON) is a Node start, seconds of guest time under TCG; this is milliseconds. The files still
 * run `ulobdev status` itself where they check what it prints.
 * E.g. `sj uloop0 '"dirty=\(.dirtyBytes) error=\(.kernel.error)"'`.
 */
export function statusShell(): string {
  const ctl = buildTool('ulobctl');
  return `sj() { ${ctl} /run/ulobdev/$1.sock | jq -r ".status | $2"; }`;
}
