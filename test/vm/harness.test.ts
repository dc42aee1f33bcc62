// The VM harness itself: a guest boots, runs a script over the host's root and reports its exit
// status, and a failing script is reported as failing.
import { describe, expect, it } from 'vitest';
import { runInVm } from './vm.js';

describe('VM harness', () => {
  it('boots, runs the host node over 9p, reports the exit status', async () => {
    const r = await runInVm(
      `uname -r
      node -e 'console.log("node", process.version)'
      modprobe loop && grep -c loop /proc/modules
      echo hello > /mnt/written
      exit 3`,
    );
    console.log(`boot + script + poweroff: ${r.ms} ms`);
    expect(r.code).toBe(3);
    expect(r.output).toMatch(/^6\.1\.0-/m);
    expect(r.output).toMatch(/^node v20/m);
  }, 300_000);
});
